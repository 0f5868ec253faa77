"""Torch operations dispatched per learner step, counted by torch's profiler.

    python tools/bench/ops.py [--tree DIR] [--steps 200] [--set KEY=VALUE ...]

Runs `learner_only` (act and update on recorded Breakout frames, default config plus the
--set lines) of the tree at DIR (default: this one), warms it up, then counts the
operations torch's profiler records at the ATen level per step, and how many of them ran
inside a compiled graph. Give another tree (e.g. a `git worktree` of an older commit) to
compare. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from tools import ROOT
from tools.bench.versions import throughput_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    tree = args.tree.resolve()
    sys.path.insert(0, str(tree))  # that tree's agent and runtime
    spec = importlib.util.spec_from_file_location("bench", throughput_bench(tree))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from torch.profiler import ProfilerActivity, profile

    step = bench.learner_only(tree / "config.yaml", tuple(args.set))
    for _ in range(100):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    # ATen calls made by a compiled graph (its extern kernels: convolutions, matmuls)
    graphs = [e for e in events if e.name.startswith("## Call CompiledFxGraph")]
    def in_graph(event: object) -> bool:
        return any(g.time_range.start <= event.time_range.start
                   and event.time_range.end <= g.time_range.end for g in graphs)

    # dispatched one by one from Python: no ATen operation above it, not in a graph
    top = [e for e in aten if (e.cpu_parent is None or not e.cpu_parent.name.startswith(
        "aten::")) and not in_graph(e)]
    per_step = lambda n: round(n / args.steps, 1)  # noqa: E731
    print(json.dumps({"tree": str(tree), "steps": args.steps,
                      "aten_ops_per_step": per_step(len(aten)),
                      "dispatched_from_python_per_step": per_step(len(top)),
                      "inside_compiled_graphs_per_step": per_step(sum(map(in_graph, aten))),
                      "compiled_graph_calls_per_step": per_step(len(graphs))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
