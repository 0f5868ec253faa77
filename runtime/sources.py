"""Where a device fetches published policies from: a policies directory or an http(s) URL
of one (any static file server: `python -m http.server --directory RUN_DIR/policies`).

Standard library only. Every read is bounded in bytes and in time, and a file name is
joined to the source only after runtime.manifest.parse_entry has checked that it is a
plain `policy-<step>.onnx`; a directory source also refuses any path that resolves outside
it. Failures are SourceError, one line.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from runtime.manifest import LATEST, MAX_INDEX_BYTES

CHUNK = 1 << 16
USER_AGENT = "stream-agent-runtime/follow"


class SourceError(Exception):
    """The source could not be read (down, slow, an HTTP error, too much data); one line."""


def _read_bounded(stream: BinaryIO, limit: int, deadline: float, what: str,
                  into: BinaryIO | None = None) -> bytes | int:
    """At most `limit` bytes before `deadline` (monotonic): the bytes, or with `into` their
    count written there. More than `limit` is an error: nothing larger is ever kept."""
    chunks, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise SourceError(f"{what}: too slow ({total} bytes before the deadline)")
        try:
            chunk = stream.read(min(CHUNK, limit + 1 - total))
        except (OSError, http.client.HTTPException) as exc:  # reset, timeout, short body
            raise SourceError(f"{what}: {type(exc).__name__} after {total} bytes") from None
        if not chunk:
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
    """A policies directory or an http(s) URL of one."""

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

    def __str__(self) -> str:
        return self.location

    def read_index(self, name: str = LATEST) -> bytes:
        """latest.json (or another small index file), at most MAX_INDEX_BYTES."""
        deadline = time.monotonic() + self.timeout
        with self._open(name) as stream:
            return _read_bounded(stream, MAX_INDEX_BYTES, deadline, name)

    def download(self, name: str, dest: Path, size: int, seconds: float) -> None:
        """Exactly `size` bytes of `name` into `dest` (created or truncated) within
        `seconds`; SourceError for fewer (a truncated download), more, or too slow."""
        deadline = time.monotonic() + seconds
        with self._open(name) as stream, open(dest, "wb") as out:
            length = getattr(stream, "headers", {}).get("Content-Length")
            if length is not None and length.isdigit() and int(length) != size:
                raise SourceError(f"{name}: the server announces {length} bytes, the "
                                  f"manifest {size}")
            got = _read_bounded(stream, size, deadline, name, into=out)
            out.flush()
            os.fsync(out.fileno())
        if got != size:
            raise SourceError(f"{name}: truncated download ({got} of {size} bytes)")

    def _open(self, name: str) -> BinaryIO:
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
        url = urllib.parse.urljoin(self.base_url, urllib.parse.quote(name))
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT,
                                                       "Cache-Control": "no-cache"})
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310
        except urllib.error.HTTPError as exc:
            raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise SourceError(f"{url}: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, bad status
            raise SourceError(f"{url}: {type(exc).__name__}: {exc}") from None
