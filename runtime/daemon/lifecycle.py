"""The main job: `python -m runtime.daemon --config config.yaml`.

Lifecycle only — config, run directory, signals, checkpoints, metrics, logging. The RL
lives in the learner and the acting loop. Exit codes: 0 clean stop, 2 bad usage, config
or stored state (one line naming the cause), 1 a fatal runtime error or a final checkpoint
that could not be written (logged), 3 the stream kept failing (after a final checkpoint).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import resource
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
import yaml

from agent.learner import A2CLearner
from agent.networks import FrameTooSmall, resolve_network
from runtime.cli import OneLineParser, UsageError
from runtime.daemon.checkpoints import CheckpointError, CheckpointStore
from runtime.daemon.config import Config, ConfigError, load_config, to_dict
from runtime.daemon.history import VIDEO_NAME, set_aside_after
from runtime.daemon.loop import ActingLoop, Counters, GameSummary, RollbackNeeded, StreamFault
from runtime.daemon.publish import Publisher, export_key
from runtime.daemon.tensorboard import TensorBoardLog
from runtime.files import write_atomic
from runtime.metrics import MetricsLog, write_status
from runtime.sdnotify import Notifier
from runtime.streams import AtariStream, StreamError, open_stream
from runtime.video import GameRecorder, VideoError

log = logging.getLogger("runtime.daemon")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m runtime.daemon", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file (see config.yaml)")
    parser.add_argument("--run-dir", help="run directory (overrides run.dir)")
    parser.add_argument("--max-steps", type=int, help="stop at this all-time step count "
                        "(overrides run.max_steps)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted config key, e.g. --set env.id=CartPole-v1")
    parser.add_argument("--fresh", action="store_true",
                        help="start over; existing checkpoints are moved aside, not deleted")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.set)
    if args.run_dir is not None:
        overrides.append(f"run.dir={args.run_dir}")
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    return load_config(args.config, overrides)


def configure_torch(config: Config, network: str) -> None:
    """Process-wide torch settings for the learner (threads, convolution backend)."""
    torch.set_num_threads(config.run.torch_threads)
    onednn = config.run.onednn
    torch.backends.mkldnn.enabled = onednn == "on" or (onednn == "auto" and network != "stream")


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


class Daemon:
    """One run: resumes from the newest good checkpoint, learns until stopped."""

    def __init__(self, config: Config, fresh: bool) -> None:
        self.config = config
        self.run_dir = Path(config.run.dir)
        self.store = CheckpointStore(self.run_dir / "checkpoints", config.checkpoint.keep)
        self.counters = Counters()
        self.stop = StopFlag()
        self.last_checkpoint_step: int | None = None
        self.fresh = fresh
        self.notifier = Notifier()
        self.stream_failures = 0  # consecutive; reset by every good step
        self.loop: ActingLoop | None = None
        # The saved position in the stream when resuming (None: a new run).
        self.resume_state: dict[str, Any] | None = None
        self._log_handlers: list[logging.Handler] = []

    # -- start -------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that can fail on bad input, before the first step (UsageError)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"run.dir: cannot write to {self.run_dir} ({exc.strerror})") from None
        key = export_key(self.config)
        self._lock_run_dir()
        self._log_handlers = setup_logging(self.config, self.run_dir / "daemon.log")
        found = None if self.fresh else self._newest_checkpoint()
        steps = int(found[0].get("counters", {}).get("steps", 0)) if found else 0
        try:
            self.stream = open_stream(self.config.env, stream_seed(self.config.seed, steps))
        except StreamError as exc:
            raise UsageError(f"env.{exc.key}: {exc}") from None
        self._check_fits_stream()
        configure_torch(self.config, self.learner.network_name)
        if self.fresh:
            moved = self.store.move_aside()
            if moved is not None:
                log.info("--fresh: previous checkpoints moved to %s", moved)
        elif found is None:
            log.info("no checkpoint in %s: starting fresh", self.store.directory)
        else:
            self._restore(*found)
        try:
            for line in set_aside_after(self.run_dir, self.counters.steps):
                log.warning("%s", line)
        except OSError as exc:
            raise UsageError(f"run.dir: cannot set aside what was written after the "
                             f"checkpoint ({exc})") from None
        self.publisher = Publisher(self.config, self.run_dir, self.learner, self._spec(),
                                   self.counters, fresh=self.fresh, key=key)
        self.tensorboard = None
        if self.config.log.tensorboard:
            try:
                # Events past the checkpoint are dropped by TensorBoard's readers.
                self.tensorboard = TensorBoardLog(self.run_dir / "tensorboard",
                                                  purge_step=self.counters.steps + 1)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        resolved = yaml.safe_dump(to_dict(self.config), sort_keys=False)
        write_atomic(self.run_dir / "config.yaml", resolved.encode())
        log.info("resolved config:\n%s", resolved.rstrip())

    def _check_fits_stream(self) -> None:
        """What the config asks of the stream it made (UsageError naming the key)."""
        spec, config = self.stream.spec, self.config
        if config.log.video_every_episodes and not self.stream.renders_frames:
            raise UsageError(f"log.video_every_episodes: {config.env.id} renders no frames "
                             f"(set env.kwargs.render_mode=rgb_array, or 0)")
        try:
            self.learner = A2CLearner(config.agent, spec.observation_shape, spec.num_actions,
                                      seed=config.seed)
        except FrameTooSmall as exc:
            key = "env.screen_size" if isinstance(self.stream, AtariStream) else "agent.network"
            network = resolve_network(config.agent.network, spec.observation_shape)
            raise UsageError(f"{key}: {exc.frame[0]}x{exc.frame[1]} frames are smaller than the "
                             f"{exc.smallest}x{exc.smallest} the {network} network's "
                             f"convolutions need") from None
        except ValueError as exc:
            raise UsageError(f"agent.network: {exc}") from None

    def _lock_run_dir(self) -> None:
        """One daemon per run directory: two would interleave checkpoints and metrics.
        The lock is released by the kernel when the process dies, however it dies."""
        self._lock_file = open(self.run_dir / "daemon.lock", "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            raise UsageError(f"run.dir: {self.run_dir} is in use by pid {holder}") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    def _spec(self) -> dict[str, Any]:
        spec = self.stream.spec
        return {"network": self.learner.network_name, "optimizer": self.config.agent.optimizer,
                "observation_shape": list(spec.observation_shape),
                "observation_dtype": spec.observation_dtype, "num_actions": spec.num_actions,
                "env_id": self.config.env.id}

    def _newest_checkpoint(self) -> tuple[dict[str, Any], Path] | None:
        """Read before the stream is made: a resumed run seeds its stream differently."""
        try:
            return self.store.load_latest()
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None

    def _restore(self, payload: dict[str, Any], path: Path) -> None:
        mine, theirs = self._spec(), payload.get("spec", {})
        for key in ("network", "optimizer", "observation_shape", "num_actions"):
            if theirs.get(key) != mine[key]:
                raise UsageError(f"checkpoint {path} does not match this config: {key} is "
                                 f"{theirs.get(key)!r} there, {mine[key]!r} here "
                                 f"(use the matching config or --fresh)")
        try:
            self.learner.load_state_dict(payload["learner"])
        except (KeyError, ValueError) as exc:
            raise UsageError(f"checkpoint {path} does not fit this learner: {exc}") from None
        self.counters = Counters.from_dict(payload["counters"])
        self.last_checkpoint_step = self.counters.steps
        self.resume_state = payload.get("loop") or {
            "stream_unavailable": "the checkpoint holds no position in the stream (written "
                                  "before streams were checkpointed)"}
        log.info("resumed from %s at step %d", path, self.counters.steps)

    # -- run ---------------------------------------------------------------------------

    def run(self) -> int:
        """Learn until a signal or run.max_steps; final checkpoint; returns the exit code."""
        cfg = self.config
        loop = self.loop = ActingLoop(
            self.learner, self.stream, self.counters,
            rollback_on_nonfinite=cfg.faults.on_nonfinite == "rollback",
            overlap=cfg.run.overlap_stream, resume=self.resume_state)
        metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        progress = Progress(self, sys.stderr.isatty())
        self._report_resume(loop, progress)
        max_steps = cfg.run.max_steps
        every_steps = cfg.checkpoint.every_steps
        every_seconds = cfg.checkpoint.every_seconds
        next_ckpt_time = time.monotonic() + every_seconds if every_seconds else float("inf")
        next_status = 0.0
        self.stop.install()
        self.notifier.ready(progress.line())
        log.info("learning from %s at step %d", cfg.env.id, self.counters.steps)
        try:
            while self.stop.reason is None and (max_steps is None
                                                or self.counters.steps < max_steps):
                try:
                    summary = loop.step()
                    self.stream_failures = 0
                except StreamFault as fault:
                    if not self._recover_stream(loop, fault):
                        return self._give_up(progress)
                    continue
                except RollbackNeeded as needed:
                    self.rollback("a non-finite update")
                    summary = needed.summary
                if summary is not None:
                    record = progress.game_record(summary)
                    metrics.write(record)
                    if self.tensorboard is not None:
                        self.tensorboard.write(record)
                    self._film_next_game(loop, summary.game)
                now = time.monotonic()
                if (every_steps and self.counters.steps % every_steps == 0) \
                        or now >= next_ckpt_time:
                    self.checkpoint()
                    next_ckpt_time = now + every_seconds if every_seconds else float("inf")
                self.publisher.tick(self.counters.steps, now, progress.recent_returns)
                if now >= next_status:
                    progress.tick(now, "running")
                    next_status = now + min(cfg.log.status_every_seconds, 1.0)
            return self._shut_down(progress)
        finally:
            self.notifier.stopping()
            self.publisher.close()
            if loop.recorder is not None:
                loop.recorder.finish()
            metrics.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
            loop.close()
            self.stream.close()
            self.stop.restore()

    def _report_resume(self, loop: ActingLoop, progress: Progress) -> None:
        if self.resume_state is None:
            return
        steps = self.counters.steps
        if loop.cut is None:
            log.info("step %d: the episode in progress goes on exactly where it stopped "
                     "(the stream's state was restored)", steps)
            return
        log.warning("step %d: a new episode, traces reset: the stream's state could not be "
                    "restored (%s)", steps, loop.cut)
        progress.restart_note = f"step {steps}: a new episode after the restart ({loop.cut})"

    def _film_next_game(self, loop: ActingLoop, game: int) -> None:
        """log.video_every_episodes: film the game after every Nth one (never fatal)."""
        every = self.config.log.video_every_episodes
        if loop.recorder is not None:
            loop.recorder.finish()
            log.info("video %s", loop.recorder.paths[-1])
            loop.recorder = None
        if not every or game % every:
            return
        try:
            recorder = GameRecorder(self.run_dir / "videos")
            recorder.start(VIDEO_NAME.format(game=game + 1, step=self.counters.steps)
                           .removesuffix(".mp4"))
            loop.recorder = recorder
        except VideoError as exc:
            log.warning("cannot record video: %s", exc)

    def _shut_down(self, progress: Progress) -> int:
        why = self.stop.reason or f"reached run.max_steps={self.config.run.max_steps}"
        log.info("stopping (%s) at step %d", why, self.counters.steps)
        progress.tick(time.monotonic(), "stopping", force=True)
        saved = self.last_checkpoint_step == self.counters.steps or self.checkpoint()
        self.publisher.close()  # an export in flight may finish, and status.json says so
        progress.tick(time.monotonic(), "stopped" if saved else "failed", force=True)
        if not saved:
            log.error("the final checkpoint could not be written; the newest on disk is "
                      "from step %s", self.last_checkpoint_step)
        return 0 if saved else 1

    def _give_up(self, progress: Progress) -> int:
        log.error("the stream failed %d times in a row: giving up after a final checkpoint",
                  self.config.faults.stream_max_failures)
        self.checkpoint(stream_usable=False)
        progress.tick(time.monotonic(), "failed", force=True)
        return 3

    def _recover_stream(self, loop: ActingLoop, fault: Exception) -> bool:
        """Recreate the stream after bounded exponential backoff, counting every failed
        attempt as a consecutive failure; False = give up."""
        faults = self.config.faults
        while True:
            self.stream_failures += 1
            failures = self.stream_failures
            self.counters.faults.stream_failures += 1
            if failures >= faults.stream_max_failures:
                log.error("stream failure %d/%d: %s", failures, faults.stream_max_failures,
                          fault)
                return False
            wait = min(faults.stream_backoff_seconds * 2 ** (failures - 1),
                       faults.stream_backoff_max_seconds)
            log.warning("stream failure %d/%d: %s; recreating it in %.1fs", failures,
                        faults.stream_max_failures, fault, wait)
            deadline = time.monotonic() + wait
            while self.stop.reason is None and time.monotonic() < deadline:
                time.sleep(min(0.1, wait))  # stay responsive to signals while backing off
            try:
                self.stream.close()
            except Exception:  # noqa: BLE001, S110 - a broken stream may fail to close too
                pass
            try:
                self.stream = open_stream(self.config.env,
                                          stream_seed(self.config.seed, self.counters.steps))
                self.learner.reset_traces()
                loop.attach(self.stream)
                return True
            except (StreamError, StreamFault) as exc:
                fault = exc

    def rollback(self, why: str) -> None:
        """Restore the learner from the newest good checkpoint (counters keep going)."""
        self.counters.faults.rollbacks += 1
        try:
            found = self.store.load_latest()
        except CheckpointError:
            found = None
        if found is None:
            log.error("rollback after %s: no good checkpoint; continuing as is", why)
            return
        payload, path = found
        self.learner.load_state_dict(payload["learner"])
        # The stream has moved on since that checkpoint: its traces belong to another
        # stretch of the episode, and credit must not flow across the cut.
        self.learner.reset_traces()
        log.warning("rolled back the learner to %s after %s", path.name, why)

    def checkpoint(self, stream_usable: bool = True) -> bool:
        """Write a checkpoint; a disk fault is logged and counted, never fatal here. It holds
        the learner and where the agent stands in its stream, so a restart goes on exactly
        from here."""
        if not self.learner.parameters_finite():
            self.rollback("non-finite parameters found before a checkpoint")
            return False
        loop = self.loop.state_dict(stream_usable) if self.loop is not None else None
        payload = {"learner": self.learner.state_dict(), "counters": self.counters.as_dict(),
                   "loop": loop, "config": to_dict(self.config), "spec": self._spec(),
                   "created_at": time.time()}
        try:
            path = self.store.save(payload, self.counters.steps)
        except OSError as exc:
            self.counters.faults.checkpoint_failures += 1
            log.error("checkpoint at step %d failed: %s; retrying at the next interval",
                      self.counters.steps, exc)
            return False
        self.last_checkpoint_step = self.counters.steps
        log.info("checkpoint %s", path.name)
        return True


    def release(self) -> None:
        """Give back the run directory's lock and the log handlers (for a next start in the
        same process)."""
        root = logging.getLogger()
        for handler in self._log_handlers:
            root.removeHandler(handler)
            handler.close()
        self._log_handlers = []
        stream = getattr(self, "stream", None)
        if stream is not None and self.loop is None:  # run() closes the one it used
            stream.close()
        lock = getattr(self, "_lock_file", None)
        if lock is not None:
            lock.close()
            self._lock_file = None


def stream_seed(seed: int, steps: int) -> int:
    """The stream's seed for a start at all-time step `steps`: `seed` for a new run, else
    one derived from both, so that a restart that cannot restore the stream's state does
    not replay the episode starts of the first run."""
    if steps == 0:
        return seed
    return int(np.random.SeedSequence([seed, steps]).generate_state(1)[0])


class Progress:
    """status.json, the live terminal line, periodic summary lines, game records."""

    def __init__(self, daemon: Daemon, live: bool) -> None:
        self.daemon = daemon
        self.live = live
        self.restart_note: str | None = None  # said in the next game record
        self.started = time.time()
        self.last_time = time.monotonic()
        self.last_steps = daemon.counters.steps
        self.steps_per_s = 0.0
        self.next_status = 0.0
        self.next_summary = time.monotonic() + daemon.config.log.summary_every_seconds
        self.recent_returns: list[float] = []

    def game_record(self, summary: GameSummary) -> dict[str, Any]:
        self.recent_returns = (self.recent_returns + [summary.game_return])[-100:]
        record = {"step": summary.step, "episode": summary.game, "return": summary.game_return,
                  "length": summary.length, "time": round(time.time(), 3),
                  "steps_per_s": round(self.steps_per_s, 1),
                  **{k: round(v, 6) for k, v in summary.means.items()}}
        if self.restart_note is not None:
            record["restarted"], self.restart_note = self.restart_note, None
        return record

    def tick(self, now: float, state: str, force: bool = False) -> None:
        if now > self.last_time + 0.5:
            steps = self.daemon.counters.steps
            self.steps_per_s = (steps - self.last_steps) / (now - self.last_time)
            self.last_time, self.last_steps = now, steps
        cfg = self.daemon.config.log
        if force or now >= self.next_status:
            self.write_status(state)
            self.next_status = now + cfg.status_every_seconds
        self.daemon.notifier.alive(self.line())
        if self.live:
            sys.stderr.write(f"\r{self.line()}  ")
            sys.stderr.flush()
        elif now >= self.next_summary:
            log.info(self.line())
            self.next_summary = now + cfg.summary_every_seconds

    def line(self) -> str:
        c = self.daemon.counters
        mean = (sum(self.recent_returns) / len(self.recent_returns)
                if self.recent_returns else float("nan"))
        return (f"step {c.steps}  games {c.games}  return(last {len(self.recent_returns)}) "
                f"{mean:.2f}  {self.steps_per_s:.0f} steps/s")

    def write_status(self, state: str) -> None:
        c = self.daemon.counters
        write_status(self.daemon.run_dir / "status.json", {
            "step": c.steps, "episodes": c.episodes, "games": c.games,
            "last_checkpoint_step": self.daemon.last_checkpoint_step,
            "steps_per_s": round(self.steps_per_s, 1), "pid": os.getpid(), "state": state,
            "faults": asdict(c.faults), "publishing": self.daemon.publisher.status(),
            **memory_mb(),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
        })


def memory_mb() -> dict[str, float]:
    """Current and peak resident memory (a leak shows as rss_mb creeping up over days)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        rss = float("nan")
    return {"rss_mb": round(rss, 1), "peak_rss_mb": round(peak, 1)}


def setup_logging(config: Config, log_file: Path) -> list[logging.Handler]:
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(config.log.level)
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(log_file)]
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    return handlers


def main(argv: list[str] | None = None) -> int:
    daemon = None
    try:
        args = parse_args(argv)
        daemon = Daemon(resolve_config(args), fresh=args.fresh)
        daemon.prepare()
    except (UsageError, ConfigError) as exc:
        print(f"daemon: error: {exc}", file=sys.stderr)
        if daemon is not None:
            daemon.release()
        return 2
    try:
        return daemon.run()
    except Exception:
        log.exception("fatal error at step %d", daemon.counters.steps)
        return 1
    finally:
        daemon.release()


if __name__ == "__main__":
    sys.exit(main())
