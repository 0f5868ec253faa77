"""A run kept in the repository reads back like the live run it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.daemon.checkpoints import CheckpointStore, read_checkpoint
from runtime.daemon.config import ConfigError, load_config
from runtime.device.policy import Policy
from runtime.metrics import metrics_path, read_jsonl
from tests.conftest import ROOT
from tools import archive_run


def _run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    games = [{"step": 10 * i, "return": float(i)} for i in range(5)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(g) + "\n" for g in games))
    (run_dir / "status.json").write_text(json.dumps({"step": 50}))
    (run_dir / "config.yaml").write_text("seed: 0\n")
    store = CheckpointStore(run_dir / "checkpoints", keep=3)
    store.save({"step": 40}, 40)
    store.save({"step": 50}, 50)
    (run_dir / "checkpoints" / "ckpt-000000000060.pt").write_bytes(b"torn")  # newest, bad


def test_archive_keeps_the_figures_and_the_newest_good_checkpoint(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    dest = tmp_path / "docs" / "runs" / "x" / "seed-0"
    archive_run.archive(tmp_path / "run", dest, with_checkpoint=True)
    assert metrics_path(dest).name == "metrics.jsonl.gz"
    assert read_jsonl(metrics_path(dest)) == read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [p.name for p in (dest / "checkpoints").iterdir()] == ["ckpt-000000000050.pt"]
    assert read_checkpoint(dest / "checkpoints" / "ckpt-000000000050.pt")["step"] == 50
    first = (dest / "metrics.jsonl.gz").read_bytes()
    archive_run.archive(tmp_path / "run", dest, with_checkpoint=False)
    assert (dest / "metrics.jsonl.gz").read_bytes() == first  # no churn when re-archived


def test_a_run_without_metrics_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        archive_run.archive(tmp_path, tmp_path / "dest", with_checkpoint=False)


def test_archiving_again_keeps_one_checkpoint_the_newest(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    dest = tmp_path / "archive"
    archive_run.archive(tmp_path / "run", dest, with_checkpoint=True)
    CheckpointStore(tmp_path / "run" / "checkpoints", keep=3).save({"step": 70}, 70)
    archive_run.archive(tmp_path / "run", dest, with_checkpoint=True)
    assert [p.name for p in (dest / "checkpoints").iterdir()] == ["ckpt-000000000070.pt"]


def test_a_restored_archive_is_the_run_directory_again(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    archive_run.archive(tmp_path / "run", tmp_path / "archive", with_checkpoint=True)
    restored = tmp_path / "again"
    assert archive_run.main(["--restore", str(tmp_path / "archive"), str(restored)]) == 0
    assert (restored / "metrics.jsonl").read_bytes() == \
        (tmp_path / "run" / "metrics.jsonl").read_bytes()
    assert load_config(restored / "config.yaml").seed == 0
    payload, path = CheckpointStore(restored / "checkpoints", keep=3).load_latest()
    assert (payload["step"], path.name) == (50, "ckpt-000000000050.pt")


def test_a_restored_config_names_no_key_removed_since_the_run_began(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text(
        "run:\n  overlap_stream: false\n  stream_process: false\nseed: 3\n")
    archive_run.archive(tmp_path / "run", tmp_path / "archive", with_checkpoint=True)
    with pytest.raises(ConfigError, match="run.overlap_stream: removed"):
        load_config(tmp_path / "archive" / "config.yaml")  # as it was archived
    restored = tmp_path / "again"
    assert archive_run.main(["--restore", str(tmp_path / "archive"), str(restored)]) == 0
    assert load_config(restored / "config.yaml").seed == 3  # the daemon goes on with it


def test_restore_refuses_to_mix_into_a_run_or_to_lack_a_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path / "run")
    archive_run.archive(tmp_path / "run", tmp_path / "archive", with_checkpoint=False)
    assert archive_run.main(["--restore", str(tmp_path / "archive"),
                             str(tmp_path / "again")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    archive_run.archive(tmp_path / "run", tmp_path / "archive", with_checkpoint=True)
    assert archive_run.main(["--restore", str(tmp_path / "archive"),
                             str(tmp_path / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err.splitlines()[-1]
    (tmp_path / "run" / "metrics.jsonl").unlink()  # checkpoints alone are a run too
    assert archive_run.main(["--restore", str(tmp_path / "archive"),
                             str(tmp_path / "run")]) == 2
    assert "already holds a run (checkpoints/)" in capsys.readouterr().err.splitlines()[-1]


def test_a_restore_interrupted_after_the_checkpoint_finishes_when_run_again(
        tmp_path: Path) -> None:
    _run(tmp_path / "run")
    archive_run.archive(tmp_path / "run", tmp_path / "archive", with_checkpoint=True)
    restored = tmp_path / "again"
    (restored / "checkpoints").mkdir(parents=True)  # what a restore writes first
    (restored / "checkpoints" / "ckpt-000000000050.pt").write_bytes(
        (tmp_path / "archive" / "checkpoints" / "ckpt-000000000050.pt").read_bytes())
    assert archive_run.main(["--restore", str(tmp_path / "archive"), str(restored)]) == 0
    assert (restored / "metrics.jsonl").read_bytes() == \
        (tmp_path / "run" / "metrics.jsonl").read_bytes()
    (restored / "metrics.jsonl").unlink()  # a different checkpoint is another run
    (restored / "checkpoints" / "ckpt-000000000050.pt").write_bytes(b"other")
    with pytest.raises(FileExistsError):
        archive_run.restore(tmp_path / "archive", restored)


RUNS_BUDGET_MIB = 40  # the budget docs/results.md states for docs/runs


def test_the_kept_runs_stay_within_their_size_budget() -> None:
    runs = ROOT / "docs" / "runs"
    size = sum(p.stat().st_size for p in runs.rglob("*") if p.is_file())
    assert size <= RUNS_BUDGET_MIB << 20, f"docs/runs holds {size / 2**20:.1f} MiB"
    assert all(len(list(d.glob("*.pt"))) <= 1 for d in runs.rglob("checkpoints")), \
        "an archived run keeps only its newest checkpoint"


# The policies the docs ship: name -> (stream, training step). A fresh clone must hold them.
SHIPPED_POLICIES = {
    **{f"breakout-2m-seed-{n}": ("ALE/Breakout-v5", 2_000_000) for n in range(5)},
    "pong-1m-seed-0": ("ALE/Pong-v5", 1_000_000),
    **{f"space-invaders-1m-seed-{n}": ("ALE/SpaceInvaders-v5", 1_000_000) for n in (0, 1)},
    **{f"seaquest-1m-seed-{n}": ("ALE/Seaquest-v5", 1_000_000) for n in (0, 1)},
}
POLICIES_BUDGET_MIB = 12  # the budget docs/results.md states for docs/policies


def test_the_shipped_policies_are_in_the_repository_and_are_what_they_are_named() -> None:
    policies = ROOT / "docs" / "policies"
    assert sorted(p.stem for p in policies.glob("*.onnx")) == sorted(SHIPPED_POLICIES)
    for name, (env_id, step) in SHIPPED_POLICIES.items():
        metadata = Policy.load(policies / f"{name}.onnx").metadata
        assert (metadata["env_id"], metadata["training_step"]) == (env_id, step), name
    size = sum(p.stat().st_size for p in policies.glob("*.onnx"))
    assert size <= POLICIES_BUDGET_MIB << 20, f"docs/policies holds {size / 2**20:.1f} MiB"
