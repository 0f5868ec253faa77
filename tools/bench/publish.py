"""What publishing policies costs the learning loop, measured side by side in one run.

    python tools/bench/publish.py [--env CartPole-v1] [--blocks 6] [--block-steps 2000]
        [--niceness 10] [--set KEY=VALUE ...]

The daemon's loop (ActingLoop + A2CLearner) runs alternating blocks of --block-steps steps:
"off" blocks without a publisher, "on" blocks with runtime.daemon.publish.Publisher ticking
after every step exactly as the daemon calls it, one export due at the first step of each
"on" block (a weight snapshot handed to the publisher process, which exports, verifies and
publishes while the loop goes on). Each "on" block ends by waiting, outside the timing, for
its export to finish, so an export never runs into an "off" block; a first export before
the blocks starts the publisher process. Per step the wall time of step + tick is
recorded. Prints one JSON object: steps/s per mode (median, min, max over blocks) and their
ratio, per-step time p50 / p99 / max per mode, the tick that hands a snapshot over (the
loop's pause for an export; the first one also starts the publisher process) and the
longest step around it, the export times, and how much of the "on" time an export was
running. Before the blocks, `writer` compares what one policy costs the publisher
(`PolicyWriter.publish` in this process, wall and CPU seconds, alternating rounds): a full
export against the new weights written into the graph of the first export.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.learner import A2CLearner
from runtime.daemon.config import Config, load_config
from runtime.daemon.export import policy_weights
from runtime.daemon.lifecycle import configure_torch
from runtime.daemon.loop import ActingLoop, Counters
from runtime.daemon.publish import PolicyWriter, Publisher
from runtime.streams import open_stream
from tools import ROOT


def _spread(values: list[float], digits: int = 1) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


def _step_ms(durations: list[float]) -> dict[str, float]:
    ms = np.asarray(durations) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3), "max": round(float(ms.max()), 3)}


class BlockStart:
    """The publisher's trigger for the benchmark: due once after each arm()."""

    enabled = True

    def __init__(self) -> None:
        self.armed = False

    def arm(self) -> None:
        self.armed = True

    def due(self, step: int, now: float) -> bool:
        return self.armed

    def reset(self, step: int, now: float) -> None:
        self.armed = False


