"""Sweeps: a grid of configs x --set lines x seeds, each run a daemon, then one table.

    python tools/research/sweep.py --config default --config seed agent.lr=3e-4 --seeds 0 1 2 \\
        [--set-grid "" --set-grid "agent.entropy_floor=null"] [--set KEY=VALUE ...] \\
        --steps 1000000 [--jobs 2 | --ray ADDRESS] [--out-dir runs/sweep]
    python tools/research/sweep.py --out-dir runs/sweep --summarize-only [--at-step 1000000] \\
        [--only NAME ...]

`--config SOURCE [KEY=VALUE ...]` names a preset (default, seed) or a YAML file, with
overrides of its own; every `--set-grid` line (space-separated KEY=VALUE, "" = none)
crosses every config; `--set` applies to all runs. Each run is
`python -m runtime.daemon` in OUT_DIR/<config>[+<overrides>]/seed-<n>, so a sweep is
resumable: a rerun skips runs that reached --steps and restarts the others, which resume
from their newest checkpoints. A run dir keeps a copy of the YAML it started from
(sweep-source.yaml) and its overrides and wall time (bench.json, as tools/research/learning.py
writes it); a rerun that would give a run dir other overrides is refused.

Locally, --jobs daemons run at once; Ctrl-C or SIGTERM stops them with a final checkpoint.
With `--ray ADDRESS` (`auto`, `ray://host:10001`, or `local` for a new local instance
with --jobs CPUs; `pip install 'stream-agent-runtime[ray]'`) each run is a Ray task
(num_cpus=1) on any node. The run dirs must then be on storage every node sees at the same
path, and every node needs this project at the same path or installed.

The table has, per config, each seed's mean return over its last 100 games (before
--at-step K, to read a 1M figure out of a longer run), the mean and the interquartile mean
over seeds with 95% percentile bootstrap intervals (2,000 resamples, seeded; see
tools/research/seed_stats.py), and steps/s (steps over time between the games the run learned, the
times the run was stopped left out; a run restored from an archive counts from the step it
was restored at). On an Atari game with references (tools/research/atari_scores.py) each
figure also has its human-normalised score, and the table ends with the median over the
configs of their mean normalised scores. It also writes OUT_DIR/summary.json
(summary-at-K.json with --at-step, summary-<names>[-at-K].json with --only).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shlex
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from runtime.cli import OneLineParser, UsageError, positive_int
from runtime.daemon.config import ConfigError, load_config
from runtime.files import write_atomic
from runtime.metrics import metrics_path, read_jsonl
from tools import ROOT
from tools.research.atari_scores import human_normalised
from tools.research.daemon_pool import LocalPool, Result, connect_ray, run_on_ray
from tools.research.learning import PRESETS, begin_record, summarize
from tools.research.seed_stats import bootstrap_ci, iqm, last_games_mean

SWEEP_KEYS = ("seed", "run.dir", "run.max_steps")  # the sweep sets these itself
STOPPED_FACTOR = 5.0  # a game this many times slower than its end rate spans a stop
RESAMPLES = 2000


@dataclass(frozen=True)
class Run:
    """One daemon run of the grid."""

    name: str                   # its config variant, e.g. "default+agent.entropy_floor=null"
    seed: int
    run_dir: Path
    source: Path | None         # the YAML it starts from (None: found by --summarize-only)
    overrides: tuple[str, ...]  # every --set its daemon gets, seed=<n> last

    @property
    def label(self) -> str:
        return f"{self.name}/seed-{self.seed}"


def parse_args(argv: list[str] | None) -> Any:
    parser = OneLineParser(prog="sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--config", nargs="+", action="append", default=[],
                        metavar=("SOURCE", "KEY=VALUE"), help="preset or YAML file, with "
                        "overrides of its own (repeat for more configs)")
    parser.add_argument("--set-grid", action="append", default=None, metavar="LINE",
                        help='space-separated KEY=VALUE crossing every config ("" = none)')
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run, e.g. env.id=CartPole-v1")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=positive_int, help="agent steps per run")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="daemons at once (locally, or CPUs of --ray local)")
    parser.add_argument("--ray", metavar="ADDRESS", help="run on Ray: auto, local, ray://...")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "sweep")
    parser.add_argument("--summarize-only", action="store_true",
                        help="aggregate the run dirs that exist; run nothing")
    parser.add_argument("--at-step", type=positive_int, metavar="K",
                        help="figures from the last games that ended by step K")
    parser.add_argument("--window", type=positive_int, default=100, help="games per figure")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="--summarize-only: just "
                        "these configs (run-dir names under --out-dir), in this order")
    args = parser.parse_args(argv)
    if not args.summarize_only and (args.steps is None or not args.config):
        raise UsageError("--config and --steps are needed to run (or --summarize-only)")
    if args.only and not args.summarize_only:
        raise UsageError("--only selects what --summarize-only reads")
    if min(args.seeds) < 0:
        raise UsageError("--seeds: must be >= 0")
    args.out_dir = args.out_dir.resolve()  # daemons and Ray workers run elsewhere
    return args


def config_source(spec: str) -> tuple[str, Path]:
    """A preset name or a YAML path -> (its label in run-dir names, the file)."""
    if spec in PRESETS:
        return spec, PRESETS[spec]
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.stem, path.resolve()
    raise UsageError(f"--config {spec}: not a preset ({', '.join(sorted(PRESETS))}) "
                     f"or a YAML file")


def variant_name(label: str, overrides: Iterable[str]) -> str:
    """A readable directory name: the config's label, then +KEY=VALUE per override."""
    name = "+".join([label, *overrides])
    return re.sub(r"[^\w.=+,-]", "_", name)


