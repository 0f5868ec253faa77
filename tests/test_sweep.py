"""tools/research/sweep.py: a grid of short CartPole daemons, locally and on a local Ray instance;
the statistics over seeds on known numbers; the group curves of tools/research/plot_metrics.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.metrics import read_jsonl
from tests.conftest import ROOT, _env, wait_for_status
from tools.research import learning, plot_metrics, sweep
from tools.research.atari_scores import game_name, human_normalised
from tools.research.seed_stats import bootstrap_ci, iqm, iqm_weights, last_games_mean

STEPS = 1500


def fast(steps: int = STEPS) -> list[str]:
    """CartPole, a checkpoint every 100 steps, status.json ten times a second."""
    return ["--set", "env.id=CartPole-v1", "--set", "log.status_every_seconds=0.1",
            "--set", "export.on_stop=false",
            "--set", "checkpoint.every_steps=100", "--steps", str(steps)]


# two configs (a --set-grid line crossing the default preset) x two seeds
GRID = ["--config", "default", "--set-grid", "", "--set-grid", "agent.entropy_coeff=0.02",
        "--seeds", "0", "1", *fast()]
CONFIGS = ["default", "default+agent.entropy_coeff=0.02"]


def sweep_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "research" / "sweep.py"), *args],
                          cwd=ROOT, env=_env(), text=True, capture_output=True,
                          timeout=timeout)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# -- statistics on known numbers ------------------------------------------------------------


def test_iqm_is_the_mean_of_the_middle_half() -> None:
    assert iqm(np.array([4.0, 1.0, 3.0, 2.0])) == pytest.approx(2.5)
    assert iqm(np.arange(1.0, 9.0)) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    assert iqm(np.array([1.0, 2.0, 3.0, 4.0, 100.0])) == pytest.approx(3.0)  # outlier out
    assert iqm(np.array([1.0, 2.0, 3.0])) == pytest.approx((1 + 4 * 2 + 3) / 6)
    assert iqm(np.array([7.0])) == pytest.approx(7.0)
    assert iqm_weights(5).sum() == pytest.approx(1.0)
    columns = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    np.testing.assert_allclose(iqm(columns, axis=0), [2.5, 25.0])


def test_bootstrap_interval_holds_the_mean_and_is_seeded() -> None:
    values = np.array([11.29, 21.75, 12.30, 15.0, 9.5])
    low, high = bootstrap_ci(values, np.mean, seed=3)
    assert low < values.mean() < high
    assert values.min() <= low and high <= values.max()
    assert (low, high) == bootstrap_ci(values, np.mean, seed=3)
    assert (low, high) != bootstrap_ci(values, np.mean, seed=4)
    iqm_low, iqm_high = bootstrap_ci(values, iqm)
    assert iqm_low <= iqm(values) <= iqm_high
    assert bootstrap_ci(np.array([5.0])) == (5.0, 5.0)
    low, high = bootstrap_ci(np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]]))  # seeds x points
    assert low[1] == high[1] == 5.0 and 1.0 <= low[0] < 2.0 < high[0] <= 3.0


def test_last_games_mean_counts_the_games_that_ended_by_a_step() -> None:
    # what metrics.jsonl holds after a resume at step 20: the daemon moved the replayed
    # records (30, 40) aside, so the games are in the file once, in order
    games = [{"step": s, "return": r} for s, r in [(10, 1), (20, 2), (25, 5), (35, 6)]]
    assert last_games_mean(games, window=2) == (5.5, 2)
    assert last_games_mean(games, window=100, at_step=25) == (pytest.approx(8 / 3), 3)
    assert math.isnan(last_games_mean(games, at_step=5)[0])


def test_human_normalised_scores_use_the_standard_references() -> None:
    assert game_name("ALE/Pong-v5") == game_name("PongNoFrameskip-v4") == "Pong"
    assert human_normalised("ALE/Pong-v5", -20.7) == pytest.approx(0.0)
    assert human_normalised("ALE/Breakout-v5", 30.5) == pytest.approx(1.0)
    assert human_normalised("ALE/Seaquest-v5", 68.4 + 0.2 * (42054.7 - 68.4)) == \
        pytest.approx(0.2)
    assert math.isnan(human_normalised("CartPole-v1", 500.0))
    assert math.isnan(human_normalised("ALE/SpaceInvaders-v5", math.nan))


def fake_run(run_dir: Path, env_id: str, returns: list[float]) -> None:
    """A finished run dir as the daemon leaves it: resolved config, status, games."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"env:\n  id: {env_id}\nseed: 0\n")
    (run_dir / "status.json").write_text(json.dumps({"step": 100 * len(returns)}))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 100 * (i + 1), "return": r, "time": float(i), "steps_per_s": 100.0})
        + "\n" for i, r in enumerate(returns)))


