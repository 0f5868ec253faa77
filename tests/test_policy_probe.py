"""tools/research/policy_probe.py: what a policy does, per action, per step and per game."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import ROOT
from tools.research import policy_probe as pp

BREAKOUT_POLICY = ROOT / "docs" / "policies" / "breakout-2m-seed-0.onnx"


def profile(per_step: list[list[float]]) -> pp.Profile:
    probs = np.asarray(per_step)
    return pp.Profile(tuple(f"A{i}" for i in range(probs.shape[1])), probs.mean(axis=0),
                      probs.mean(axis=0), np.asarray([pp.entropy_fraction(p) for p in probs]),
                      [])


def test_entropy_fraction_spans_uniform_to_certain() -> None:
    assert pp.entropy_fraction(pp.softmax(np.zeros(6))) == pytest.approx(1.0)
    assert pp.entropy_fraction(np.array([1.0, 0.0, 0.0])) == 0.0
    assert pp.entropy_fraction(np.array([0.5, 0.5, 0.0, 0.0])) == pytest.approx(0.5)
    assert pp.softmax(np.array([0.0, math.log(3.0)])) == pytest.approx([0.25, 0.75])


def test_mutual_information_tells_choosing_from_settling() -> None:
    choosing = profile([[1.0, 0.0], [0.0, 1.0]])  # certain each step, by what it sees
    settled = profile([[0.9, 0.1], [0.9, 0.1]])  # the same whatever it sees
    assert choosing.mutual_information == pytest.approx(1.0)
    assert settled.mutual_information == pytest.approx(0.0, abs=1e-12)
    lines = "\n".join(settled.lines())
    assert "A0      0.900  0.900" in lines and "no whole game" in lines


def test_the_command_on_a_committed_breakout_policy(capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    assert pp.main([str(BREAKOUT_POLICY), "--max-steps", "60", "--greedy"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("on ALE/Breakout-v5, greedy actions")
    rows = {line.split()[0]: float(line.split()[1]) for line in out[2:6]}
    assert list(rows) == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    assert sum(rows.values()) == pytest.approx(1.0)
    assert "over 60 steps" in out[6]


def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert pp.main([str(ROOT / "no-such-policy.onnx")]) == 2
    assert capsys.readouterr().err.strip().endswith("no-such-policy.onnx not found")
    assert pp.main([str(BREAKOUT_POLICY), "--games", "0"]) == 2


def test_several_models_print_one_row_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert pp.main([str(BREAKOUT_POLICY)] * 2 + ["--max-steps", "30", "--greedy"]) == 0
    header, columns, *rows = capsys.readouterr().out.splitlines()
    assert header.startswith("greedy actions") and columns.split()[0] == "step"
    assert len(rows) == 2 and rows[0] == rows[1]  # the same model, stream and seed
    step, entropy, mutual, action, share, mean, stream, model = rows[0].split()
    assert (step, mean, stream, model) == ("2000000", "-", "ALE/Breakout-v5,",
                                           BREAKOUT_POLICY.name)
    assert action in ("RIGHT", "LEFT")
    assert 0 <= float(entropy) <= 1 and 0 <= float(mutual) <= 1 and 0.5 <= float(share) <= 1
