"""Kill the daemon with SIGKILL at random moments, restart it, and check nothing was lost.

    python tools/soak_kill.py [--kills 200] [--run-dir DIR] [--seed 0] [--env CartPole-v1]

After every kill: each published checkpoint must verify and load; the newest checkpoint's
step never goes backwards; metrics.jsonl holds valid JSON lines except at most one torn
last line, which the next start repairs. Each start after the first checkpoint must resume
from one.
Checkpoints are written every few steps so that many kills land inside a write. Prints a
JSON summary; exit 1 on the first violation.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from runtime.daemon.checkpoints import CheckpointError, CheckpointStore, read_checkpoint  # noqa: E402


class Violation(Exception):
    pass


def _start(run_dir: Path, env_id: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "runtime.daemon", "--config", str(ROOT / "config.yaml"),
               "--run-dir", str(run_dir), "--set", f"env.id={env_id}",
               "--set", "checkpoint.every_steps=25", "--set", "log.status_every_seconds=0.1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


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


def soak(run_dir: Path, kills: int, seed: int, env_id: str = "CartPole-v1") -> dict:
    rng = random.Random(seed)
    newest, torn_lines, during_writes = 0, 0, 0
    for cycle in range(kills):
        proc = _start(run_dir, env_id)
        if cycle % 2:  # odd cycles: a random moment from process start, startup included
            time.sleep(rng.uniform(0.0, 2.5))
        else:          # even cycles: a random moment while learning
            _wait_learning(run_dir, proc)
            time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if list((run_dir / "checkpoints").glob(".ckpt-*.tmp-*")):
            during_writes += 1
        newest, torn = check_run_dir(run_dir, newest)
        torn_lines += torn
    proc = _start(run_dir, env_id)  # a last clean run must resume and stop cleanly
    _wait_learning(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    if proc.wait(timeout=120) != 0:
        raise Violation(f"the final clean run exited {proc.returncode}")
    final, torn = check_run_dir(run_dir, newest)
    if torn:
        raise Violation("metrics.jsonl still has a torn line after a clean run")
    log = (run_dir / "daemon.log").read_text()
    # Every start after the first published checkpoint must resume from one, never start
    # fresh (how many starts got that far before their kill depends on machine load).
    first_checkpoint = log.find("INFO runtime.daemon: checkpoint ckpt-")
    if first_checkpoint >= 0 and "starting fresh" in log[first_checkpoint:]:
        raise Violation("a start after a published checkpoint started fresh")
    return {"kills": kills, "kills_during_checkpoint_write": during_writes,
            "torn_metrics_lines_repaired": torn_lines, "resumes": log.count("resumed from"),
            "final_step": final, "violations": 0}


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