def build_grid(args: Any) -> list[Run]:
    """Every (config, --set-grid line, seed), validated like the daemon validates it."""
    for assignment in args.set:
        if assignment.partition("=")[0].strip() in SWEEP_KEYS:
            raise UsageError(f"--set {assignment}: the sweep sets this itself "
                             f"(--seeds, --out-dir, --steps)")
    runs: list[Run] = []
    for spec, line in itertools.product(args.config, args.set_grid or [""]):
        label, source = config_source(spec[0])
        own = [*spec[1:], *shlex.split(line)]
        name = variant_name(label, own)
        if any(run.name == name for run in runs):
            raise UsageError(f"two configs of the grid are both named {name}")
        for seed in args.seeds:
            overrides = (*args.set, *own, f"seed={seed}")
            try:
                load_config(source, list(overrides))
            except ConfigError as exc:
                raise UsageError(f"{name}: {exc}") from None
            runs.append(Run(name, seed, args.out_dir / name / f"seed-{seed}", source,
                            overrides))
    return runs


def discover_runs(out_dir: Path, only: list[str] | None = None) -> list[Run]:
    """The run dirs under OUT_DIR/<name>/seed-<n> (for --summarize-only without --config),
    by name, or those of `only`'s names in its order."""
    runs = []
    for run_dir in sorted(out_dir.glob("*/seed-*")):
        if only is not None and run_dir.parent.name not in only:
            continue
        seed = run_dir.name.removeprefix("seed-")
        if seed.isdigit() and (run_dir / "status.json").exists():
            record = read_record(run_dir)
            runs.append(Run(run_dir.parent.name, int(seed), run_dir, None,
                            tuple(record.get("overrides", ()))))
    missing = sorted(set(only or ()) - {run.name for run in runs})
    if missing:
        raise UsageError(f"--only {missing[0]}: no run dirs {out_dir}/{missing[0]}/seed-<n>")
    if not runs:
        raise UsageError(f"--out-dir {out_dir}: no run dirs (<name>/seed-<n>/status.json)")
    order = {name: index for index, name in enumerate(only or ())}
    return sorted(runs, key=lambda run: (order.get(run.name, 0), run.name, run.seed))


def read_record(run_dir: Path) -> dict[str, Any]:
    """bench.json: the sweep's record of a run (tools/research/learning.py writes wall_s too)."""
    path = run_dir / "bench.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_atomic(run_dir / "bench.json", json.dumps(record).encode())  # a kill leaves it whole


def read_env_id(run_dir: Path) -> str | None:
    """The stream a run learned from, from the resolved config.yaml the daemon writes."""
    path = run_dir / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.exists() else None
    return config.get("env", {}).get("id") if isinstance(config, dict) else None


