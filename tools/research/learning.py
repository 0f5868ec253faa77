"""Learning benchmark: run a preset through the daemon for a budget of agent steps.

    python tools/research/learning.py --preset default --steps 1000000 [--run-dir DIR]

It *is* the daemon (a subprocess), so a stopped benchmark resumes from its checkpoint when
started again. At the end it prints one JSON object: mean return of the last 100 whole
games, games, steps, wall time of the daemon's runs and steps/s. Curves:
`python tools/research/plot_metrics.py RUN_DIR [RUN_DIR ...] --out curve.png`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runtime.files import write_atomic
from runtime.metrics import metrics_path, read_jsonl
from tools import ROOT

PRESETS = {"default": ROOT / "config.yaml", "seed": ROOT / "presets" / "seed.yaml"}


def begin_record(run_dir: Path) -> dict[str, Any]:
    """bench.json, the record of a run's wall time: begun on the first start with the step
    the run stands at (0, or the archive's step for a run restored by archive_run), since
    its wall time only covers the steps learned from there."""
    bench, status = run_dir / "bench.json", run_dir / "status.json"
    record = json.loads(bench.read_text()) if bench.exists() else {}
    if "wall_s" not in record:
        record["start_step"] = json.loads(status.read_text())["step"] if status.exists() else 0
        record["wall_s"] = 0.0
    return record


def summarize(run_dir: Path) -> dict[str, float | int | str]:
    """Figures of a run directory: last-100-game mean return, wall time and steps/s."""
    games = read_jsonl(metrics_path(run_dir))  # a torn line from a kill is skipped
    record = json.loads((run_dir / "bench.json").read_text()) \
        if (run_dir / "bench.json").exists() else {}
    wall = record.get("wall_s", float("nan"))
    steps = json.loads((run_dir / "status.json").read_text())["step"]
    # a record begun before start_step existed covered the run from step 0
    learned = steps - record.get("start_step", 0)
    last = [g["return"] for g in games[-100:]]
    return {"run_dir": str(run_dir), "steps": steps, "games": len(games),
            "mean_return_last_100": round(sum(last) / max(len(last), 1), 3),
            "wall_s": round(wall, 1), "steps_per_s": round(learned / wall, 1) if wall else 0.0}


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
    record = begin_record(run_dir)
    started = time.monotonic()
    code = subprocess.call(command, cwd=ROOT)
    record.update(preset=args.preset, wall_s=record["wall_s"] + time.monotonic() - started)
    write_atomic(run_dir / "bench.json", json.dumps(record).encode())  # a kill leaves it whole
    if code != 0:
        print(f"bench_learning: the daemon exited {code}", file=sys.stderr)
        return code
    print(json.dumps({"preset": args.preset, **summarize(run_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
