"""Kill the daemon with SIGKILL at random moments, restart it, and check nothing was lost.

    python tools/bench/soak_kill.py [--kills 200] [--run-dir DIR] [--seed 0] [--env CartPole-v1]

After every kill: each published checkpoint must verify and load; the newest checkpoint's
step never goes backwards; metrics.jsonl holds valid JSON lines except at most one torn
last line. Every start that finds a published checkpoint must resume from it (never start
fresh). Checkpoints are written every 25 steps, and every third kill is aimed at a write
(the daemon is killed the moment a checkpoint's temporary file appears). At the end a clean
run stops with SIGTERM at step F, and an uninterrupted run to F must match it: every game
recorded once (episodes 1..n, the status game counter n), the same records apart from
wall-clock fields, the same learner, counters and stream position. Prints a JSON summary
of what happened; exit 1 on the first violation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from runtime.daemon.checkpoints import CheckpointError, CheckpointStore, read_checkpoint
from tools import ROOT

# Steps the last clean run learns before its SIGTERM.
FINAL_RUN_STEPS = 300


class Violation(Exception):
    pass


def _command(run_dir: Path, env_id: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "runtime.daemon", "--config", str(ROOT / "config.yaml"),
            "--run-dir", str(run_dir), "--set", f"env.id={env_id}",
            "--set", "checkpoint.every_steps=25", "--set", "log.status_every_seconds=0.1",
            *extra]


def _start(run_dir: Path, env_id: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(_command(run_dir, env_id), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _writing(checkpoints: Path) -> bool:
    """A checkpoint's temporary file is there: a write is under way (or was cut off)."""
    try:
        return any(name.startswith(".ckpt-") for name in os.listdir(checkpoints))
    except FileNotFoundError:
        return False


def _kill_during_a_write(run_dir: Path, proc: subprocess.Popen[bytes],
                         timeout: float = 30) -> None:
    """Poll for a checkpoint write and kill the daemon the moment one is seen."""
    checkpoints = run_dir / "checkpoints"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not _writing(checkpoints):
        pass


def _wait_learning(run_dir: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Violation(f"the daemon exited {proc.returncode} at start")
        try:
            if json.loads((run_dir / "status.json").read_text())["pid"] == proc.pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise Violation("the daemon never started learning")


def _wait_step(run_dir: Path, proc: subprocess.Popen[bytes], step: int,
               timeout: float = 300) -> None:
    """Wait until the daemon's status file reports `step` or more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Violation(f"the daemon exited {proc.returncode} before step {step}")
        try:
            if json.loads((run_dir / "status.json").read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise Violation(f"the daemon did not reach step {step} in {timeout:.0f} s")


def check_run_dir(run_dir: Path, newest_before: int) -> tuple[int, bool]:
    """Verify the invariants; returns (newest checkpoint step, metrics had a torn line)."""
    store = CheckpointStore(run_dir / "checkpoints", keep=3)
    steps = []
    for path in store.paths():
        try:
            steps.append(int(read_checkpoint(path)["counters"]["steps"]))
        except CheckpointError as exc:
            raise Violation(f"a published checkpoint is unreadable: {exc}") from None
    newest = max(steps, default=0)
    if newest < newest_before:
        raise Violation(f"newest checkpoint went back from step {newest_before} to {newest}")
    torn = False
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_bytes().split(b"\n") if metrics.exists() else []
    for i, line in enumerate(lines):
        try:
            if line.strip():
                json.loads(line)
        except ValueError:
            if i != len(lines) - 1:
                raise Violation(f"metrics.jsonl line {i + 1} is not JSON") from None
            torn = True
    return newest, torn


def _outcome(log: str) -> str:
    """What one start did with the checkpoints it found, from its part of daemon.log."""
    if "resumed from" in log:
        return "resumed"
    return "fresh" if "starting fresh" in log else "killed before restoring"


def _kill_cycles(run_dir: Path, kills: int, seed: int, env_id: str) -> dict[str, int]:
    rng = random.Random(seed)
    figures = dict.fromkeys(("kills_during_checkpoint_write", "aimed_at_a_write",
                             "starts_after_a_checkpoint", "resumed",
                             "killed_before_restoring", "torn_metrics_lines_repaired"), 0)
    newest = 0
    log_path = run_dir / "daemon.log"
    for cycle in range(kills):
        log_start = log_path.stat().st_size if log_path.exists() else 0
        had_checkpoint = newest > 0
        proc = _start(run_dir, env_id)
        if cycle % 3 == 2:    # aimed at a checkpoint write
            _wait_learning(run_dir, proc)
            _kill_during_a_write(run_dir, proc)
            figures["aimed_at_a_write"] += 1
        elif cycle % 3 == 1:  # a random moment from process start, startup included
            time.sleep(rng.uniform(0.0, 2.5))
        else:                 # a random moment while learning
            _wait_learning(run_dir, proc)
            time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        figures["kills_during_checkpoint_write"] += _writing(run_dir / "checkpoints")
        newest, torn = check_run_dir(run_dir, newest)
        figures["torn_metrics_lines_repaired"] += torn
        if had_checkpoint:
            figures["starts_after_a_checkpoint"] += 1
            with open(log_path, "rb") as f:
                f.seek(log_start)
                outcome = _outcome(f.read().decode(errors="replace"))
            if outcome == "fresh":
                raise Violation(f"start {cycle + 1} found a published checkpoint and "
                                f"started fresh")
            figures["resumed" if outcome == "resumed" else "killed_before_restoring"] += 1
    return figures


def _games(run_dir: Path) -> list[dict]:
    """The game records, apart from the wall-clock fields."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "steps_per_s")}
            for line in lines]


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _tensors(obj: object) -> int:
    if isinstance(obj, dict):
        return sum(_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensors(v) for v in obj)
    return int(isinstance(obj, torch.Tensor))


