"""SIGKILL at random moments and during checkpoint writes, 20 times in a row: every start
after a published checkpoint resumes from it, nothing is lost or counted twice, and the
run ends where a run that was never killed ends."""

from __future__ import annotations

from pathlib import Path

from tools.bench.soak_kill import FINAL_RUN_STEPS, soak


def test_twenty_kills_in_a_row_lose_nothing(run_dir: Path) -> None:
    result = soak(run_dir, kills=20, seed=1)
    print(result)
    assert result["kills"] == 20
    assert result["aimed_at_a_write"] == 6
    assert result["kills_during_checkpoint_write"] > 0
    # soak() raises on any start that found a checkpoint and started fresh; each of the
    # others resumed, unless it was killed before it got that far.
    assert result["starts_after_a_checkpoint"] >= 15
    assert result["resumed"] + result["killed_before_restoring"] \
        == result["starts_after_a_checkpoint"]
    assert result["resumed"] >= 10
    # The kills interrupted a run that went on: later checkpoints than the first 25 steps
    # (how many later depends on the machine's speed between kills: 100 on a loaded one),
    # and a clean run after them that resumed and learned its steps before stopping.
    assert result["step_after_kills"] > 25
    assert result["final_step"] >= result["step_after_kills"] + FINAL_RUN_STEPS
    # An uninterrupted run to the same step was compared record by record and tensor by
    # tensor (soak() raises on any difference): every game once, nothing else changed.
    compared = result["equal_to_uninterrupted"]
    assert compared["records"] == result["games"] > 20
    assert compared["state_tensors"] > 10 and compared["stream_state_entries"] > 0
