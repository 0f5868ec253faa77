"""Policies published while the daemon learns: RUN_DIR/policies/ for devices to follow.

At each `export.every_steps` / `export.every_seconds` the daemon hands a copy of the
actor's weights (normaliser statistics included) to a publisher process and goes on
learning. That process, started once (spawn) at a lower CPU priority (`export.niceness`),
rebuilds the actor,
exports and verifies it with runtime.daemon.export (the exporter's own code: onnx.checker
and parity with the torch actor on real stream frames), and only then publishes it. The
graph does not change between policies, only the weights: after the first export the
process writes each snapshot's weights into that graph (`ActorGraph`) and verifies the
result the same way. It exports each policy in full instead where the exporter folded a
weight into another constant, or once a written model has failed its checks.

    policies/policy-<step>.onnx   fsynced, then renamed into place
    policies/manifest.json        every kept entry, oldest first (runtime.device.manifest)
    policies/latest.json          the newest entry alone, what devices poll

both JSON files replaced atomically, each entry signed with `export.key_file` when set
(runtime.device.keys: an Ed25519 private key or an HMAC secret), the newest `export.keep`
kept, in the order they were published (a rollback, runtime.daemon.rollback, is the newest
entry though its step is not). Each entry names the run (`run`, `run_started`: the
daemon's run identity, kept in its checkpoints) and its `sequence` in the directory's
publishing order. One export at a time: a due publish waits while one runs. A failed
export (or a crashed or hung publisher process) is logged, counted in status.json
(faults.export_failures) and retried at the next interval; nothing here can stop learning.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from agent.learner import A2CLearner
from runtime.daemon.config import Config, from_dict, to_dict
from runtime.daemon.errors import SetupError
from runtime.daemon.export import (
    PARITY_FRAMES,
    ActorBuilder,
    ActorGraph,
    ExportError,
    VerificationError,
    build_metadata,
    check_actor_fits,
    export_verified,
    policy_weights,
    stream_spec,
    training_frames,
)
from runtime.daemon.loop import Counters
from runtime.daemon.progress import RECENT_GAMES
from runtime.daemon.triggers import Every
from runtime.device.keys import KeyFileError, Signer
from runtime.device.manifest import (
    FORMAT,
    LATEST,
    MANIFEST,
    index_bytes,
    manifest_bytes,
    next_sequence,
    policy_file,
    read_manifest,
    run_fields,
    sha256_file,
    sign,
)
from runtime.errors import first_line
from runtime.files import write_atomic

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often the loop looks for a finished export
CLOSE_GRACE_SECONDS = 30.0  # at shutdown, an export in flight may finish this long


def export_key(config: Config) -> Signer | None:
    """The signer of export.key_file (None when unset); SetupError naming the key."""
    try:
        return Signer.from_file(config.export.key_file) if config.export.key_file else None
    except KeyFileError as exc:
        raise SetupError(f"export.key_file: {exc}") from None


class Publisher:
    """The daemon's side: decides when, snapshots the actor, hands it over, reads results."""

    def __init__(self, config: Config, run_dir: Path, learner: A2CLearner,
                 spec: dict[str, Any], counters: Counters, fresh: bool = False,
                 key: Signer | None = None, run: dict[str, Any] | None = None) -> None:
        """`key`: export_key(config), read before anything else starts; `run`: the run
        identity entries name (runtime.device.manifest.new_run; None: entries without
        one)."""
        export = config.export
        self.config = config
        self.run = run
        self.learner = learner
        self.spec = spec
        self.counters = counters
        self.directory = run_dir / "policies"
        self.trigger = Every(export.every_steps, export.every_seconds, counters.steps,
                             time.monotonic())
        self.key = key
        if fresh and self.directory.is_dir() and any(self.directory.iterdir()):
            aside = self.directory.with_name(f"policies.old-{time.strftime('%Y%m%d-%H%M%S')}")
            self.directory.rename(aside)
            log.info("--fresh: previous policies moved to %s", aside)
        self._context = multiprocessing.get_context("spawn")
        self._worker: Any = None
        self._jobs: Any = None
        self._results: Any = None
        self._in_flight: tuple[int, float] | None = None  # (step, monotonic start)
        self._next_poll = 0.0
        self.counts = counters.publishing
        # A checkpoint older than these counters, or one taken before the newest policy
        # was published (then killed): the policies directory knows at least as much.
        on_disk = read_manifest(self.directory)
        if on_disk:
            self.counts.published = max(self.counts.published, len(on_disk))
            self.counts.last_step = max(self.counts.last_step or 0, on_disk[-1]["step"])
        self.last_error: str | None = None
        self.last_export_seconds: float | None = None
        self._stopping = False  # no next interval to retry a failed export at
        self._close_deadline: float | None = None  # set by publish_final

    # -- the one call per step --------------------------------------------------------------

    def tick(self, step: int, now: float, recent_returns: Sequence[float]) -> None:
        """Called by the loop after every step: collects a finished export, or starts one
        when due and none is running. A few comparisons unless something happens."""
        if self._in_flight is not None:
            if now >= self._next_poll:
                self._next_poll = now + POLL_SECONDS
                self._collect(now)
        elif self.trigger.enabled and self.trigger.due(step, now):
            self.trigger.reset(step, now)
            self._submit(step, recent_returns, now)

    def _submit(self, step: int, recent_returns: Sequence[float], now: float) -> None:
        job = {"step": step, "weights": policy_weights(self.learner.net.policy()),
               "recent_returns": [float(r) for r in recent_returns[-RECENT_GAMES:]],
               "created_at": time.time()}
        try:
            if self._worker is None or not self._worker.is_alive():
                self._start_worker()
            self._jobs.put(job)
        except OSError as exc:
            reason = first_line(exc, 200, typed=True)
            self._failed(step, f"cannot start the publisher process ({reason})")
            return
        self._in_flight = (step, now)
        self._next_poll = now + POLL_SECONDS

    def _start_worker(self) -> None:
        self._stop_worker()
        setup = self.setup()
        self._jobs, self._results = self._context.Queue(), self._context.Queue()
        self._worker = self._context.Process(target=serve, args=(setup, self._jobs,
                                                                 self._results),
                                             name="policy-publisher", daemon=True)
        self._worker.start()

    def setup(self) -> dict[str, Any]:
        """What the publisher process starts from: plain data that pickles. The signer
        travels as its key file's bytes and is rebuilt there (a key object does not pickle)."""
        export = self.config.export
        key = (self.key.material, self.key.name) if self.key is not None else None
        return {"config": to_dict(self.config), "spec": self.spec,
                "directory": str(self.directory), "key": key, "keep": export.keep,
                "niceness": export.niceness, "parent": os.getpid(), "run": self.run}

    def _collect(self, now: float) -> None:
        step, started = self._in_flight
        try:
            result = self._results.get_nowait()
        except queue.Empty:
            if not self._worker.is_alive():
                code = self._worker.exitcode
                self._stop_worker()
                self._failed(step, f"the publisher process died (exit code {code})")
            elif now - started > self.config.export.timeout_seconds:
                self._stop_worker()
                self._failed(step, f"export still running after "
                                   f"{self.config.export.timeout_seconds:.0f} s: stopped")
            return
        self._in_flight = None
        if "error" in result:
            self._failed(step, result["error"])
            return
        entry = result["entry"]
        self.counts.published += 1
        self.counts.last_step = entry["step"]
        self.last_error = None
        self.last_export_seconds = now - started
        log.info("published %s (%ssha256 %s..., %d bytes, mean return %s of %d recent "
                 "games, max logit diff %.2g) in %.1f s", entry["file"],
                 f"run {entry['run']} sequence {entry['sequence']}, " if "run" in entry else "",
                 entry["sha256"][:12], entry["size"], entry["mean_return"],
                 entry["recent_games"],
                 entry["parity"]["max_abs_logit_diff"], now - started)

    def _failed(self, step: int, why: str) -> None:
        self._in_flight = None
        self.counters.faults.export_failures += 1
        self.last_error = f"step {step}: {why}"
        log.error("policy at step %d not published: %s%s", step, why,
                  "" if self._stopping else "; retrying at the next interval")

    # -- status and shutdown -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The `publishing` block of status.json."""
        return {"enabled": self.trigger.enabled, "published": self.counts.published,
                "last_step": self.counts.last_step,
                "in_flight_step": self._in_flight[0] if self._in_flight else None,
                "last_export_seconds": None if self.last_export_seconds is None
                else round(self.last_export_seconds, 3),
                "last_error": self.last_error}

    def publish_final(self, step: int, recent_returns: Sequence[float]) -> None:
        """At a clean stop (export.on_stop): the policy of `step`, unless it is the newest
        published already. An export in flight finishes first; both together wait at most
        CLOSE_GRACE_SECONDS."""
        self._stopping = True
        if not (self.trigger.enabled and self.config.export.on_stop):
            return
        deadline = self._close_deadline = time.monotonic() + CLOSE_GRACE_SECONDS
        self._wait(deadline)
        if self._in_flight is not None or self.counts.last_step == step:
            return  # close() reports an export still running
        log.info("publishing the final policy, step %d (waiting up to %.0f s)", step,
                 deadline - time.monotonic())
        self._submit(step, recent_returns, time.monotonic())
        self._wait(deadline)

    def close(self) -> None:
        """Let an export in flight finish, then stop the process: up to CLOSE_GRACE_SECONDS
        from here, or from publish_final's start (the stop waits once, not twice)."""
        self._stopping = True
        if self._in_flight is not None and self._worker is not None:
            deadline = self._close_deadline or time.monotonic() + CLOSE_GRACE_SECONDS
            if time.monotonic() < deadline:
                log.info("waiting up to %.0f s for the export of step %d",
                         deadline - time.monotonic(), self._in_flight[0])
            self._wait(deadline)
            if self._in_flight is not None:
                self._failed(self._in_flight[0], "the daemon stopped first")
        self._stop_worker()

    def _wait(self, deadline: float) -> None:
        """Until the export in flight (if any) is collected, or `deadline`."""
        while self._in_flight is not None and self._worker is not None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
            self._collect(time.monotonic())

    def _stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._jobs.put(None)
        worker.join(timeout=5)
        if worker.is_alive():
            worker.terminate()
            worker.join(timeout=5)
        for q in (self._jobs, self._results):
            q.cancel_join_thread()  # never hang the daemon's exit on a dead reader
            q.close()


