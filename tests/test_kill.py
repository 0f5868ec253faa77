"""SIGKILL at random moments, 20 times in a row: nothing published is ever lost."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from soak_kill import soak  # noqa: E402


def test_twenty_kills_in_a_row_lose_nothing(run_dir: Path) -> None:
    result = soak(run_dir, kills=20, seed=1)
    assert result["violations"] == 0
    assert result["final_step"] > 0
    assert result["resumes"] >= 1  # soak() itself refuses any fresh start after a checkpoint
