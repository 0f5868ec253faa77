"""Learning benchmark: run a preset through the daemon for a budget of agent steps.

    python tools/bench_learning.py --preset default --steps 1000000 [--run-dir DIR]

It *is* the daemon (a subprocess), so a stopped benchmark resumes from its checkpoint when
started again. At the end it prints one JSON object: mean return of the last 100 whole
games, games, steps, wall time of the daemon's runs and steps/s. Curves:
`python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] --out curve.png`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from runtime.metrics import metrics_path, read_jsonl
from tools import ROOT

PRESETS = {"default": ROOT / "config.yaml", "seed": ROOT / "presets" / "seed.yaml"}


def summarize(run_dir: Path) -> dict[str, float | int | str]:
    """Figures of a run directory: last-100-game mean return, wall time and steps/s."""
    games = read_jsonl(metrics_path(run_dir))  # a torn line from a kill is skipped
    wall = json.loads((run_dir / "bench.json").read_text())["wall_s"] \
        if (run_dir / "bench.json").exists() else float("nan")
    steps = json.loads((run_dir / "status.json").read_text())["step"]
    last = [g["return"] for g in games[-100:]]
    return {"run_dir": str(run_dir), "steps": steps, "games": len(games),
            "mean_return_last_100": round(sum(last) / max(len(last), 1), 3),
            "wall_s": round(wall, 1), "steps_per_s": round(steps / wall, 1) if wall else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or ROOT / "runs" / f"bench-{args.preset}"
    command = [sys.executable, "-m", "runtime.daemon", "--config", str(PRESETS[args.preset]),
               "--run-dir", str(run_dir), "--max-steps", str(args.steps),
               "--set", "checkpoint.every_steps=50000"]
    for assignment in args.set:
        command += ["--set", assignment]
    started = time.monotonic()
    code = subprocess.call(command, cwd=ROOT)
    bench = run_dir / "bench.json"
    wall = json.loads(bench.read_text())["wall_s"] if bench.exists() else 0.0
    bench.write_text(json.dumps({"preset": args.preset,
                                 "wall_s": wall + time.monotonic() - started}))
    if code != 0:
        print(f"bench_learning: the daemon exited {code}", file=sys.stderr)
        return code
    print(json.dumps({"preset": args.preset, **summarize(run_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
