"""Does the daemon run as it did at another commit? The same runs in both trees, compared.

    python tools/bench/same_run.py --base REV [--steps 3000] [--case NAME ...]

REV is checked out into a temporary git worktree. In each tree the daemon (that tree's
code and config.yaml, `python -m runtime.daemon`, publishing off) learns each case from
scratch for --steps agent steps. Then the game records of metrics.jsonl (every field but
`time` and `steps_per_s`) and the final checkpoint's learner state and counters are
compared. Prints one JSON object: per case, identical or the first difference found.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from runtime.daemon.checkpoints import CheckpointStore, read_checkpoint
from runtime.metrics import read_jsonl
from tools import ROOT
from tools.bench.versions import worktree

CASES = {
    "breakout": [],
    "cartpole-obgd": ["env.id=CartPole-v1"],
    "cartpole-adam": ["env.id=CartPole-v1", "agent.optimizer=adam", "agent.lr=0.001"],
}
UNTIMED = ("time", "steps_per_s")  # what may differ between two runs of the same numbers


def run(tree: Path, run_dir: Path, steps: int, sets: list[str]) -> tuple[list, dict]:
    """The game records and the final checkpoint of one daemon run in `tree`."""
    overrides = [*sets, "export.every_steps=null", "export.every_seconds=null"]
    command = [sys.executable, "-m", "runtime.daemon", "--config", "config.yaml",
               "--run-dir", str(run_dir), "--max-steps", str(steps)]
    for line in overrides:
        command += ["--set", line]
    subprocess.run(command, cwd=tree, check=True, capture_output=True)
    games = [{k: v for k, v in g.items() if k not in UNTIMED}
             for g in read_jsonl(run_dir / "metrics.jsonl")]
    return games, read_checkpoint(CheckpointStore(run_dir / "checkpoints", 1).paths()[0])


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Where two nested states first differ (tensors bit for bit), or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
            and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return None if same else where or "tensor"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(a.keys() ^ b.keys())}"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}.{k}"))),
                    None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: lengths {len(a)} and {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b, strict=True))
                     if (d := first_difference(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where}: {a!r} != {b!r}"


def compare(base: Path, steps: int, sets: list[str], scratch: Path) -> dict[str, Any]:
    ours, theirs = run(ROOT, scratch / "ours", steps, sets), \
        run(base, scratch / "base", steps, sets)
    games = first_difference(ours[0], theirs[0], "games")
    state = next((d for key in ("learner", "counters")
                  if (d := first_difference(ours[1][key], theirs[1][key], key))), None)
    return {"games": len(ours[0]), "identical": games is None and state is None,
            "first_difference": games or state}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--case", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch, \
            worktree(args.base, Path(scratch) / "base", "same_run") as base:
        if base is None:
            return 2
        results = {name: compare(base, args.steps, CASES[name], Path(scratch) / name)
                   for name in args.case}
    print(json.dumps({"base": args.base, "steps": args.steps, "cases": results}, indent=1))
    return 0 if all(r["identical"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
