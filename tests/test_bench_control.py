"""tools/research/control.py and its yardstick, tools/research/reference_stream_ac.py, on
tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runtime.metrics import read_jsonl
from tools.research import control, reference_stream_ac, sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_reference_learner_is_reproducible_and_reports_each_episode() -> None:
    first = reference_stream_ac.run("CartPole-v1", 600, seed=3)
    assert first == reference_stream_ac.run("CartPole-v1", 600, seed=3)
    assert first != reference_stream_ac.run("CartPole-v1", 600, seed=4)
    steps = [step for step, _ in first]
    assert steps == sorted(steps) and steps[-1] <= 600
    assert all(ret >= 1 for _, ret in first)  # CartPole pays 1 per step


def test_without_its_clock_the_reference_learner_learns_differently() -> None:
    clocked = reference_stream_ac.run("CartPole-v1", 600, seed=3)
    unclocked = reference_stream_ac.run("CartPole-v1", 600, seed=3, time_feature=False)
    assert unclocked and unclocked != clocked
    assert unclocked == reference_stream_ac.run("CartPole-v1", 600, seed=3, time_feature=False)


def test_the_reference_learner_refuses_continuous_actions() -> None:
    with pytest.raises(SystemExit, match="no discrete actions"):
        reference_stream_ac.run("Pendulum-v1", 10, seed=0)


def test_the_reference_learner_on_atari_resumes_exactly_from_its_run_dir(
        tmp_path: Path) -> None:
    """Straight to step 200 against stopped at 100 and resumed, with a game a kill left
    past the checkpoint in metrics.jsonl, and against a run killed before its first
    checkpoint: the same games once each, the same weights."""
    straight, resumed, killed = tmp_path / "straight", tmp_path / "resumed", tmp_path / "killed"
    assert reference_stream_ac.run_frames("ALE/Breakout-v5", 200, 0, straight) == 200
    assert reference_stream_ac.run_frames("ALE/Breakout-v5", 100, 0, resumed) == 100
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 130, "return": 99.0}) + "\n")
    assert reference_stream_ac.run_frames("ALE/Breakout-v5", 200, 0, resumed) == 200
    killed.mkdir()
    (killed / "metrics.jsonl").write_text(json.dumps({"step": 80, "return": 1.0}) + "\n")
    assert reference_stream_ac.run_frames("ALE/Breakout-v5", 200, 0, killed) == 200
    games = [[(g["step"], g["return"]) for g in read_jsonl(run / "metrics.jsonl")]
             for run in (straight, resumed, killed)]
    assert games[0] == games[1] == games[2] and games[0]  # the first game ends by 200
    weights = [reference_stream_ac.load_checkpoint(run / "checkpoint.pt")["learner"]["policy"]
               for run in (straight, resumed)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert sweep.read_status(resumed) == {"step": 200, "games": len(games[0]),
                                          "state": "stopped"}
    assert sweep.read_env_id(resumed) == "ALE/Breakout-v5"


def test_the_probe_plays_a_runs_saved_actor_and_leaves_the_run_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert reference_stream_ac.run_frames("ALE/Breakout-v5", 100, 0, run) == 100
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    env_id, step, profile = reference_stream_ac.probe_run(run, games=1, max_steps=60)
    assert (env_id, step) == ("ALE/Breakout-v5", 100)
    assert len(profile.entropy_fractions) == 60 and profile.taken.sum() == pytest.approx(1.0)
    assert 0.9 < profile.entropy_fractions.mean() <= 1.0  # 100 updates: near uniform
    assert profile.mean_probability.sum() == pytest.approx(1.0)
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        reference_stream_ac.probe_run(tmp_path / "missing", games=1)
    (run / "checkpoint.pt").write_bytes(before["checkpoint.pt"][:1000])  # truncated
    with pytest.raises(SystemExit, match="is not a checkpoint of this tool"):
        reference_stream_ac.probe_run(run, games=1)
    with pytest.raises(SystemExit):
        reference_stream_ac.main(["--probe", "0", "--run-dir", str(run)])
    assert "--probe" in capsys.readouterr().err


class _Payload:
    """A pickled object that, when unpickled, creates the file it names."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_a_forged_checkpoint_is_refused_without_running_its_code(tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "ran"
    assert reference_stream_ac.run_frames("ALE/Breakout-v5", 20, 0, run) == 20
    torch.save({"step": 20, "learner": _Payload(marker)}, run / "checkpoint.pt")
    with pytest.raises(SystemExit, match="is not a checkpoint of this tool"):
        reference_stream_ac.run_frames("ALE/Breakout-v5", 40, 0, run)
    with pytest.raises(SystemExit, match="is not a checkpoint of this tool"):
        reference_stream_ac.probe_run(run, games=1)
    assert not marker.exists()


def test_bench_control_prints_both_learners_per_task(capsys: pytest.CaptureFixture) -> None:
    assert control.main(["--envs", "CartPole-v1", "--steps", "400", "--seeds", "2",
                               "--max-episode-steps", "100"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["env"] == "CartPole-v1" and line["max_episode_steps"] == 100
    for learner in ("daemon", "reference"):
        figures = line[learner]
        assert len(figures["mean_all"]) == 2 and len(figures["last_20"]) == 2
        assert all(0 < m <= 100 for m in figures["mean_all"])  # the time limit holds


def test_kept_outputs_summarize_into_one_row_per_task_and_limit(tmp_path) -> None:
    ours = tmp_path / "ours.jsonl"
    ours.write_text(json.dumps({"env": "Acrobot-v1", "max_episode_steps": 10000,
                                "daemon": {"mean_all": [-150.0, -160.0],
                                           "mean_all_over_seeds": -155.0}}) + "\n")
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text(json.dumps({"env": "Acrobot-v1", "max_episode_steps": 10000,
                                  "reference": {"mean_all": [-2000.0],
                                                "mean_all_over_seeds": -2000.0}}) + "\n")
    table = control.summarize([str(ours), str(theirs)]).splitlines()
    assert table[0] == "| task | time limit | ours.jsonl (daemon) | theirs.jsonl (reference) |"
    assert table[2] == "| Acrobot-v1 | 10000 | -155.0 (2 seeds) | -2000.0 (1 seeds) |"


def test_bad_input_gets_one_line(tmp_path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        control.main(["--summarize", str(tmp_path / "missing.jsonl")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit, match="NoSuchEnv-v0"):
        reference_stream_ac.run("NoSuchEnv-v0", 10, seed=0)
    assert reference_stream_ac.main(["--env", "NoSuchEnv-v0"]) == 2
    assert "NoSuchEnv-v0" in capsys.readouterr().err