def test_summarize_only_reads_named_configs_with_their_human_normalised_scores(
        tmp_path: Path, capsys) -> None:
    fake_run(tmp_path / "pong" / "seed-0", "ALE/Pong-v5", [-20.7, -13.6])   # 0.1 on average
    fake_run(tmp_path / "pong" / "seed-1", "ALE/Pong-v5", [-6.58] * 2)      # 0.4
    fake_run(tmp_path / "breakout" / "seed-0", "ALE/Breakout-v5", [30.5])   # 1.0
    fake_run(tmp_path / "seaquest" / "seed-0", "ALE/Seaquest-v5", [68.4])  # 0.0
    fake_run(tmp_path / "cartpole" / "seed-0", "CartPole-v1", [500.0])
    assert sweep.main(["--out-dir", str(tmp_path), "--summarize-only",
                       "--only", "seaquest", "pong", "breakout", "cartpole"]) == 0
    out = capsys.readouterr().out
    assert "median over 3 configs' means 0.250" in out
    summary = json.loads((tmp_path / "summary-seaquest+pong+breakout+cartpole.json")
                         .read_text())
    assert not (tmp_path / "summary.json").exists()  # the whole's summary is left alone
    configs = {c["config"]: c for c in summary["configs"]}
    assert list(configs) == ["seaquest", "pong", "breakout", "cartpole"]
    assert [row["normalised"] for row in configs["pong"]["seeds"]] == \
        pytest.approx([0.1, 0.4], abs=1e-3)
    assert configs["pong"]["normalised"] == pytest.approx(0.25, abs=1e-3)
    assert configs["cartpole"]["normalised"] is None
    assert sweep.main(["--out-dir", str(tmp_path), "--summarize-only", "--only", "qbert"]) == 2
    assert "--only qbert: no run dirs" in one_error_line(capsys.readouterr().err)