def writer_costs(config: Config, spec: dict, learner: A2CLearner, work: Path,
                 rounds: int) -> dict:
    """One policy's cost in the publisher, in this process, alternating per round: a full
    export (reuse_graph=False, the baseline) against weights written into the graph
    exported by the first call (that first call, graph export included, apart)."""
    writers = {"full_export": PolicyWriter(config, spec, work / "full", None, keep=2,
                                           reuse_graph=False),
               "into_graph": PolicyWriter(config, spec, work / "graph", None, keep=2)}

    def publish(writer: PolicyWriter, step: int) -> tuple[float, float]:
        job = {"step": step, "weights": policy_weights(learner.net.policy()),
               "recent_returns": [], "created_at": time.time()}
        wall, cpu = time.perf_counter(), time.process_time()
        writer.publish(job)
        return time.perf_counter() - wall, time.process_time() - cpu

    first_wall, first_cpu = publish(writers["into_graph"], 1)
    walls: dict[str, list[float]] = {mode: [] for mode in writers}
    cpus: dict[str, list[float]] = {mode: [] for mode in writers}
    for step in range(2, rounds + 2):
        for mode, writer in writers.items():
            wall, cpu = publish(writer, step)
            walls[mode].append(wall)
            cpus[mode].append(cpu)
    median = statistics.median
    return {"rounds": rounds,
            "wall_s": {mode: _spread(values, 3) for mode, values in walls.items()},
            "cpu_s": {mode: _spread(values, 3) for mode, values in cpus.items()},
            "cpu_full_over_graph": round(median(cpus["full_export"])
                                         / median(cpus["into_graph"]), 1),
            "first_into_graph_s": {"wall": round(first_wall, 2), "cpu": round(first_cpu, 2)}}


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    config = load_config(ROOT / "config.yaml", [f"env.id={args.env}", f"run.dir={work}",
                                                f"export.niceness={args.niceness}",
                                                *args.set])
    stream = open_stream(config.env, config.seed)
    learner = A2CLearner(config.agent, stream.spec.observation_shape, stream.spec.num_actions,
                         seed=config.seed)
    configure_torch(config, learner.network_name)
    counters = Counters()
    loop = ActingLoop(learner, stream, counters)
    spec = {"network": learner.network_name, "num_actions": stream.spec.num_actions,
            "observation_shape": list(stream.spec.observation_shape),
            "observation_dtype": stream.spec.observation_dtype}
    writer = writer_costs(config, spec, learner, work, args.writer_rounds) \
        if args.writer_rounds else None
    publisher = Publisher(config, work, learner, spec, counters)
    publisher.trigger = trigger = BlockStart()  # one export at the start of each "on" block
    returns = [0.0]

    def finish_export() -> float:
        start = time.monotonic()
        while publisher.status()["in_flight_step"] is not None:
            time.sleep(0.01)
            publisher.tick(counters.steps, time.monotonic(), returns)
        return time.monotonic() - start

    while counters.steps < args.block_steps:  # warm up; the first export starts the process
        loop.step()
    trigger.arm()
    t0 = time.perf_counter()
    publisher.tick(counters.steps, time.monotonic(), returns)
    first_handover_s = time.perf_counter() - t0
    first_export_s = finish_export()
    rates: dict[str, list[float]] = {"off": [], "on": []}
    steps_s: dict[str, list[float]] = {"off": [], "on": []}
    submit_s: list[float] = []  # the tick that hands a snapshot over
    submit_step_s: list[float] = []  # ... and the whole step around it
    export_s: list[float] = []
    busy_fraction: list[float] = []
    clock = time.perf_counter
    try:
        for block in range(2 * args.blocks):
            mode = "on" if block % 2 else "off"
            durations, busy, submitted_at = [], 0.0, None
            if mode == "on":
                trigger.arm()
            start = clock()
            for _ in range(args.block_steps):
                t0 = clock()
                summary = loop.step()
                if summary is not None:
                    returns.append(summary.game_return)
                if mode == "on":
                    was_idle = publisher.status()["in_flight_step"] is None
                    t1 = clock()
                    publisher.tick(counters.steps, time.monotonic(), returns)
                    t2 = clock()
                    in_flight = publisher.status()["in_flight_step"] is not None
                    if was_idle and in_flight:
                        submit_s.append(t2 - t1)
                        submit_step_s.append(t2 - t0)
                        submitted_at = t0
                    elif submitted_at is not None and not in_flight:
                        export_s.append(clock() - submitted_at)
                        busy += clock() - submitted_at
                        submitted_at = None
                durations.append(clock() - t0)
            elapsed = clock() - start
            if mode == "on":
                if submitted_at is not None:
                    busy += clock() - submitted_at
                    export_s.append(clock() - submitted_at + finish_export())
                busy_fraction.append(busy / elapsed)
            rates[mode].append(args.block_steps / elapsed)
            steps_s[mode].extend(durations)
    finally:
        publisher.close()
        stream.close()
    return {
        "env": args.env, "network": learner.network_name, "blocks_per_mode": args.blocks,
        "block_steps": args.block_steps, "niceness": args.niceness,
        "steps_per_s": {mode: _spread(values) for mode, values in rates.items()},
        "on_over_off": round(statistics.median(rates["on"]) / statistics.median(rates["off"]),
                             3),
        "step_ms": {mode: _step_ms(values) for mode, values in steps_s.items()},
        "handover_ms": {"max": round(max(submit_s) * 1e3, 3),
                        "median": round(statistics.median(submit_s) * 1e3, 3)},
        "handover_step_ms_max": round(max(submit_step_s) * 1e3, 3),
        "first_handover_ms": round(first_handover_s * 1e3, 1),
        "export_s": _spread(export_s, 2), "first_export_s": round(first_export_s, 2),
        "on_time_with_export_running": round(statistics.median(busy_fraction), 3),
        "published": publisher.counts.published, "export_failures": counters.faults.export_failures,
        "policies": str(work / "policies"), "writer": writer,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--blocks", type=int, default=6, help="blocks per mode")
    parser.add_argument("--block-steps", type=int, default=2000)
    parser.add_argument("--niceness", type=int, default=10, help="export.niceness")
    parser.add_argument("--writer-rounds", type=int, default=5, help="rounds of the "
                        "writer's cost per policy, full export against into the graph "
                        "(0: skip)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. agent.network=stream")
    print(json.dumps(run(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
