"""Every accepted config runs (a property test with hypothesis).

Generated configs, as `--set` lines over config.yaml, valid and invalid: each one either
starts and runs three steps (exit 0), or exits 2 with one line that names the key at fault
-- never a traceback, never exit 1. Most examples run the daemon's `main` in this process
(what the command line calls); a few run it as a real subprocess. The oracle below knows
which values are invalid on their own and which combinations are (the cross-key rules),
so a config that is accepted but cannot run, or one refused for no reason, fails the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.daemon.command import main
from tests.conftest import ROOT, _env

FRAMES = {"ALE/Breakout-v5"}  # the stream gives frames; the others give vectors
ENVS = ["ALE/Breakout-v5", "CartPole-v1", "Acrobot-v1", "FrozenLake-v1"]
BAD_ENVS = ["NoSuchEnv-v0", "Pendulum-v1", "ALE/NoSuchGame-v5"]
# What a network's convolutions need, for the oracle (agent/networks.py: min_frame_size).
SMALLEST_FRAME = {"shared-conv": 29, "seed": 29, "stream": 53, "shared-stream": 53}

# key -> (valid values, invalid values): valid on their own, that is.
KEYS: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    "env.screen_size": (st.one_of(st.sampled_from([8, 28, 29, 52, 53]), st.integers(8, 120)),
                        st.sampled_from([0, 7, 211, "big", 84.5])),
    "env.frame_stack": (st.integers(1, 4), st.sampled_from([0, -2, "four"])),
    "env.frame_skip": (st.integers(1, 5), st.sampled_from([0, 2.5])),
    "env.noop_max": (st.integers(0, 30), st.just(-1)),
    "env.terminal_on_life_loss": (st.booleans(), st.sampled_from(["maybe", 3])),
    "env.repeat_action_probability": (st.floats(0, 0.99), st.sampled_from([1.0, -0.1, "x"])),
    "env.kwargs": (st.sampled_from([{}, {"render_mode": "rgb_array"}]),
                   st.sampled_from([3, [1], {"wheels": 4}, {"frameskip": 2},
                                    {"render_mode": "human"},
                                    {"repeat_action_probability": 0.3}])),
    "agent.network": (st.sampled_from(["auto", "shared-conv", "shared-stream", "seed", "stream",
                                       "mlp"]),
                      st.just("resnet")),
    "agent.hidden_size": (st.integers(1, 48), st.sampled_from([0, "wide"])),
    "agent.optimizer": (st.sampled_from(["obgd", "adam"]), st.just("sgd")),
    "agent.lambda": (st.floats(0, 1), st.sampled_from([1.5, -0.1])),
    "agent.gamma": (st.floats(0, 1), st.sampled_from(["high", 1.01])),
    "agent.lr": (st.floats(1e-5, 2), st.sampled_from([0, -1e-3])),
    "agent.td_error_clip": (st.one_of(st.none(), st.floats(0.1, 10)), st.sampled_from([0, -1])),
    "agent.entropy_coeff": (st.floats(0, 0.1), st.just(-0.01)),
    "agent.kappa_policy": (st.one_of(st.just("auto"), st.floats(0.5, 4)),
                           st.sampled_from([0, -1, "big"])),
    "agent.kappa_value": (st.one_of(st.just("auto"), st.floats(0.5, 4)), st.just("auto?")),
    "agent.entropy_floor": (st.one_of(st.none(), st.floats(0, 1)), st.just(1.5)),
    "agent.entropy_floor_final": (st.one_of(st.none(), st.floats(0, 1)), st.just(-0.1)),
    "agent.entropy_floor_decay_start": (st.integers(0, 10**7), st.just(-1)),
    "agent.entropy_floor_decay_steps": (st.integers(1, 10**7), st.just(0)),
    "agent.reward_transform": (st.sampled_from(["scale", "clip", "none"]), st.just("log")),
    "agent.normalize_observations": (st.booleans(), st.just("yes please")),
    "agent.max_grad_norm": (st.one_of(st.none(), st.floats(0.1, 10)), st.just(-1)),
    "agent.compile": (st.one_of(st.just("auto"), st.booleans()), st.just("twice")),
    "checkpoint.every_steps": (st.one_of(st.none(), st.integers(1, 1000)), st.just(0)),
    "checkpoint.every_seconds": (st.one_of(st.none(), st.floats(1, 600)), st.just(0.5)),
    "checkpoint.keep": (st.integers(1, 4), st.just(0)),
    "run.onednn": (st.sampled_from(["auto", "on", "off"]), st.just("fast")),
    "log.video_every_games": (st.integers(0, 2), st.just(-1)),
    "log.level": (st.sampled_from(["INFO", "WARNING"]), st.just("LOUD")),
    "faults.on_nonfinite": (st.sampled_from(["skip", "rollback"]), st.just("ignore")),
    "faults.stream_backoff_seconds": (st.floats(0, 5), st.just(-1)),
    "faults.stream_backoff_max_seconds": (st.floats(0, 60), st.just(-1)),
    "faults.stream_max_failures": (st.integers(1, 5), st.just(0)),
    "seed": (st.integers(0, 2**32 - 1), st.sampled_from([-1, 2**64])),
}
INTERACTING = {"env.screen_size", "env.kwargs", "agent.network", "agent.optimizer",
               "agent.td_error_clip",
               "checkpoint.every_steps", "checkpoint.every_seconds",
               "faults.stream_backoff_seconds", "faults.stream_backoff_max_seconds",
               "log.video_every_games"}
# Lines that are wrong whatever else is set: the error names the line's key.
BAD_LINES = {"agent.nonsense=1": "agent.nonsense", "env.bogus=true": "env.bogus",
             "nonsense=3": "nonsense", "agent.gamma.deeper=1": "agent.gamma.deeper",
             "agent.gamma": "--set agent.gamma", "=3": "--set =3"}


def cross_problems(sets: dict[str, Any]) -> set[str]:
    """The keys a combination of individually valid values makes wrong (`sets` holds the
    valid ones; an unknown env id leaves only the rules that do not depend on it)."""
    problems = set()
    if sets.get("agent.td_error_clip") is not None and sets.get("agent.optimizer") != "adam":
        problems.add("agent.td_error_clip")
    if "checkpoint.every_steps" in sets and sets["checkpoint.every_steps"] is None \
            and "checkpoint.every_seconds" in sets and sets["checkpoint.every_seconds"] is None:
        problems.add("checkpoint.every_steps")
    if sets.get("faults.stream_backoff_max_seconds", 60.0) \
            < sets.get("faults.stream_backoff_seconds", 1.0):
        problems.add("faults.stream_backoff_max_seconds")
    if "env.id" not in sets:
        return problems
    frames = sets["env.id"] in FRAMES
    network = sets.get("agent.network", "auto")
    network = ("shared-stream" if frames else "mlp") if network == "auto" else network
    kwargs = sets.get("env.kwargs", {})
    if network in SMALLEST_FRAME and not frames or network == "mlp" and frames:
        problems.add("agent.network")
    elif network in SMALLEST_FRAME and sets.get("env.screen_size", 84) < SMALLEST_FRAME[network]:
        problems.add("env.screen_size")
    if sets.get("log.video_every_games", 0) and not frames \
            and kwargs.get("render_mode") != "rgb_array":
        problems.add("log.video_every_games")
    return problems


@st.composite
def examples(draw: st.DrawFn) -> tuple[list[str], set[str]]:
    """`--set` lines and the keys the error may name (empty: the config must run)."""
    bad_env = draw(st.integers(0, 11)) == 0
    sets: dict[str, Any] = {"env.id": draw(st.sampled_from(
        BAD_ENVS if bad_env else [*ENVS, *FRAMES]))}  # frames twice as often
    wrong = {"env.id"} if bad_env else set()
    for key in sorted(KEYS):
        if draw(st.integers(0, 9)) >= (3 if key in INTERACTING else 1):
            continue  # keys that meet other keys' rules are set more often
        invalid = draw(st.integers(0, 11)) == 0
        sets[key] = draw(KEYS[key][1] if invalid else KEYS[key][0])
        wrong |= {key} if invalid else set()
    lines = [f"{key}={json.dumps(value)}" for key, value in sets.items()]
    if draw(st.integers(0, 7)) == 0:
        line = draw(st.sampled_from(sorted(BAD_LINES)))
        lines.insert(draw(st.integers(0, len(lines))), line)
        wrong.add(BAD_LINES[line])
    # Which of several faults is named depends on the order of the checks: any will do.
    wrong |= cross_problems({k: v for k, v in sets.items() if k not in wrong})
    return lines, wrong


def _argv(lines: list[str], run_dir: Path) -> list[str]:
    argv = ["--config", str(ROOT / "config.yaml"), "--run-dir", str(run_dir),
            "--max-steps", "3", "--set", "log.status_every_seconds=0.1",
            "--set", "export.on_stop=false"]
    for line in lines:
        argv += ["--set", line]
    return argv


def _check(code: int, stderr: str, run_dir: Path, wrong: set[str], lines: list[str]) -> None:
    assert "Traceback" not in stderr, (lines, stderr)
    if not wrong:
        assert code == 0, (lines, stderr)
        status = json.loads((run_dir / "status.json").read_text())
        assert status["step"] == 3 and status["state"] == "stopped", lines
        return
    errors = [line for line in stderr.strip().splitlines()
              if line and not line.startswith(("A.L.E:", "[Powered by Stella]"))]
    assert code == 2 and len(errors) == 1, (lines, code, stderr)
    assert any(errors[0].startswith(f"daemon: error: {key}:") for key in wrong), \
        (lines, wrong, errors[0])


def test_generated_configs_run_or_exit_2_naming_the_key() -> None:
    outcomes: Counter[int] = Counter()

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(examples())
    def check(example: tuple[list[str], set[str]]) -> None:
        lines, wrong = example
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                code = main(_argv(lines, run_dir))
            _check(code, stderr.getvalue(), run_dir, wrong, lines)
        outcomes[code] += 1

    check()
    print(f"generated configs tried in process: {sum(outcomes.values())} "
          f"(ran: {outcomes[0]}, refused with exit 2: {outcomes[2]})")
    assert sum(outcomes.values()) == 200
    # Both sides of the property were tried (about one config in five draws no fault).
    assert outcomes[0] >= 25 and outcomes[2] >= 40


def test_generated_configs_as_real_processes() -> None:
    tried: list[int] = []

    @settings(max_examples=4, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(examples())
    def check(example: tuple[list[str], set[str]]) -> None:
        lines, wrong = example
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            done = subprocess.run([sys.executable, "-m", "runtime.daemon",
                                   *_argv(lines, run_dir)], cwd=ROOT, env=_env(), text=True,
                                  capture_output=True, timeout=120)
            _check(done.returncode, done.stderr, run_dir, wrong, lines)
        tried.append(done.returncode)

    check()
    assert len(tried) == 4
