"""What the daemon holds as a process: its signals, the run directory's lock, logging and
a memory reading. None of it knows about learning."""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import IO, Any

from runtime.daemon.errors import SetupError


class StopFlag:
    """SIGTERM/SIGINT set a flag the loop checks between steps; a second SIGINT exits now."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            os.write(2, b"second interrupt: exiting without a final checkpoint\n")
            os._exit(130)
        self.reason = signal.Signals(signum).name


class RunDirLock:
    """One daemon per run directory: two would interleave checkpoints and metrics. The
    lock is released by the kernel when the process dies, however it dies."""

    def __init__(self, run_dir: Path) -> None:
        self._file: IO[str] | None = open(run_dir / "daemon.lock", "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self.release()
            raise SetupError(f"run.dir: {run_dir} is in use by pid {holder}") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def setup_logging(level: str, log_file: Path) -> list[logging.Handler]:
    """Log lines to stderr and to the run's daemon.log. `force` replaces whatever handlers
    the root logger had, so a second start in one process does not log every line twice."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr),
                                       logging.FileHandler(log_file)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    return handlers


def close_logging(handlers: list[logging.Handler]) -> None:
    """Detach and close the handlers `setup_logging` made (daemon.log is closed)."""
    root = logging.getLogger()
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()


def memory_mb() -> dict[str, float]:
    """Current and peak resident memory (a leak shows as rss_mb creeping up over days)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        rss = float("nan")
    return {"rss_mb": round(rss, 1), "peak_rss_mb": round(peak, 1)}
