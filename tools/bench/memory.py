"""Memory over a long run: the daemon's RSS at 10k steps vs at the end (a leak test).

    python tools/bench/memory.py [--steps 200000] [--config config.yaml]

Runs the daemon in a fresh temporary run directory, polls status.json, and prints one
JSON object: rss_mb at 10k steps and at the end, growth in percent, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools import ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--first", type=int, default=10_000)
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    args = parser.parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-memory-")) / "run"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.daemon", "--config", args.config,
                             "--run-dir", str(run_dir), "--max-steps", str(args.steps),
                             "--set", "log.status_every_seconds=1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[int, float]] = []
    while proc.poll() is None:
        time.sleep(1.0)
        try:
            status = json.loads((run_dir / "status.json").read_text())
        except (OSError, ValueError):
            continue
        samples.append((status["step"], status["rss_mb"]))
        peak = status["peak_rss_mb"]
    first = next((rss for step, rss in samples if step >= args.first), None)
    last = samples[-1][1] if samples else None
    if proc.returncode != 0 or first is None or last is None:
        print(f"bench_memory: the daemon exited {proc.returncode}", file=sys.stderr)
        return 1
    print(json.dumps({"steps": samples[-1][0], f"rss_mb_at_{args.first}": first,
                      "rss_mb_at_end": last, "growth_percent": round(100 * (last / first - 1), 2),
                      "peak_rss_mb": peak, "config": args.config}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