# -- the publisher process ---------------------------------------------------------------------


def serve(setup: dict[str, Any], jobs: Any, results: Any) -> None:
    """The publisher process: one job (a weight snapshot) at a time until None arrives or
    the daemon is gone. Every failure is reported back as one line, never raised."""
    with contextlib.suppress(OSError):
        os.nice(setup["niceness"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the daemon's to handle
    torch.set_num_threads(1)
    writer: PolicyWriter | None = None
    with contextlib.suppress(Exception):  # ready before the first job; else retried below
        writer = PolicyWriter.from_setup(setup)
    while True:
        try:
            job = jobs.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != setup["parent"]:
                return  # the daemon died without saying goodbye
            continue
        if job is None:
            return
        try:
            writer = writer or PolicyWriter.from_setup(setup)
            results.put({"entry": writer.publish(job)})
        except (ExportError, VerificationError) as exc:
            results.put({"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - reported, and the daemon goes on
            results.put({"error": first_line(exc, 200, typed=True)})


class PolicyWriter:
    """Exports, verifies and publishes weight snapshots into the policies directory."""

    def __init__(self, config: Config, spec: dict[str, Any], directory: Path,
                 key: Signer | bytes | None, keep: int, run: dict[str, Any] | None = None,
                 reuse_graph: bool = True) -> None:
        """`key`: what entries are signed with (bytes: an HMAC secret; None: unsigned);
        `run`: the run identity every entry names (None: entries as daemons before run
        identities wrote them); `reuse_graph=False` exports every policy in full (the
        baseline tools/bench/publish.py measures against)."""
        self.reuse_graph = reuse_graph
        self.graph: ActorGraph | None = None
        self.graph_tried = False
        self.config = config
        self.run = run
        self.spec = spec
        self.directory = directory
        self.key = key
        self.keep = keep
        shape, actions = tuple(spec["observation_shape"]), int(spec["num_actions"])
        self.builder = ActorBuilder(config, shape, actions)
        self.stream_spec = stream_spec(config, config.seed)
        metadata, self.frames = training_frames(self._metadata(0), PARITY_FRAMES,
                                                config.seed, "publisher")
        check_actor_fits(metadata, list(shape), actions, "publisher")
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".staged-*"):
            stale.unlink(missing_ok=True)  # an export cut short by a kill
        self.entries = read_manifest(directory)

    @classmethod
    def from_setup(cls, setup: dict[str, Any]) -> PolicyWriter:
        key = Signer.load(*setup["key"]) if setup["key"] is not None else None
        return cls(from_dict(setup["config"]), setup["spec"], Path(setup["directory"]),
                   key, setup["keep"], setup.get("run"))

    def _metadata(self, step: int) -> dict[str, str]:
        return build_metadata(self.config, self.stream_spec, step, self.spec["network"],
                              producer="runtime.daemon")

    def _write(self, actor: torch.nn.Module, metadata: dict[str, str],
               staged: Path) -> dict[str, Any]:
        """The weights written into the actor's graph, exported once by the first call;
        a full export where the graph does not take every weight, or from the first
        written model that fails its checks on."""
        if self.reuse_graph and not self.graph_tried:
            self.graph = ActorGraph.export(actor, self.frames[:2],
                                           staged.with_name(f"{staged.name}.graph"))
            self.graph_tried = True  # the network does not change: one graph per process
        if self.graph is not None:
            try:
                return self.graph.write_verified(actor, metadata, self.frames, staged)
            except VerificationError:
                self.graph = None
        return export_verified(actor, metadata, self.frames, staged)

    def publish(self, job: dict[str, Any]) -> dict[str, Any]:
        step = int(job["step"])
        actor = self.builder.load(job["weights"])
        name = policy_file(step)
        staged = self.directory / f".staged-{name}"
        try:
            parity = self._write(actor, self._metadata(step), staged)
            with open(staged, "rb") as f:
                os.fsync(f.fileno())
            final = self.directory / name
            os.replace(staged, final)
        finally:
            staged.unlink(missing_ok=True)
        returns = job["recent_returns"]
        entry = {"format": FORMAT, "step": step, "file": name, "sha256": sha256_file(final),
                 "size": final.stat().st_size, "env_id": self.config.env.id,
                 "observation_shape": list(self.spec["observation_shape"]),
                 "observation_dtype": self.spec["observation_dtype"],
                 "num_actions": int(self.spec["num_actions"]),
                 "network": self.spec["network"],
                 "mean_return": round(sum(returns) / len(returns), 4) if returns else None,
                 "recent_games": len(returns), "parity": parity,
                 "created_at": round(float(job["created_at"]), 3)}
        if self.run is not None:
            entry.update(run_fields(self.run, next_sequence(self.entries)))
        if self.key is not None:
            entry = sign(entry, self.key)
        # In publishing order: the newest is what devices poll, whatever its step.
        kept = ([e for e in self.entries if e.get("step") != step] + [entry])[-self.keep:]
        write_atomic(self.directory / MANIFEST, manifest_bytes(kept))
        write_atomic(self.directory / LATEST, index_bytes(entry))
        self.entries = kept
        names = {e["file"] for e in kept}
        for old in self.directory.glob("policy-*.onnx"):
            if old.name not in names:
                old.unlink(missing_ok=True)  # after the manifest stopped naming it
        return entry

