"""The deploy contract (runtime.contract): metadata that exporters wrote stays readable,
what is written stays the same, and bad option values are refused naming the key."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from runtime.contract import OPTION_NAMES, REQUIRED_OPTION_NAMES, StreamError, StreamOptions
from runtime.daemon.config import EnvConfig, load_config
from runtime.daemon.export import build_metadata
from runtime.device.follow import STREAM_KEYS
from runtime.device.policy import REQUIRED_KEYS, ModelError, parse_metadata
from runtime.streams import StreamSpec
from tests.conftest import ROOT, _env

MEANINGS = ("NOOP", "FIRE", "RIGHT", "LEFT")
# Written by the exporter before the options moved into runtime.contract (the same bytes a
# policy published by an older daemon carries): readers must keep taking it as it is.
OLD_BREAKOUT = {
    "format_version": "1", "env_id": "ALE/Breakout-v5", "observation_shape": "[3, 64, 64]",
    "observation_dtype": "uint8", "frame_stack": "3", "frame_skip": "3", "num_actions": "4",
    "action_meanings": '["NOOP", "FIRE", "RIGHT", "LEFT"]', "training_step": "60",
    "screen_size": "64", "noop_max": "12", "terminal_on_life_loss": "false",
    "repeat_action_probability": "0.25", "env_kwargs": '{"difficulty": 1, "mode": 4}',
    "network": "seed", "producer": "tools/export_onnx.py",
}
OLD_CARTPOLE = {
    "format_version": "1", "env_id": "CartPole-v1", "observation_shape": "[4]",
    "observation_dtype": "float32", "frame_stack": "1", "frame_skip": "1", "num_actions": "2",
    "action_meanings": '["0", "1"]', "training_step": "300", "screen_size": "84",
    "noop_max": "30", "terminal_on_life_loss": "true", "repeat_action_probability": "0.0",
    "env_kwargs": "{}", "network": "mlp", "producer": "runtime.daemon",
}


def test_exporter_writes_what_it_wrote_before() -> None:
    custom = load_config(None, ["env.repeat_action_probability=0.25",
                                "env.terminal_on_life_loss=false",
                                "env.kwargs={mode: 4, difficulty: 1}", "env.frame_stack=3",
                                "env.frame_skip=3", "env.screen_size=64", "env.noop_max=12"])
    spec = StreamSpec((3, 64, 64), "uint8", 4, MEANINGS, 3, 3)
    # ... and, since the time feature was added, what the stream made of `auto`.
    assert build_metadata(custom, spec, 60, "seed", "tools/export_onnx.py") == {
        **OLD_BREAKOUT, "time_feature": "false"}
    # A non-Atari stream: frame_stack and frame_skip as played (1), the rest as configured.
    cartpole = load_config(None, ["env.id=CartPole-v1"])
    spec = StreamSpec((4,), "float32", 2, ("0", "1"), 1, 1)
    assert build_metadata(cartpole, spec, 300, "mlp", "runtime.daemon") == {
        **OLD_CARTPOLE, "time_feature": "false"}
    timed = StreamSpec((5,), "float32", 2, ("0", "1"), 1, 1, time_feature=True)
    written = build_metadata(cartpole, timed, 300, "mlp", "runtime.daemon")
    assert written["time_feature"] == "true" and parse_metadata(written)["time_feature"] is True


def test_old_metadata_reads_back_with_its_types() -> None:
    meta = parse_metadata(OLD_BREAKOUT)
    assert meta["observation_shape"] == (3, 64, 64) and meta["action_meanings"] == MEANINGS
    options = {name: meta[name] for name in OPTION_NAMES}
    assert options == {"frame_skip": 3, "screen_size": 64, "frame_stack": 3, "noop_max": 12,
                       "terminal_on_life_loss": False, "repeat_action_probability": 0.25,
                       "time_feature": False}  # policies from before it had none
    assert type(meta["repeat_action_probability"]) is float
    assert type(meta["terminal_on_life_loss"]) is bool
    assert meta["env_kwargs"] == {"difficulty": 1, "mode": 4}
    assert parse_metadata(OLD_CARTPOLE)["frame_skip"] == 1


BAD_OPTION_VALUES = {"frame_skip": ["0", "4.0", "x"], "screen_size": ["7", "211"],
                     "frame_stack": ["0", "true"], "noop_max": ["-1", "null"],
                     "terminal_on_life_loss": ["1", "True"],
                     "repeat_action_probability": ["1.0", "-0.1", '"0.1"'],
                     "time_feature": ["1", '"yes"', "null"]}


def test_every_option_is_checked() -> None:
    assert set(BAD_OPTION_VALUES) == set(OPTION_NAMES)


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, values in BAD_OPTION_VALUES.items()
                                            for v in values])
def test_bad_option_metadata_is_refused_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(ModelError) as err:
        parse_metadata({**OLD_BREAKOUT, key: value}, "p.onnx")
    assert str(err.value).startswith(f"p.onnx: metadata {key} {value!r}")
    assert "\n" not in str(err.value)


def test_options_round_trip_and_refuse_bad_values() -> None:
    options = StreamOptions(frame_skip=2, screen_size=96, frame_stack=1, noop_max=0,
                            terminal_on_life_loss=False, repeat_action_probability=0.5,
                            time_feature=True)
    assert StreamOptions.from_metadata(options.to_metadata()) == options
    plain = StreamOptions(frame_skip=np.int64(2), repeat_action_probability=0)
    assert type(plain.frame_skip) is int and type(plain.repeat_action_probability) is float
    assert StreamOptions.from_metadata(plain.to_metadata()) == plain
    with pytest.raises(StreamError, match="screen_size: must be in") as err:
        StreamOptions(screen_size=4)
    assert err.value.key == "screen_size"


def test_one_list_of_options_everywhere() -> None:
    """The config section, the metadata reader and the follower take the contract's list."""
    config_fields = [f.name for f in dataclasses.fields(EnvConfig)]
    assert config_fields == ["id", "kwargs", *OPTION_NAMES]  # as config.yaml lists them
    assert set(REQUIRED_OPTION_NAMES) <= set(REQUIRED_KEYS)
    assert set(OPTION_NAMES) <= set(STREAM_KEYS)
    assert dataclasses.asdict(StreamOptions.of(EnvConfig())) == dataclasses.asdict(
        StreamOptions())


def test_contract_imports_the_standard_library_only() -> None:
    script = ("import sys, json; import runtime.contract; "
              "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules}"
              " - set(sys.stdlib_module_names))))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env=_env())
    assert done.returncode == 0, done.stderr
    # Besides runtime itself, only what site and an editable install put there.
    assert [m for m in json.loads(done.stdout) if not m.startswith("_")] == ["runtime"]