def read_status(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "status.json"
    return json.loads(path.read_text()) if path.exists() else None


def is_finished(run: Run, steps: int) -> bool:
    """A clean stop at or past the budget: a run that reached it but died before its final
    checkpoint says "stopping" and is run again (it resumes from its newest checkpoint)."""
    status = read_status(run.run_dir)
    return status is not None and status["step"] >= steps and status["state"] == "stopped"


def check_records(runs: list[Run]) -> None:
    """Refuse a grid that gives an existing run dir other overrides than it started with:
    resuming it would mix two settings in one run, reading it would mislabel it."""
    for run in runs:
        started = read_record(run.run_dir).get("overrides")
        if started is not None and tuple(started) != run.overrides:
            raise UsageError(f"{run.run_dir} was started with --set {' '.join(started)}; "
                             f"use another --out-dir for other settings")


def prepare_run_dir(run: Run) -> None:
    """On the first start, freeze the source YAML into the run dir: a resume, maybe on
    another node or after the preset changed, reads it from there."""
    assert run.source is not None
    record = begin_record(run.run_dir)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    frozen = run.run_dir / "sweep-source.yaml"
    if not frozen.exists():
        frozen.write_text(run.source.read_text())
    record.update(preset=run.name, config=str(run.source), overrides=list(run.overrides))
    write_record(run.run_dir, record)


def daemon_args(run: Run, steps: int) -> list[str]:
    """What follows `python -m runtime.daemon` for this run."""
    args = ["--config", str(run.run_dir / "sweep-source.yaml"), "--run-dir", str(run.run_dir),
            "--max-steps", str(steps)]
    for assignment in run.overrides:
        args += ["--set", assignment]
    return args


def add_wall_time(run: Run, wall_s: float) -> None:
    record = read_record(run.run_dir)
    record["wall_s"] = record.get("wall_s", 0.0) + wall_s
    write_record(run.run_dir, record)


def run_grid(runs: list[Run], args: Any) -> int:
    """Start every unfinished run; exit code 0 when all reached --steps, 1 when some did
    not, 130 when interrupted (a rerun resumes)."""
    work = []
    for run in runs:
        if is_finished(run, args.steps):
            print(f"sweep: {run.label}: finished, skipped", file=sys.stderr)
            continue
        prepare_run_dir(run)
        status = read_status(run.run_dir)
        plan = f"resumes from its checkpoint (step {status['step']})" if status else "new"
        print(f"sweep: {run.label}: {plan}", file=sys.stderr)
        work.append((run, daemon_args(run, args.steps)))
    failed: list[str] = []

    def done(run: Run, result: Result) -> None:
        code, last_line, wall_s = result
        add_wall_time(run, wall_s)
        step = (read_status(run.run_dir) or {"step": 0})["step"]
        finished = is_finished(run, args.steps)
        state = "finished" if finished else "stopped" if code == 0 else f"exit {code}"
        why = f": {last_line}" if code != 0 else ""
        print(f"sweep: {run.label}: {state} at step {step} ({wall_s:.0f} s){why}",
              file=sys.stderr)
        if not finished:
            failed.append(run.label)

    if not work:
        return 0
    # SIGTERM stops like Ctrl-C; set here, after ray.init, which installs its own handler
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    complete = (run_on_ray(work, done, args.ray, args.jobs) if args.ray
                else LocalPool(args.jobs).run(work, done))
    if not complete:
        print("sweep: interrupted; the same command resumes", file=sys.stderr)
        return 130
    return 1 if failed else 0


# -- aggregation ----------------------------------------------------------------------------


def seed_figures(run: Run, window: int, at_step: int | None) -> dict[str, Any]:
    """One seed: mean return of its last `window` games (by `at_step`), steps/s, counts."""
    row: dict[str, Any] = {"seed": run.seed, "run_dir": str(run.run_dir), "steps": 0,
                           "games": 0, "return": math.nan, "normalised": math.nan,
                           "steps_per_s": math.nan, "env_id": read_env_id(run.run_dir)}
    if not metrics_path(run.run_dir).exists() or read_status(run.run_dir) is None:
        return row
    # The daemon moves aside what a resume replays: every game is in the file once.
    games = read_jsonl(metrics_path(run.run_dir))
    figures = summarize(run.run_dir)
    row["return"], counted = last_games_mean(games, window, at_step)
    if row["env_id"] is not None:
        row["normalised"] = human_normalised(row["env_id"], row["return"])
    row.update(steps=figures["steps"], games=len(games), games_counted=counted,
               steps_per_s=learning_rate(run.run_dir, games, float(figures["steps_per_s"])))
    return row


def learning_rate(run_dir: Path, games: list[dict[str, Any]], wall_rate: float) -> float:
    """Steps/s of a run: the steps between consecutive games over the time between them,
    summed over the games this run dir learned (after the step an archive restore began it
    at), leaving out each gap where the run was stopped. bench.json's wall time sees only the
    sweep's own daemons, not a run continued by a plain daemon across sessions; `wall_rate`
    (from bench.json) stands in only for a run whose games carry no times."""
    start = read_record(run_dir).get("start_step", 0)
    learned = [g for g in games if g["step"] > start and "time" in g]
    steps = seconds = 0.0
    for before, game in itertools.pairwise(learned):
        span, elapsed = game["step"] - before["step"], game["time"] - before["time"]
        # The daemon's rate at the game's end says how long the game should have taken; a
        # game that took several times that spans a stop (the first game after a start has
        # no rate yet, and its span holds the downtime too).
        rate = game.get("steps_per_s", 0.0)
        if rate > 0 and 0 < elapsed <= STOPPED_FACTOR * span / rate:
            steps, seconds = steps + span, seconds + elapsed
    if seconds > 0:
        return steps / seconds
    return wall_rate if math.isfinite(wall_rate) and wall_rate > 0 else math.nan


def config_figures(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One config over its seeds: mean and IQM with 95% bootstrap intervals, steps/s."""
    returns = np.array([r["return"] for r in rows if math.isfinite(r["return"])])
    rates = [r["steps_per_s"] for r in rows if math.isfinite(r["steps_per_s"])]
    normalised = [r["normalised"] for r in rows if math.isfinite(r["normalised"])]
    summary: dict[str, Any] = {"config": name, "seeds": rows, "seeds_with_games": len(returns),
                               "steps_per_s": float(np.mean(rates)) if rates else math.nan,
                               "normalised": float(np.mean(normalised)) if normalised
                               else math.nan}
    for key, statistic in (("mean", np.mean), ("iqm", iqm)):
        if len(returns):
            low, high = bootstrap_ci(returns, statistic, RESAMPLES)
            summary[key] = float(statistic(returns, axis=0))
            summary[f"{key}_ci95"] = [float(low), float(high)]
        else:
            summary[key], summary[f"{key}_ci95"] = math.nan, [math.nan, math.nan]
    return summary


def aggregate(runs: list[Run], window: int, at_step: int | None) -> dict[str, Any]:
    configs = []
    for name in dict.fromkeys(run.name for run in runs):
        rows = [seed_figures(run, window, at_step) for run in runs if run.name == name]
        configs.append(config_figures(name, rows))
    scored = [config["normalised"] for config in configs if math.isfinite(config["normalised"])]
    return {"window": window, "at_step": at_step, "bootstrap_resamples": RESAMPLES,
            "configs": configs,
            "median_normalised": float(np.median(scored)) if scored else math.nan}


def format_table(summary: dict[str, Any]) -> str:
    """One block per config: a row per seed, then the mean and the IQM with intervals."""
    by = f" by step {summary['at_step']:,}" if summary["at_step"] else ""
    lines = []
    for config in summary["configs"]:
        scored = math.isfinite(config["normalised"])
        lines += [f"{config['config']}: mean return of the last {summary['window']} "
                  f"games{by}",
                  f"  {'seed':>6} {'steps':>11} {'games':>7} {'return':>9} {'steps/s':>8}"
                  + (f" {'human-norm.':>11}" if scored else "")]
        for row in config["seeds"]:
            lines.append(f"  {row['seed']:>6} {row['steps']:>11,} {row['games']:>7,} "
                         f"{row['return']:>9.2f} {row['steps_per_s']:>8.0f}"
                         + (f" {row['normalised']:>11.3f}" if scored else ""))
        for key, title in (("mean", "mean"), ("iqm", "IQM")):
            low, high = config[f"{key}_ci95"]
            rate = f" {config['steps_per_s']:>8.0f}" if key == "mean" else ""
            score = f" {config['normalised']:>11.3f}" if key == "mean" and scored else ""
            lines.append(f"  {title:>6} {'':>11} {'':>7} {config[key]:>9.2f}{rate}{score}"
                         f"   95% CI [{low:.2f}, {high:.2f}]")
        lines.append("")
    if math.isfinite(summary["median_normalised"]):
        count = sum(math.isfinite(c["normalised"]) for c in summary["configs"])
        lines += [f"human-normalised: median over {count} configs' means "
                  f"{summary['median_normalised']:.3f}", ""]
    return "\n".join(lines)


def summary_name(only: list[str] | None, at_step: int | None) -> str:
    """summary[-<names>][-at-K].json: a selection never overwrites the whole's summary."""
    selection = "-" + "+".join(only) if only else ""
    return f"summary{selection}" + (f"-at-{at_step}" if at_step else "") + ".json"


def json_safe(value: Any) -> Any:
    """NaN -> null, so summary.json is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        args = parse_args(argv)
        if args.ray and not args.summarize_only:
            try:
                connect_ray(args.ray, args.jobs)  # fail before any run dir is touched
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        runs = build_grid(args) if args.config else discover_runs(args.out_dir, args.only)
        check_records(runs)
        code = 0 if args.summarize_only else run_grid(runs, args)
    except UsageError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C while the daemons were stopping
        print("sweep: interrupted; the same command resumes", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = aggregate(runs, args.window, args.at_step)
    name = summary_name(args.only, args.at_step)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / name).write_text(json.dumps(json_safe(summary), indent=1) + "\n")
    print(format_table(summary))
    print(f"summary: {args.out_dir / name}")
    return code


if __name__ == "__main__":
    sys.exit(main())
