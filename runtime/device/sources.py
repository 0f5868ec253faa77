"""Where a device fetches published policies from: a policies directory or an http(s) URL
of one (any static file server: `python -m http.server --directory RUN_DIR/policies`).

Standard library only. Every fetch is bounded in bytes and has a total deadline that holds
whatever the server's pace: the body is read in small pieces (one socket read each), each
read with the socket timeout set to min(per-read timeout, time left), and a timer shuts the
connection's socket when the deadline passes, which also ends a connect, a TLS handshake or
a header read in progress (a server that drips its headers). `Source.stop()` ends every
fetch in progress the same way. A file name is joined to the source only after
runtime.device.manifest.parse_entry has checked that it is a plain `policy-<step>.onnx`; a
directory source also refuses any path that resolves outside it. Failures are SourceError,
one line; a download that fails leaves no file behind.
"""

from __future__ import annotations

import functools
import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

from runtime.device.manifest import LATEST, MAX_INDEX_BYTES

CHUNK = 1 << 16  # the most one read asks for (a read returns what one recv gives)
USER_AGENT = "stream-agent-runtime/follow"


class SourceError(Exception):
    """The source could not be read (down, slow, an HTTP error, too much data); one line.
    `condition`: the same text without the counts that change from one try to the next
    (bytes received), so a caller logs a lasting condition once."""

    def __init__(self, message: str, condition: str | None = None) -> None:
        super().__init__(message)
        self.condition = condition or message


class _Fetch:
    """One fetch: its total deadline, and the sockets to shut when the deadline passes or
    the source is stopped (a blocked read then returns at once)."""

    def __init__(self, what: str, seconds: float, per_read: float,
                 stopped: threading.Event, active: set[_Fetch], lock: threading.Lock) -> None:
        self.what = what
        self.seconds = seconds
        self.per_read = per_read
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self._stopped = stopped
        self._active, self._active_lock = active, lock
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Fetch:
        with self._active_lock:
            self._active.add(self)
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._active_lock:
            self._active.discard(self)

    def _expire(self) -> None:
        self.expired = True
        self.abort()

    def abort(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed, or never connected

    def attach(self, sock: socket.socket) -> None:
        """A socket of this fetch (the TCP one, then the TLS one over it)."""
        with self._lock:
            self._sockets.append(sock)
        if self.expired or self._stopped.is_set():
            self.abort()

    def read_timeout(self) -> float:
        return max(0.001, min(self.per_read, self.deadline - time.monotonic()))

    def before_read(self, got: str) -> None:
        """Raise if the fetch must end; else bound the next socket read by the time left."""
        self.check(got)
        timeout = self.read_timeout()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass

    def check(self, got: str) -> None:
        """SourceError if the source was stopped or the deadline has passed."""
        if self._stopped.is_set():
            raise SourceError(f"{self.what}: stopped", f"{self.what}: stopped")
        if self.expired or time.monotonic() >= self.deadline:
            raise SourceError(f"{self.what}: timed out: not received within "
                              f"{self.seconds:g} s ({got})", f"{self.what}: timed out")


class _Connection(http.client.HTTPConnection):
    """An HTTP connection whose sockets its fetch can shut."""

    def __init__(self, *args: Any, fetch: _Fetch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fetch = fetch
        self._create_connection = self._create_attached

    def _create_attached(self, *args: Any, **kwargs: Any) -> socket.socket:
        sock = socket.create_connection(*args, **kwargs)
        self._fetch.attach(sock)
        return sock


class _TLSConnection(_Connection, http.client.HTTPSConnection):
    """The TLS socket is attached before its handshake (wrapping detaches the TCP one)."""

    def __init__(self, *args: Any, fetch: _Fetch, **kwargs: Any) -> None:
        super().__init__(*args, fetch=fetch, **kwargs)
        self._context = _AttachingContext(self._context, fetch)


class _AttachingContext:
    """An ssl.SSLContext whose wrapped sockets the fetch can shut during the handshake."""

    def __init__(self, context: Any, fetch: _Fetch) -> None:
        self._context, self._fetch = context, fetch

    def wrap_socket(self, sock: socket.socket, **kwargs: Any) -> Any:
        tls = self._context.wrap_socket(sock, do_handshake_on_connect=False, **kwargs)
        self._fetch.attach(tls)
        tls.do_handshake()
        return tls

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, fetch: _Fetch) -> None:
        super().__init__()
        self._fetch = fetch

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_Connection, fetch=self._fetch), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, fetch: _Fetch) -> None:
        super().__init__()
        self._fetch = fetch

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_TLSConnection, fetch=self._fetch), req,
                            context=self._context)


