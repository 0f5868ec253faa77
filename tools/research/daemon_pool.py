"""Run many daemons to their ends: N local processes at once, or one Ray task each.

Both take work items (key, daemon arguments), call done(key, result) as each daemon
ends, with result = (exit code, last stderr line, wall seconds), and return False when
interrupted (Ctrl-C or SIGTERM in the caller): the running daemons then get SIGTERM, each
writes a final checkpoint, and no more start. tools/research/sweep.py decides what to run.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

from tools import ROOT

RAY_HINT = "--ray needs the ray extra: pip install 'stream-agent-runtime[ray]'"
Result = tuple[int, str, float]  # a daemon's exit code, last stderr line, wall seconds
Key = TypeVar("Key", bound=Hashable)  # what the caller names a work item by


def start_daemon(args: list[str], cwd: str | None) -> subprocess.Popen[str]:
    """`python -m runtime.daemon ARGS`; its log goes to RUN_DIR/daemon.log, and its stderr
    is kept only for the last line (the one-line reason of a failed start)."""
    return subprocess.Popen([sys.executable, "-m", "runtime.daemon", *args], cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def communicate(proc: subprocess.Popen[str]) -> str:
    """The daemon's stderr once it has ended, waited for in one-second slices: ray.cancel's
    interrupt lands only between Python bytecodes, never inside one long blocking read."""
    while True:
        try:
            return proc.communicate(timeout=1.0)[1]
        except subprocess.TimeoutExpired:
            continue


def wait_daemon(proc: subprocess.Popen[str], started: float) -> Result:
    """Wait for a daemon's end. Interrupted (ray.cancel raises KeyboardInterrupt in its
    task), it SIGTERMs the daemon, which writes its final checkpoint, and reports that end
    like any other, so the caller still learns the step and the wall time."""
    try:
        stderr = communicate(proc)
    except KeyboardInterrupt:
        proc.terminate()
        stderr = communicate(proc)
    except BaseException:
        proc.terminate()
        proc.communicate()
        raise
    lines = [line for line in stderr.splitlines() if line.strip()]
    return proc.returncode, lines[-1] if lines else "", time.monotonic() - started


def run_daemon(args: list[str], project_dir: str) -> Result:
    """The Ray task: one daemon on whichever node Ray picked. It runs from the project
    directory where the node has it at the driver's path, else from the installed package."""
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL):
        # ray.cancel interrupts a task like a SIGINT, which does nothing where SIGINT is
        # ignored: a worker of a Ray started from a background job (`sweep ... &`) inherits
        # that, and the daemon would outlive its cancelled task
        signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    proc = start_daemon(args, project_dir if os.path.isdir(project_dir) else None)
    return wait_daemon(proc, started)


class LocalPool:
    """Up to `jobs` daemons at once, one waiting thread each."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._running: set[subprocess.Popen[str]] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def _one(self, args: list[str]) -> Result | None:
        with self._lock:
            if self._stopping:
                return None
            started = time.monotonic()
            proc = start_daemon(args, str(ROOT))
            self._running.add(proc)
        try:
            return wait_daemon(proc, started)
        finally:
            with self._lock:
                self._running.discard(proc)

    def stop(self) -> None:
        """SIGTERM the running daemons (a Ctrl-C reached them already; one more signal
        is harmless, a SIGTERM to the sweep alone did not) and start no more."""
        with self._lock:
            self._stopping = True
            for proc in self._running:
                proc.terminate()

    def run(self, work: list[tuple[Key, list[str]]], done: Callable[[Key, Result], None]) -> bool:
        with ThreadPoolExecutor(self.jobs) as executor:
            futures: dict[Future[Result | None], Key] = {
                executor.submit(self._one, args): key for key, args in work}
            reported: set[Future[Result | None]] = set()
            try:
                for future in as_completed(futures):
                    reported.add(future)
                    if (result := future.result()) is not None:
                        done(futures[future], result)
                return True
            except KeyboardInterrupt:
                self.stop()
            for future in futures.keys() - reported:  # the stopped ones still count
                if (result := future.result()) is not None:
                    done(futures[future], result)
            return False


def import_ray() -> Any:
    """The ray module; ImportError -> ValueError(RAY_HINT)."""
    try:
        import ray
    except ImportError:
        raise ValueError(RAY_HINT) from None
    return ray


def connect_ray(address: str, jobs: int) -> Any:
    """Join the cluster at `address` (`auto`, `ray://...`) or start a local instance with
    `jobs` CPUs (`local`); an instance the caller started already is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address == "local":
            ray.init(num_cpus=jobs, include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; one line for all
        from runtime.errors import first_line  # driver side only: Ray workers never run it

        raise ValueError(f"--ray {address}: {first_line(exc)}") from None
    return ray


def run_on_ray(work: list[tuple[Key, list[str]]], done: Callable[[Key, Result], None],
               address: str, jobs: int) -> bool:
    """Each daemon a Ray task of num_cpus=1. Interrupted, the tasks are cancelled, which
    SIGTERMs their daemons, and given a minute to write their final checkpoints."""
    ray = connect_ray(address, jobs)
    module = sys.modules.get(run_daemon.__module__)
    if module is not None and module.__name__ != "__main__":
        # tools is in no wheel, so a worker on another machine cannot import it: ship the
        # task's code with it
        ray.cloudpickle.register_pickle_by_value(module)
    task = ray.remote(num_cpus=1)(run_daemon)
    pending = {task.remote(args, str(ROOT)): key for key, args in work}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            _report(ray, ready, pending, done)
        return True
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=60)
        _report(ray, ready, pending, done)
        return False


def _report(ray: Any, ready: list[Any], pending: dict[Any, Key],
            done: Callable[[Key, Result], None]) -> None:
    for ref in ready:
        key = pending.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            continue  # cancelled before it started: no daemon ran
        except ray.exceptions.RayError as exc:  # the task died, not the daemon
            from runtime.errors import first_line  # driver side only, as above

            result = (1, first_line(exc), 0.0)
        done(key, result)
