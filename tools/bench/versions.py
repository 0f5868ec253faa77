"""Steps/s of the daemon's loop at two commits, side by side: is a change any slower?

    python tools/bench/versions.py --base REV [--rounds 4] [--blocks 3] [--block-steps 300]
        [--learner-only] [--set KEY=VALUE ...]

REV is checked out into a temporary git worktree. Each round runs the loop of REV and of
the working tree, one after the other, in fresh processes (`daemon_loop` of each tree's own
tools/bench/throughput.py, default config.yaml plus the --set lines, Breakout), so the
noise of a shared machine hits both alike. `--learner-only` times `learner_only` instead:
act and update on recorded frames, no emulator. Start-up (and compiling) is left out:
each process warms up on 100 steps first. Prints one JSON object: the median steps/s of
each tree, their ratio (working tree / REV) and the ratio of each round's medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tools import ROOT

# Run inside each tree (cwd): its own code, its own benchmark's daemon_loop.
_PROBE = """
import importlib.util, json, sys, time
from collections.abc import Iterator
from pathlib import Path
tree = Path.cwd()
sys.path.insert(0, str(tree))
spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
blocks, block_steps, loop = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
overrides = tuple(sys.argv[5:])
step = getattr(bench, loop)(tree / "config.yaml", overrides)
for _ in range(100):  # warm-up: allocator, oneDNN primitive caches
    step()
rates = []
for _ in range(blocks):
    start = time.perf_counter()
    for _ in range(block_steps):
        step()
    rates.append(block_steps / (time.perf_counter() - start))
print(json.dumps(rates))
"""


def throughput_bench(tree: Path) -> Path:
    """The tree's tools/bench/throughput.py, or tools/bench_throughput.py in a tree from
    before tools/ was split by purpose, so that --base can name an older commit."""
    new = tree / "tools" / "bench" / "throughput.py"
    return new if new.exists() else tree / "tools" / "bench_throughput.py"


@contextlib.contextmanager
def worktree(rev: str, path: Path, tool: str) -> Iterator[Path | None]:
    """REV checked out at `path` as a temporary git worktree, removed afterwards; None
    (after one line on stderr) when git cannot check it out."""
    added = subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT,
                           capture_output=True, text=True)
    if added.returncode != 0:
        lines = added.stderr.strip().splitlines() or ["git worktree add failed"]
        print(f"{tool}: error: --base {rev}: {lines[-1]}", file=sys.stderr)
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT,
                       check=False, capture_output=True)


def rates_in(tree: Path, blocks: int, block_steps: int, loop: str, overrides: list[str]
             ) -> list[float]:
    done = subprocess.run([sys.executable, "-c", _PROBE, str(throughput_bench(tree)), str(blocks),
                           str(block_steps), loop, *overrides],
                          cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--block-steps", type=int, default=300)
    parser.add_argument("--learner-only", action="store_true",
                        help="time the learner on recorded frames, without the emulator")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch, \
            worktree(args.base, Path(scratch) / "base", "bench_versions") as base_tree:
        if base_tree is None:
            return 2
        loop = "learner_only" if args.learner_only else "daemon_loop"
        rounds = [{name: rates_in(tree, args.blocks, args.block_steps, loop, args.set)
                   for name, tree in (("base", base_tree), ("current", ROOT))}
                  for _ in range(args.rounds)]
    medians = {name: statistics.median(r for one in rounds for r in one[name])
               for name in ("base", "current")}
    print(json.dumps({
        "base": args.base, "loop": "learner only" if args.learner_only else "daemon",
        "overrides": args.set,
        "steps_per_s_median": {k: round(v, 1) for k, v in medians.items()},
        "ratio_current_over_base": round(medians["current"] / medians["base"], 3),
        "ratio_per_round": [round(statistics.median(one["current"])
                                  / statistics.median(one["base"]), 3) for one in rounds],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
