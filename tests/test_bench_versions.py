"""tools/bench/versions.py runs both trees' loops and cleans its worktree up."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def _worktrees() -> str:
    return subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


def test_compares_the_working_tree_with_a_commit() -> None:
    before = _worktrees()
    done = subprocess.run([sys.executable, "tools/bench/versions.py", "--base", "HEAD",
                           "--rounds", "1", "--blocks", "1", "--block-steps", "5",
                           "--set", "env.id=CartPole-v1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["steps_per_s_median"]["base"] > 0 and report["ratio_current_over_base"] > 0
    assert len(report["ratio_per_round"]) == 1
    assert _worktrees() == before  # the temporary worktree of the base is gone


def test_an_unknown_base_is_one_line_and_exit_2() -> None:
    done = subprocess.run([sys.executable, "tools/bench/versions.py", "--base", "no-such-rev"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bench_versions: error: --base no-such-rev: fatal: invalid reference: no-such-rev"]


def test_same_numbers_finds_the_working_tree_equal_to_itself() -> None:
    before = _worktrees()
    done = subprocess.run([sys.executable, "tools/bench/same_numbers.py", "--base", "HEAD",
                           "--steps", "60", "--shape", "4", "--actions", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["actions_agree"] == 1.0 and report["first_differing_action"] is None
    assert report["max_relative_difference_while_agreeing"] == 0.0
    assert _worktrees() == before
