"""The main job's lifecycle, once `command` has read its config (`python -m runtime.daemon`).

Lifecycle only — run directory, signals, checkpoints, metrics, logging. The RL
lives in the learner and the acting loop. Exit codes: 0 clean stop, 2 bad usage, config
or stored state (one line naming the cause), 1 a fatal runtime error or a final checkpoint
that could not be written (logged), 3 the stream kept failing (after a final checkpoint).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from agent.learner import A2CLearner
from agent.networks import FrameTooSmall, resolve_network
from runtime.daemon.checkpoints import CheckpointError, CheckpointStore
from runtime.daemon.config import Config, ConfigError, to_dict
from runtime.daemon.errors import SetupError
from runtime.daemon.filming import GameFilming
from runtime.daemon.history import set_aside_after
from runtime.daemon.jobs import Checkpointing, GameRecords, Job, Publishing, RecordSink, Reporting
from runtime.daemon.loop import ActingLoop, Counters, RollbackNeeded, StreamFault
from runtime.daemon.monitoring import MetricsEndpoint
from runtime.daemon.process import RunDirLock, StopFlag, close_logging, setup_logging
from runtime.daemon.progress import RECENT_GAMES, Progress
from runtime.daemon.publish import Publisher, export_key
from runtime.daemon.supervision import StreamSupervisor
from runtime.daemon.tensorboard import TensorBoardLog
from runtime.daemon.triggers import Every
from runtime.device.manifest import checked_run, new_run
from runtime.files import write_atomic
from runtime.metrics import MetricsLog, last_returns
from runtime.sdnotify import Notifier
from runtime.streams import Stream, StreamError, is_atari_id

log = logging.getLogger("runtime.daemon")


def configure_torch(config: Config, network: str) -> None:
    """Process-wide torch settings for the learner (threads, convolution backend)."""
    torch.set_num_threads(config.run.torch_threads)
    onednn = config.run.onednn
    # The stream-x convolutions are small: torch's own kernels run them faster.
    stream_layers = network in ("stream", "shared-stream")
    torch.backends.mkldnn.enabled = onednn == "on" or (onednn == "auto" and not stream_layers)


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
        self.streams = StreamSupervisor(config, lambda: self.stop.reason is not None)
        self.loop: ActingLoop | None = None
        self.monitoring: MetricsEndpoint | None = None  # log.metrics_port
        # The saved position in the stream when resuming (None: a new run).
        self.resume_state: dict[str, Any] | None = None
        # The run identity ({"id", "started"}) published policies name: made when the run
        # directory starts fresh, kept in every checkpoint
        # (runtime.device.manifest.new_run).
        self.run_identity: dict[str, Any] | None = None
        self._log_handlers: list[logging.Handler] = []
        self._lock: RunDirLock | None = None

    # -- start -------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that can fail on bad input, before the first step (SetupError)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SetupError(f"run.dir: cannot write to {self.run_dir} ({exc.strerror})") from None
        key = export_key(self.config)
        self._lock = RunDirLock(self.run_dir)
        self._log_handlers = setup_logging(self.config.log.level, self.run_dir / "daemon.log")
        found = None if self.fresh else self._newest_checkpoint()
        steps = int(found[0].get("counters", {}).get("steps", 0)) if found else 0
        try:
            self.stream = self.streams.open(steps)
        except StreamError as exc:
            raise SetupError(f"env.{exc.key}: {exc}") from None
        if found is not None:
            self._keep_network_of(found[0].get("spec", {}))
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
        self._identify(found[0] if found is not None and not self.fresh else None)
        try:
            for line in set_aside_after(self.run_dir, self.counters.steps):
                log.warning("%s", line)
        except OSError as exc:
            raise SetupError(f"run.dir: cannot set aside what was written after the "
                             f"checkpoint ({exc})") from None
        self.publisher = Publisher(self.config, self.run_dir, self.learner, self._spec(),
                                   self.counters, fresh=self.fresh, key=key,
                                   run=self.run_identity)
        self.tensorboard = None
        if self.config.log.tensorboard:
            try:
                # Events past the checkpoint are dropped by TensorBoard's readers.
                self.tensorboard = TensorBoardLog(self.run_dir / "tensorboard",
                                                  purge_step=self.counters.steps + 1)
            except ValueError as exc:
                raise SetupError(str(exc)) from None
        resolved = yaml.safe_dump(to_dict(self.config), sort_keys=False)
        write_atomic(self.run_dir / "config.yaml", resolved.encode())
        log.info("resolved config:\n%s", resolved.rstrip())
        self._open_reporting()

    def _open_reporting(self) -> None:
        """status.json and the progress lines; the metrics endpoint when asked for, which
        listens at once (a port in use is a SetupError)."""
        cfg = self.config.log
        self.progress = Progress(
            self.counters, self.run_dir / "status.json", self.notifier,
            status_seconds=cfg.status_every_seconds,
            summary_seconds=cfg.summary_every_seconds, extra_status=self._status,
            live=sys.stderr.isatty(),
            # metrics.jsonl as kept up to the checkpoint: status.json and published
            # policies see no restart
            recent_returns=last_returns(self.run_dir / "metrics.jsonl", RECENT_GAMES))
        if cfg.metrics_port is not None:
            self.monitoring = MetricsEndpoint(cfg.metrics_address, cfg.metrics_port,
                                              self.progress.status)

    def _identify(self, resumed: dict[str, Any] | None) -> None:
        """The run identity: the checkpoint's when resuming, else a new one (a fresh start,
        or a checkpoint written before run identities)."""
        self.run_identity = checked_run(resumed.get("run")) if resumed is not None else None
        if self.run_identity is not None:
            log.info("run %s goes on", self.run_identity["id"])
            return
        self.run_identity = new_run()
        if resumed is None:
            log.info("run %s begins: its policies name it, and devices that follow with a "
                     "key take it as a new run", self.run_identity["id"])
        else:
            log.info("the checkpoint names no run (written before run identities): this is "
                     "run %s from now on", self.run_identity["id"])

    def _check_fits_stream(self) -> None:
        """What the config asks of the stream it made (SetupError naming the key)."""
        spec, config = self.stream.spec, self.config
        if config.log.video_every_games and not self.stream.renders_frames:
            raise SetupError(f"log.video_every_games: {config.env.id} renders no frames "
                             f"(set env.kwargs.render_mode=rgb_array, or 0)")
        try:
            self.learner = A2CLearner(config.agent, spec.observation_shape, spec.num_actions,
                                      seed=config.seed)
        except FrameTooSmall as exc:
            key = "env.screen_size" if is_atari_id(config.env.id) else "agent.network"
            network = resolve_network(config.agent.network, spec.observation_shape)
            raise SetupError(f"{key}: {exc.frame[0]}x{exc.frame[1]} frames are smaller than the "
                             f"{exc.smallest}x{exc.smallest} the {network} network's "
                             f"convolutions need") from None
        except ValueError as exc:
            raise SetupError(f"agent.network: {exc}") from None

    def _keep_network_of(self, theirs: dict[str, Any]) -> None:
        """`network: auto` resumes a run on the network it began with: a run started
        when auto picked shared-conv for frames goes on with its shared-conv weights."""
        shape = self.stream.spec.observation_shape
        if self.config.agent.network != "auto" or not isinstance(theirs.get("network"), str) \
                or tuple(theirs.get("observation_shape", ())) != shape:
            return  # a mismatch is _restore's to report
        began_with = resolve_network(theirs["network"], shape)
        if began_with != resolve_network("auto", shape):
            log.info("agent.network: auto goes on with %s, the network this run began with",
                     began_with)
            self.config = self.config.on_network(began_with)

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
            raise SetupError(str(exc)) from None

    def _restore(self, payload: dict[str, Any], path: Path) -> None:
        mine, theirs = self._spec(), payload.get("spec", {})
        if isinstance(theirs.get("network"), str):  # read under its current name
            theirs = {**theirs, "network": resolve_network(theirs["network"],
                                                           tuple(mine["observation_shape"]))}
        for key in ("network", "optimizer", "observation_shape", "num_actions"):
            if theirs.get(key) != mine[key]:
                raise SetupError(f"checkpoint {path} does not match this config: {key} is "
                                 f"{theirs.get(key)!r} there, {mine[key]!r} here "
                                 f"(use the matching config or --fresh)")
        try:
            self.learner.load_state_dict(payload["learner"])
        except (KeyError, ValueError) as exc:
            raise SetupError(f"checkpoint {path} does not fit this learner: {exc}") from None
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
            resume=self.resume_state)
        sinks: list[RecordSink] = [MetricsLog(self.run_dir / "metrics.jsonl")]
        if self.tensorboard is not None:
            sinks.append(self.tensorboard)
        progress = self.progress
        self._report_resume(loop, progress)
        max_steps = cfg.run.max_steps
        now = time.monotonic()
        jobs: list[Job] = [
            GameRecords(progress, sinks),
            GameFilming(self.run_dir / "videos", cfg.log.video_every_games, loop),
            Checkpointing(self.checkpoint, Every(cfg.checkpoint.every_steps,
                                                 cfg.checkpoint.every_seconds,
                                                 self.counters.steps, now)),
            Publishing(self.publisher, progress),
            # The live line and the watchdog at most once a second; status.json at its
            # own pace.
            Reporting(progress, Every(None, min(cfg.log.status_every_seconds, 1.0), 0,
                                      now - 1.0))]
        if self.monitoring is not None:
            jobs.append(self.monitoring)
        self.stop.install()
        self.notifier.ready(progress.line())
        log.info("learning from %s at step %d", cfg.env.id, self.counters.steps)
        try:
            while self.stop.reason is None and (max_steps is None
                                                or self.counters.steps < max_steps):
                try:
                    summary = loop.step()
                    self.streams.consecutive = 0
                except StreamFault as fault:
                    if not self._recover_stream(loop, fault):
                        return self._give_up(progress)
                    continue
                except RollbackNeeded as needed:
                    self.rollback("a non-finite update")
                    summary = needed.summary
                steps, now = self.counters.steps, time.monotonic()
                for job in jobs:
                    job.after_step(steps, now, summary)
            return self._shut_down(progress)
        finally:
            self.notifier.stopping()
            for job in jobs:
                job.close()
            self.stream.close()
            self.stop.restore()

    def _status(self) -> dict[str, Any]:
        """What the daemon adds to status.json beside the counters."""
        return {"last_checkpoint_step": self.last_checkpoint_step,
                "publishing": self.publisher.status()}

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

    def _shut_down(self, progress: Progress) -> int:
        why = self.stop.reason or f"reached run.max_steps={self.config.run.max_steps}"
        log.info("stopping (%s) at step %d", why, self.counters.steps)
        self.notifier.stopping()  # the shutdown begins: the final checkpoint and policy
        progress.tick(time.monotonic(), "stopping", force=True)
        saved = self.last_checkpoint_step == self.counters.steps or self.checkpoint()
        if saved:  # a policy ahead of every checkpoint would outrun the run's resume
            self.publisher.publish_final(self.counters.steps, progress.recent_returns)
        self.publisher.close()  # an export in flight may finish, and status.json says so
        progress.tick(time.monotonic(), "stopped" if saved else "failed", force=True)
        if not saved:
            log.error("the final checkpoint could not be written; the newest on disk is "
                      "from step %s", self.last_checkpoint_step)
        return 0 if saved else 1

    def _give_up(self, progress: Progress) -> int:
        log.error("the stream failed %d times in a row: giving up after a final checkpoint",
                  self.config.faults.stream_max_failures)
        self.notifier.stopping()
        self.checkpoint(stream_usable=False)
        progress.tick(time.monotonic(), "failed", force=True)
        return 3

    def _recover_stream(self, loop: ActingLoop, fault: Exception) -> bool:
        def attach(stream: Stream) -> None:
            self.stream = stream
            self.learner.reset_traces()  # a new episode: no credit across the cut
            loop.attach(stream)

        return self.streams.recover(fault, self.stream, self.counters.steps,
                                    self.counters.faults, attach)

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
                   "run": self.run_identity, "created_at": time.time()}
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
        close_logging(self._log_handlers)
        self._log_handlers = []
        stream = getattr(self, "stream", None)
        if stream is not None and self.loop is None:  # run() closes the one it used
            stream.close()
        if self.monitoring is not None and self.loop is None:  # the same
            self.monitoring.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def run_daemon(config: Config, fresh: bool) -> int:
    """Prepare and run one daemon on a config that has been read (`command.main`)."""
    daemon = None
    try:
        daemon = Daemon(config, fresh=fresh)
        daemon.prepare()
    except (SetupError, ConfigError) as exc:
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
