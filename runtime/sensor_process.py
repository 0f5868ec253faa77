"""A stream in its own process: the emulator and preprocessing on another core.

`ProcessStream` is a `Stream` whose real stream (runtime.streams) lives in a child
process, `python -m runtime.sensor_process`, which imports the stream code and nothing
else: no torch, no learner, and no GIL shared with the learner. That gives the daemon
two things:

- with `run.overlap_stream`, the child steps the emulator while the learner updates
  (`submit`), and the learner's process never runs emulator code; stepping it on a
  thread instead was no faster, because both threads fought over the GIL and the core;
- an emulator that crashes (a segfault in native code) ends the child, not the daemon:
  the loop sees a StreamFault and the supervisor opens a new stream.

Requests and replies are pickled over a socket pair (multiprocessing's Connection). A
frame stack is 28 kB, so copying it costs microseconds; what a hand-over costs is
waking the other process (0.1-0.3 ms a step on a 2-core machine, measured with
`tools/bench_stream.py --process`). Shared memory would not remove that wake-up. With
overlap_stream it happens while the learner updates, out of the step's way.

The child ignores SIGINT and SIGTERM: a terminal's Ctrl-C or a service manager's stop
reaches the whole process group, and the daemon still needs the stream's state for its
final checkpoint. The child ends when the daemon closes the connection, or dies with it
(end of file on the socket).
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from runtime.contract import StreamError, StreamOptions
from runtime.errors import first_line
from runtime.streams import StreamSpec, make_stream

# What the daemon may ask of the child's stream: the Stream protocol's methods.
_OPERATIONS = frozenset({"reset", "step", "state_dict", "load_state_dict", "render_rgb"})
START_TIMEOUT_SECONDS = 120.0  # creating an emulator imports gymnasium and ale_py


class PendingStep:
    """A step the child is computing; `result()` waits for it (once, then remembers).
    `ready_ns`, once collected: when the child had the result, on time.perf_counter_ns's
    clock (CLOCK_MONOTONIC on Linux, one clock for all processes), so a caller can tell
    how long a reading waited for it."""

    def __init__(self, stream: ProcessStream) -> None:
        self._stream = stream
        self._outcome: tuple[np.ndarray, float, bool, bool, dict] | None = None
        self._failure: StreamError | None = None
        self.ready_ns: int | None = None

    def result(self) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._outcome is None and self._failure is None:
            try:
                self._outcome, self.ready_ns = self._stream._reply()
            except StreamError as exc:
                self._failure = exc
            finally:
                self._stream._pending = None
        if self._failure is not None:
            raise self._failure
        assert self._outcome is not None
        return self._outcome


class ProcessStream:
    """The stream `make_stream` would give for the same arguments, run by a child process;
    see the module docstring. Raises StreamError, as `make_stream` does, when the stream
    cannot be made, and StreamError naming the cause when the child fails or dies later."""

    def __init__(self, env_id: str, env_kwargs: dict | None = None, *, seed: int = 0,
                 options: StreamOptions | None = None) -> None:
        parent, child = socket.socketpair()
        with child:
            try:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "runtime.sensor_process", "--fd",
                     str(child.fileno())], pass_fds=(child.fileno(),),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            except OSError as exc:  # no processes left, an unreadable interpreter, ...
                parent.close()
                raise StreamError(f"cannot start the stream process: {first_line(exc)}") \
                    from None
        self._conn = Connection(parent.detach())
        self._pending: PendingStep | None = None
        try:
            self._conn.send((env_id, dict(env_kwargs or {}), options, seed))
            if not self._conn.poll(START_TIMEOUT_SECONDS):
                raise StreamError(f"the stream process did not start within "
                                  f"{START_TIMEOUT_SECONDS:.0f} s")
            ready: dict[str, Any] = self._reply()
        except BaseException:
            self.close()
            raise
        self.spec: StreamSpec = ready["spec"]
        self.renders_frames: bool = ready["renders_frames"]
        self.state_unavailable: str | None = ready["state_unavailable"]

    # -- the Stream protocol, each call one request and one reply ------------------------

    @property
    def pid(self) -> int:
        """The stream process's id."""
        return self._process.pid

    def reset(self) -> np.ndarray:
        return self._call("reset")

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        return self.submit(action).result()

    def submit(self, action: int) -> PendingStep:
        """Start a step and return at once: the child steps while the caller works. A
        failure, even to send, is raised by `result()`, as a Future's would be."""
        pending = PendingStep(self)
        try:
            self._send("step", int(action))
        except StreamError as exc:
            pending._failure = exc
            return pending
        self._pending = pending
        return pending

    def state_dict(self) -> dict[str, Any]:
        return self._call("state_dict")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._call("load_state_dict", state)

    def render_rgb(self) -> np.ndarray | None:
        return self._call("render_rgb")

    def close(self) -> None:
        """Ask the child to close its stream and exit; kill it if it does not."""
        try:
            self._conn.send(("close",))
        except OSError:
            pass  # already gone
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._conn.close()

    # -- the connection --------------------------------------------------------------------

    def _call(self, operation: str, *args: Any) -> Any:
        if self._pending is not None:  # replies come in order: collect the step's first
            self._pending.result()
        self._send(operation, *args)
        return self._reply()

    def _send(self, operation: str, *args: Any) -> None:
        try:
            self._conn.send((operation, *args))
        except OSError:
            raise StreamError(f"the stream process is gone ({self._exit_status()})") from None

    def _reply(self) -> Any:
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise StreamError(f"the stream process is gone ({self._exit_status()})") from None
        if status == "error":
            message, key = value
            raise StreamError(message, key)
        return value

    def _exit_status(self) -> str:
        try:
            code = self._process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return "still running, not answering"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"


# -- the child -----------------------------------------------------------------------------

def _failure(exc: BaseException) -> tuple[str, tuple[str, str]]:
    """An exception as a reply: the message (typed, unless a StreamError's own) and the
    env setting it blames."""
    if isinstance(exc, StreamError):
        return "error", (str(exc), exc.key)
    return "error", (first_line(exc, typed=True), "id")


def serve(conn: Connection) -> int:
    """Make the stream the first message describes, then answer requests until told to
    close or the daemon is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        env_id, kwargs, options, seed = conn.recv()
        stream = make_stream(env_id, kwargs, seed=seed, options=options)
    except EOFError:
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the daemon, which says it once
        conn.send(_failure(exc))
        return 1
    conn.send(("ok", {"spec": stream.spec, "renders_frames": stream.renders_frames,
                      "state_unavailable": stream.state_unavailable}))
    try:
        while True:
            try:
                operation, *args = conn.recv()
            except EOFError:
                return 0  # the daemon is gone
            if operation == "close":
                return 0
            if operation not in _OPERATIONS:
                conn.send(("error", (f"unknown stream operation {operation!r}", "id")))
                continue
            try:
                value = getattr(stream, operation)(*args)
                if operation == "step":
                    value = (value, time.perf_counter_ns())  # PendingStep.ready_ns
                conn.send(("ok", value))
            except Exception as exc:  # noqa: BLE001 - the daemon decides what a failure means
                conn.send(_failure(exc))
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the daemon is gone
    finally:
        stream.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the stream process (started by the daemon)")
    parser.add_argument("--fd", type=int, required=True, help="the daemon's socket")
    return serve(Connection(parser.parse_args(argv).fd))


if __name__ == "__main__":
    sys.exit(main())