def _read_bounded(stream: BinaryIO, limit: int, fetch: _Fetch,
                  into: BinaryIO | None = None) -> bytes | int:
    """At most `limit` bytes within the fetch's deadline: the bytes, or with `into` their
    count written there. More than `limit` is an error: nothing larger is ever kept."""
    what = fetch.what
    read = getattr(stream, "read1", stream.read)  # one recv: never waits for a full chunk
    chunks, total = [], 0

    def came() -> str:
        return f"{total} of {limit} bytes came" if into is not None else f"{total} bytes came"

    while True:
        fetch.before_read(came())
        try:
            chunk = read(min(CHUNK, limit + 1 - total))
        except (OSError, http.client.HTTPException) as exc:  # reset, timeout, short body
            fetch.check(came())
            if isinstance(exc, TimeoutError):
                raise SourceError(f"{what}: timed out: nothing for {fetch.per_read:g} s "
                                  f"({came()})", f"{what}: timed out") from None
            raise SourceError(f"{what}: {type(exc).__name__} after {total} bytes",
                              f"{what}: {type(exc).__name__}") from None
        if not chunk:
            fetch.check(came())  # a socket shut by the deadline or a stop reads as the end
            break
        total += len(chunk)
        if total > limit:
            raise SourceError(f"{what}: more than {limit} bytes")
        if into is None:
            chunks.append(chunk)
        else:
            into.write(chunk)
    return b"".join(chunks) if into is None else total


class Source:
    """A policies directory or an http(s) URL of one. `timeout`: the most one network read
    may wait, and the total deadline of an index file."""

    def __init__(self, location: str, timeout: float = 10.0) -> None:
        self.location = location
        self.timeout = timeout
        scheme = urllib.parse.urlsplit(location).scheme.lower()
        if scheme in ("http", "https"):
            self.base_url: str | None = location if location.endswith("/") else location + "/"
            self.directory: Path | None = None
        elif scheme in ("", "file") or len(scheme) == 1:  # a path (or a Windows drive)
            path = urllib.parse.urlsplit(location).path if scheme == "file" else location
            self.base_url, self.directory = None, Path(path).expanduser()
        else:
            raise ValueError(f"{location}: not a directory or an http(s) URL")
        self._stopped = threading.Event()
        self._active: set[_Fetch] = set()
        self._active_lock = threading.Lock()

    def __str__(self) -> str:
        return self.location

    def stop(self) -> None:
        """End every fetch in progress at once (SourceError "stopped") and refuse new ones."""
        self._stopped.set()
        with self._active_lock:
            active = list(self._active)
        for fetch in active:
            fetch.abort()

    def _fetch(self, name: str, seconds: float) -> _Fetch:
        what = name if self.base_url is None else \
            urllib.parse.urljoin(self.base_url, urllib.parse.quote(name))
        return _Fetch(what, seconds, self.timeout, self._stopped, self._active,
                      self._active_lock)

    def read_index(self, name: str = LATEST) -> bytes:
        """latest.json (or another small index file), at most MAX_INDEX_BYTES, within
        `timeout` seconds in all."""
        with self._fetch(name, self.timeout) as fetch, self._open(name, fetch) as stream:
            length = _length(stream)
            if length is not None and length > MAX_INDEX_BYTES:
                raise SourceError(f"{fetch.what}: the server announces {length} bytes, more "
                                  f"than {MAX_INDEX_BYTES}")
            return _read_bounded(stream, MAX_INDEX_BYTES, fetch)

    def download(self, name: str, dest: Path, size: int, seconds: float) -> None:
        """Exactly `size` bytes of `name` into `dest` (created or truncated) within
        `seconds` in all; SourceError for fewer (a truncated download), more, or too slow.
        On any failure `dest` is removed."""
        try:
            with self._fetch(name, seconds) as fetch, self._open(name, fetch) as stream:
                length = _length(stream)
                if length is not None and length != size:
                    raise SourceError(f"{fetch.what}: the server announces {length} bytes, "
                                      f"the manifest {size}")
                with open(dest, "wb") as out:
                    got = _read_bounded(stream, size, fetch, into=out)
                    out.flush()
                    os.fsync(out.fileno())
                if got != size:
                    raise SourceError(f"{fetch.what}: truncated download ({got} of {size} "
                                      f"bytes)", f"{fetch.what}: truncated download")
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def _open(self, name: str, fetch: _Fetch) -> BinaryIO:
        fetch.check("0 bytes came")
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise SourceError(f"{name!r}: not a plain file name")
        if self.directory is not None:
            root = self.directory.resolve()
            path = (root / name).resolve()
            if path.parent != root:
                raise SourceError(f"{name!r} resolves outside {root}")
            try:
                return open(path, "rb")  # noqa: SIM115 - the caller closes it
            except OSError as exc:
                raise SourceError(f"{path}: {exc.strerror or exc}") from None
        url = fetch.what
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT,
                                                       "Cache-Control": "no-cache"})
        opener = urllib.request.build_opener(_HTTPHandler(fetch), _HTTPSHandler(fetch))
        try:
            # Each socket read waits at most the time left; the fetch's timer bounds the sum.
            return opener.open(request, timeout=fetch.read_timeout())
        except urllib.error.HTTPError as exc:
            exc.close()
            raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            fetch.check("no answer")  # the deadline or a stop shut the socket
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, TimeoutError):
                raise SourceError(f"{url}: timed out: no answer for {fetch.per_read:g} s",
                                  f"{url}: timed out") from None
            if isinstance(exc, urllib.error.URLError):  # e.g. [Errno 111] Connection refused
                text = str(reason) or type(reason).__name__
            else:  # a bad status line, a reset while the headers came
                text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise SourceError(f"{url}: {text}") from None


def _length(stream: Any) -> int | None:
    """The Content-Length an HTTP response announces (None: none, or a file)."""
    headers = getattr(stream, "headers", None)
    length = headers.get("Content-Length") if headers is not None else None
    return int(length) if length is not None and length.strip().isdigit() else None