def test_panels_of_plot_metrics_draw_one_panel_per_stream(tmp_path: Path, capsys) -> None:
    for seed in (0, 1):
        fake_run(tmp_path / "pong" / f"seed-{seed}", "ALE/Pong-v5", [-21.0, -20.0, -19.0])
    fake_run(tmp_path / "reference" / "seed-0", "ALE/Pong-v5", [-21.0] * 3)
    fake_run(tmp_path / "breakout=wide" / "seed-0", "ALE/Breakout-v5", [1.0, 2.0])
    out = tmp_path / "games.png"
    assert plot_metrics.main(["--panel", "Pong", str(tmp_path / "pong"),
                              f"reference={tmp_path / 'reference' / 'seed-0'}",
                              "--panel", "Breakout", str(tmp_path / "breakout=wide"),
                              "--until", "200", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    grid, _ = plot_metrics.seed_curves([tmp_path / "pong" / "seed-0"], 100, until=200)
    assert grid[-1] == 200
    with pytest.raises(SystemExit):
        plot_metrics.main(["--panel", "Pong", "--out", str(out)])
    assert "needs a title and at least one group" in capsys.readouterr().err


# -- a local sweep ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    done = sweep_cli(*GRID, "--jobs", "2", "--out-dir", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(": new") == 4 and done.stderr.count("finished at step") == 4
    return out


def test_steps_per_s_counts_the_steps_learned_in_the_recorded_wall_time(
        tmp_path: Path) -> None:
    """A run restored from an archive at step 1000 and run on to 2000 in 10 s learned at
    100 steps/s, not 200; a record begun before start_step existed covered steps from 0."""
    (tmp_path / "status.json").write_text(json.dumps({"step": 1000}))
    (tmp_path / "metrics.jsonl").write_text("")
    record = learning.begin_record(tmp_path)
    assert record == {"start_step": 1000, "wall_s": 0.0}
    (tmp_path / "bench.json").write_text(json.dumps({**record, "wall_s": 10.0}))
    assert learning.begin_record(tmp_path)["start_step"] == 1000  # a resume keeps it
    (tmp_path / "status.json").write_text(json.dumps({"step": 2000}))
    assert learning.summarize(tmp_path)["steps_per_s"] == 100.0
    (tmp_path / "bench.json").write_text(json.dumps({"wall_s": 10.0}))
    assert learning.summarize(tmp_path)["steps_per_s"] == 200.0
    assert learning.begin_record(tmp_path / "new")["start_step"] == 0


def test_steps_per_s_of_a_run_leaves_out_the_archive_and_the_time_it_was_stopped(
        tmp_path: Path) -> None:
    """A run restored at step 1000 and continued by plain daemons whose wall time no
    bench.json saw: 100 steps/s over the games it learned, without the archive's games
    before the restore or the hour it was stopped between 1300 and 1400 (the game after
    the stop has the rate of its new start; the next one none yet)."""
    (tmp_path / "bench.json").write_text(json.dumps({"start_step": 1000, "wall_s": 1.0}))
    games = [{"step": step, "time": time, "steps_per_s": rate} for step, time, rate in
             ((500, 0.0, 999.0), (1100, 10.0, 100.0), (1200, 11.0, 100.0),
              (1300, 12.0, 100.0), (1400, 3612.0, 90.0), (1500, 3613.0, 110.0),
              (1600, 7000.0, 0.0), (1800, 7002.0, 100.0))]
    assert sweep.learning_rate(tmp_path, games, wall_rate=1000.0) == 100.0
    without_times = [{"step": 1500, "steps_per_s": 50.0}]
    assert sweep.learning_rate(tmp_path, without_times, wall_rate=1000.0) == 1000.0
    assert math.isnan(sweep.learning_rate(tmp_path / "none", [], wall_rate=math.nan))


def test_each_config_and_seed_gets_a_finite_figure(swept: Path) -> None:
    summary = json.loads((swept / "summary.json").read_text())
    assert [c["config"] for c in summary["configs"]] == CONFIGS
    for config in summary["configs"]:
        assert [row["seed"] for row in config["seeds"]] == [0, 1]
        for row in config["seeds"]:
            assert row["steps"] == STEPS and row["games"] > 0 and row["steps_per_s"] > 0
            games = read_jsonl(Path(row["run_dir"]) / "metrics.jsonl")
            assert row["return"] == pytest.approx(np.mean([g["return"] for g in games][-100:]))
        returns = [row["return"] for row in config["seeds"]]
        assert config["mean"] == pytest.approx(np.mean(returns))
        for key in ("mean", "iqm"):
            low, high = config[f"{key}_ci95"]
            assert min(returns) <= low <= config[key] <= high <= max(returns)
    saved = (swept / CONFIGS[1] / "seed-1" / "config.yaml").read_text()
    assert "entropy_coeff: 0.02" in saved and "seed: 1" in saved


def test_a_rerun_starts_no_daemon_for_finished_runs(swept: Path) -> None:
    logs = sorted(swept.glob("*/seed-*/daemon.log"))
    before = {p: (p.read_text(), (p.parent / "metrics.jsonl").stat().st_mtime_ns) for p in logs}
    done = sweep_cli(*GRID, "--out-dir", str(swept))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("finished, skipped") == 4
    assert before == {p: (p.read_text(), (p.parent / "metrics.jsonl").stat().st_mtime_ns)
                      for p in logs}
    for config in CONFIGS:
        assert config in done.stdout and "95% CI" in done.stdout


def test_summarize_only_finds_the_runs_and_reads_figures_at_a_step(swept: Path,
                                                                    capsys) -> None:
    assert sweep.main(["--out-dir", str(swept), "--summarize-only", "--at-step", "500",
                       "--window", "5"]) == 0
    assert "by step 500" in capsys.readouterr().out
    summary = json.loads((swept / "summary-at-500.json").read_text())
    assert [c["config"] for c in summary["configs"]] == CONFIGS
    row = summary["configs"][0]["seeds"][0]
    games = [g for g in read_jsonl(Path(row["run_dir"]) / "metrics.jsonl") if g["step"] <= 500]
    assert row["games_counted"] == 5
    assert row["return"] == pytest.approx(np.mean([g["return"] for g in games[-5:]]))


def test_a_grid_that_changes_a_run_dirs_settings_is_refused(swept: Path, capsys) -> None:
    assert sweep.main([*GRID, "--set", "agent.gamma=0.9", "--out-dir", str(swept)]) == 2
    assert "was started with --set" in one_error_line(capsys.readouterr().err)


def test_group_mode_of_plot_metrics_draws_one_band_per_config(swept: Path,
                                                              tmp_path: Path) -> None:
    dirs = ",".join(str(swept / CONFIGS[1] / f"seed-{s}") for s in (0, 1))
    out = tmp_path / "sweep.png"
    assert plot_metrics.main(["--group", str(swept / "default"), "--group", f"floor={dirs}",
                              str(swept / "default" / "seed-0"), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    seeds = [swept / "default" / f"seed-{s}" for s in (0, 1)]
    grid, curves = plot_metrics.seed_curves(seeds, 100)
    assert curves.shape == (2, len(grid)) and np.isfinite(curves).all()
    assert grid[-1] <= STEPS and np.all(np.diff(grid) > 0)


def test_an_interrupted_sweep_resumes_its_runs_from_their_checkpoints(tmp_path: Path) -> None:
    args = ["--config", "seed", "agent.network=auto", *fast(3000), "--out-dir", str(tmp_path)]
    run_dir = tmp_path / "seed+agent.network=auto" / "seed-0"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "research" / "sweep.py"), *args],
                            cwd=ROOT, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    wait_for_status(run_dir, 300)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "the same command resumes" in stderr, stderr
    stopped = json.loads((run_dir / "status.json").read_text())
    assert stopped["state"] == "stopped" and 300 <= stopped["step"] < 3000

    done = sweep_cli(*args)
    assert done.returncode == 0, done.stderr
    assert f"resumes from its checkpoint (step {stopped['step']})" in done.stderr
    log = (run_dir / "daemon.log").read_text()
    assert log.count("starting fresh") == 1
    assert f"at step {stopped['step']}" in log.split("resumed from")[1].splitlines()[0]
    steps = [g["step"] for g in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == sorted(steps) and steps[-1] <= 3000


# -- bad input and Ray -------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "expected"), [
    (["--config", "nope", "--steps", "5"], "--config nope: not a preset"),
    (["--config", "default", "--steps", "5", "--set", "agent.bogus=1"],
     "agent.bogus: unknown key"),
    (["--config", "default", "agent.gamma", "--steps", "5"], "expected KEY=VALUE"),
    (["--config", "default", "--steps", "5", "--set", "seed=3"], "the sweep sets this"),
    (["--config", "default"], "--steps are needed"),
])
def test_bad_input_exits_2_with_one_line(argv: list[str], expected: str, capsys,
                                         tmp_path: Path) -> None:
    assert sweep.main([*argv, "--out-dir", str(tmp_path)]) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_ray_flag_without_ray_names_the_extra(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert sweep.main(["--config", "default", "--steps", "5", "--ray", "local",
                       "--out-dir", str(tmp_path)]) == 2
    assert "stream-agent-runtime[ray]" in one_error_line(capsys.readouterr().err)


def test_sweep_on_a_local_ray_instance(tmp_path: Path, capsys) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code = sweep.main(["--config", "default", "--seeds", "0", "1", *fast(),
                           "--ray", "local", "--out-dir", str(tmp_path)])
    finally:
        ray.shutdown()
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["configs"][0]["seeds"]
    assert [r["seed"] for r in rows] == [0, 1]
    assert all(r["steps"] == STEPS and math.isfinite(r["return"]) for r in rows)
    assert all(json.loads((Path(r["run_dir"]) / "bench.json").read_text())["wall_s"] > 0
               for r in rows)


def test_an_interrupted_ray_sweep_stops_its_daemons_with_a_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    args = ["--config", "default", "--seeds", "0", "1", *fast(50_000), "--ray", "local",
            "--jobs", "1", "--out-dir", str(tmp_path)]  # one CPU: seed 1 waits in Ray's queue
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "research" / "sweep.py"), *args],
                            cwd=ROOT, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = tmp_path / "default" / "seed-0"
    try:
        wait_for_status(first, 300, timeout=180)  # Ray and the daemon start slowly on busy cores
    finally:  # on a timeout too: no sweep, Ray instance or daemon is left running
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 130, stderr
    status = json.loads((first / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] < 50_000
    assert "stopping (SIGTERM)" in (first / "daemon.log").read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(status["pid"], 0)  # the cancelled task took its daemon with it
    assert f"stopped at step {status['step']}" in stderr
    assert not (tmp_path / "default" / "seed-1" / "status.json").exists()