def _compare_with_uninterrupted(run_dir: Path, final: int, env_id: str) -> dict[str, int]:
    """Run to `final` without kills beside the soak; raises Violation on any difference and
    returns what was compared."""
    reference = run_dir.with_name(run_dir.name + "-uninterrupted")
    done = subprocess.run(_command(reference, env_id, "--max-steps", str(final), "--fresh"),
                          cwd=ROOT, capture_output=True, timeout=600)
    if done.returncode != 0:
        raise Violation(f"the uninterrupted run exited {done.returncode}")
    games = _games(run_dir)
    if [g["game"] for g in games] != list(range(1, len(games) + 1)):
        raise Violation("metrics.jsonl does not hold every game exactly once")
    status = json.loads((run_dir / "status.json").read_text())
    if status["games"] != len(games):
        raise Violation(f"{status['games']} games counted, {len(games)} recorded")
    if games != _games(reference):
        raise Violation("metrics.jsonl differs from the uninterrupted run's")
    name = f"ckpt-{final:012d}.pt"
    ours = read_checkpoint(run_dir / "checkpoints" / name)
    theirs = read_checkpoint(reference / "checkpoints" / name)
    for key in ("learner", "counters", "loop"):
        if not _same(ours[key], theirs[key]):
            raise Violation(f"the {key} state at step {final} differs from the "
                            f"uninterrupted run's")
    return {"records": len(games), "state_tensors": _tensors([ours["learner"], ours["loop"]]),
            "stream_state_entries": len(ours["loop"]["stream"] or {})}


def soak(run_dir: Path, kills: int, seed: int, env_id: str = "CartPole-v1") -> dict:
    figures = _kill_cycles(run_dir, kills, seed, env_id)
    newest, _ = check_run_dir(run_dir, 0)
    proc = _start(run_dir, env_id)  # a last clean run must resume and stop cleanly
    _wait_learning(run_dir, proc)
    # It learns a fixed number of steps, not for a fixed time, so that the comparison below
    # covers enough games however slow (or loaded) the machine is.
    _wait_step(run_dir, proc, newest + FINAL_RUN_STEPS)
    proc.send_signal(signal.SIGTERM)
    if proc.wait(timeout=120) != 0:
        raise Violation(f"the final clean run exited {proc.returncode}")
    final, torn = check_run_dir(run_dir, newest)
    if torn:
        raise Violation("metrics.jsonl still has a torn line after a clean run")
    orphaned = sum(len(p.read_text().splitlines())
                   for p in run_dir.glob("metrics.jsonl.orphaned-*"))
    compared = _compare_with_uninterrupted(run_dir, final, env_id)
    return {"kills": kills, **figures, "step_after_kills": newest, "final_step": final,
            "games": json.loads((run_dir / "status.json").read_text())["games"],
            "records_moved_aside_on_restarts": orphaned,
            "equal_to_uninterrupted": compared}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--env", default="CartPole-v1")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="soak-")) / "run"
    started = time.monotonic()
    try:
        result = soak(run_dir, args.kills, args.seed, args.env)
    except Violation as exc:
        print(f"soak_kill: VIOLATION: {exc} (run dir {run_dir})", file=sys.stderr)
        return 1
    print(json.dumps({**result, "run_dir": str(run_dir),
                      "wall_s": round(time.monotonic() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
