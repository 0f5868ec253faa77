"""ONNX export of the actor and the torch-free inference runtime, as users run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from agent.learner import A2CLearner
from runtime.daemon.checkpoints import CheckpointStore, read_checkpoint
from runtime.daemon.config import EnvConfig, from_dict
from runtime.device.play import check_fits, make_stream_from_metadata
from runtime.device.policy import ModelError, Policy
from runtime.streams import make_stream, open_stream
from tests.conftest import CARTPOLE, ROOT, _env, cli
from tools import export_onnx as ex

EXPORT = ROOT / "tools" / "export_onnx.py"
BREAKOUT_STEPS = 200


def _export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXPORT), *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, env=_env())


def _train(run_dir: Path, steps: int, *extra: str) -> Path:
    done = cli("runtime.daemon", "--config", "config.yaml", "--run-dir", str(run_dir),
               "--max-steps", str(steps), "--set", "checkpoint.every_steps=100000", *extra)
    assert done.returncode == 0, done.stderr
    return CheckpointStore(run_dir / "checkpoints", 1).paths()[0]


@pytest.fixture(scope="module")
def breakout(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A short Breakout run, its checkpoint and its exported actor (made once)."""
    base = tmp_path_factory.mktemp("breakout")
    ckpt = _train(base / "run", BREAKOUT_STEPS)
    out = base / "policy.onnx"
    done = _export("--run-dir", str(base / "run"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return {"run_dir": base / "run", "checkpoint": ckpt, "model": out,
            "summary": json.loads(done.stdout)}


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("cartpole")
    ckpt = _train(base / "run", 300, *CARTPOLE)
    out = base / "cartpole.onnx"
    done = _export("--checkpoint", str(ckpt), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return {"checkpoint": ckpt, "model": out, "summary": json.loads(done.stdout)}


def _resumed_actor(payload: dict) -> torch.nn.Module:
    """The actor as the learner itself resumes it from a checkpoint: not the exporter's
    way of reading one, so that the two check each other."""
    spec = payload["spec"]
    config = from_dict(payload["config"]).on_network(spec["network"])
    learner = A2CLearner(config.agent, tuple(spec["observation_shape"]),
                         int(spec["num_actions"]), seed=12345)  # not the run's initialisation
    learner.load_state_dict(payload["learner"])
    return learner.net.policy().eval()


def _parity(model: Path, checkpoint: Path, seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Max |logit diff| and greedy actions of onnxruntime vs the learner's actor, on real
    stream observations the exporter did not see (another seed)."""
    payload = read_checkpoint(checkpoint)
    actor = _resumed_actor(payload)
    policy = Policy.load(model)
    frames = ex.stream_frames(policy.metadata, 48, seed)
    ours = np.stack([policy.logits(f[None])[0] for f in frames])
    with torch.no_grad():
        ref = actor(torch.from_numpy(frames)).numpy()
    ours_actions = np.array([policy.act(f) for f in frames])
    return float(np.abs(ours - ref).max()), ours_actions, ref.argmax(axis=-1)


def test_breakout_export_summary_and_single_file(breakout: dict) -> None:
    summary, model = breakout["summary"], breakout["model"]
    assert summary["path"] == str(model) and summary["size_bytes"] == model.stat().st_size
    assert summary["max_abs_logit_diff"] <= 1e-4 and summary["action_agreement"] == 1.0
    assert summary["opset"] == 17
    assert [p.name for p in model.parent.iterdir() if p.name.startswith("policy")] \
        == ["policy.onnx"]  # weights inside: no .onnx.data beside it
    proto = onnx.load(str(model))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    (inp,) = proto.graph.input
    assert inp.name == "observation"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [4, 84, 84]
    assert [o.name for o in proto.graph.output] == ["logits", "action"]


def test_breakout_parity_with_torch_actor(breakout: dict) -> None:
    diff, ours, ref = _parity(breakout["model"], breakout["checkpoint"], seed=7)
    assert diff <= 1e-4
    assert (ours == ref).all()


def test_cartpole_parity_float_vectors(cartpole: dict) -> None:
    assert cartpole["summary"]["max_abs_logit_diff"] <= 1e-4
    policy = Policy.load(cartpole["model"])
    assert policy.observation_dtype == np.float32 and policy.observation_shape == (4,)
    diff, ours, ref = _parity(cartpole["model"], cartpole["checkpoint"], seed=11)
    assert diff <= 1e-4
    assert (ours == ref).all()
    batch = policy.logits(np.zeros((5, 4), dtype=np.float32))  # dynamic batch axis
    assert batch.shape == (5, 2)


def test_metadata_round_trips(breakout: dict) -> None:
    payload = read_checkpoint(breakout["checkpoint"])
    meta = Policy.load(breakout["model"]).metadata
    spec = payload["spec"]
    stream = make_stream("ALE/Breakout-v5", seed=0)
    stream.close()
    assert meta["format_version"] == "1"
    assert meta["env_id"] == spec["env_id"] == "ALE/Breakout-v5"
    assert list(meta["observation_shape"]) == spec["observation_shape"] == [4, 84, 84]
    assert meta["observation_dtype"] == spec["observation_dtype"] == "uint8"
    assert meta["num_actions"] == spec["num_actions"] == 4
    assert meta["action_meanings"] == stream.spec.action_meanings
    assert meta["training_step"] == payload["counters"]["steps"] == BREAKOUT_STEPS
    env = payload["config"]["env"]
    for key in ("frame_stack", "frame_skip", "screen_size", "noop_max",
                "terminal_on_life_loss", "repeat_action_probability"):
        assert meta[key] == env[key], key
    assert meta["env_kwargs"] == env["kwargs"]


# Every preprocessing option away from its default, so a dropped or misread one shows.
CUSTOM = {"repeat_action_probability": 0.25, "terminal_on_life_loss": False,
          "kwargs": {"mode": 4, "difficulty": 1}, "frame_stack": 3, "frame_skip": 3,
          "screen_size": 64, "noop_max": 12}


@pytest.fixture(scope="module")
def breakout_custom(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("breakout-custom")
    sets = [f"env.{key}={json.dumps(value)}" for key, value in CUSTOM.items()]
    ckpt = _train(base / "run", 60, *sum((["--set", s] for s in sets), []))
    out = base / "custom.onnx"
    done = _export("--checkpoint", str(ckpt), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return {"checkpoint": ckpt, "model": out}


def test_metadata_round_trips_non_default_settings(breakout_custom: dict) -> None:
    payload = read_checkpoint(breakout_custom["checkpoint"])
    meta = Policy.load(breakout_custom["model"]).metadata
    env = payload["config"]["env"]
    defaults = EnvConfig()
    for key, value in CUSTOM.items():
        assert getattr(defaults, key) != value, key  # really not the default
        assert env[key] == value, key
        assert meta["env_kwargs" if key == "kwargs" else key] == value, key
    assert list(meta["observation_shape"]) == [3, 64, 64]
    # The stream rebuilt from the metadata alone is the training stream: on the same seed
    # (sticky actions draw from it) it hands out the same frames, rewards and ends.
    rebuilt = make_stream_from_metadata(meta, seed=5)
    training = open_stream(from_dict(payload["config"]).env, 5)
    steps = []
    for stream in (rebuilt, training):
        actions = iter(np.random.default_rng(6).integers(4, size=600))
        frames = [stream.reset().tobytes()]
        for action in actions:
            obs, reward, terminated, truncated, info = stream.step(int(action))
            frames.append((obs.tobytes(), reward, terminated, truncated, info["lives"]))
            if terminated or truncated:
                frames.append(stream.reset().tobytes())
        steps.append(frames)
        stream.close()
    assert steps[0] == steps[1]
    assert any(f[4] < 5 for f in steps[0] if isinstance(f, tuple))  # lives were lost...
    assert not any(f[2] and f[4] > 0 for f in steps[0] if isinstance(f, tuple))  # ...not ends


def test_infer_cli_plays_breakout(breakout: dict) -> None:
    done = cli("runtime.infer", "--model", str(breakout["model"]), "--max-steps", "200",
               "--seed", "3")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["env_id"] == "ALE/Breakout-v5"
    assert 0 < result["steps"] <= 200 and result["steps_per_s"] > 0
    assert 0 < result["latency_us_p50"] <= result["latency_us_p99"]
    assert len(result["returns"]) == result["games"]
    assert result["games"] == 1 or "unfinished_game_return" in result


def test_runtime_is_torch_free(breakout: dict, tmp_path: Path) -> None:
    """With torch (and onnx) made unimportable, the runtime still imports and plays."""
    for name in ("torch", "onnx"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not available on this device')\n")
    script = (
        "import sys, json\n"
        "import runtime.infer as infer\n"
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules\n"
        f"code = infer.main(['--model', {str(breakout['model'])!r}, '--max-steps', '60',"
        " '--sample'])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('torch', 'onnx', 'agent') or m in ('runtime.daemon.config', 'runtime.daemon',"
        " 'runtime.daemon.checkpoints'))\n"
        "assert code == 0 and not bad, (code, bad)\n"
    )
    env = _env()
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 60


def test_mismatched_model_is_refused(cartpole: dict) -> None:
    done = cli("runtime.infer", "--model", str(cartpole["model"]), "--env", "ALE/Breakout-v5")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("infer: error: ") and "shape" in lines[-1]
    assert "(4,)" in lines[-1] and "Traceback" not in done.stderr
    policy = Policy.load(cartpole["model"])
    stream = make_stream("ALE/Breakout-v5", seed=0)
    stream.close()
    with pytest.raises(ModelError, match="shape"):
        check_fits(policy, stream.spec)


def _one_error_line(stderr: str, prog: str) -> str:
    lines = [line for line in stderr.strip().splitlines()
             if not line.startswith(("A.L.E:", "[Powered by Stella]"))]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: "), stderr
    return lines[0]


def test_infer_errors_exit_2_with_one_line(breakout: dict, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from runtime import infer

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf")
    proto = onnx.load(str(breakout["model"]))
    del proto.metadata_props[:]
    no_meta = tmp_path / "no_meta.onnx"
    onnx.save(proto, str(no_meta))
    cases = {
        "not found": ["--model", str(tmp_path / "missing.onnx")],
        "not a loadable ONNX": ["--model", str(garbage)],
        "format_version": ["--model", str(no_meta)],
        "unknown environment id": ["--model", str(breakout["model"]), "--env", "NoSuchEnv-v9"],
        "--games": ["--model", str(breakout["model"]), "--games", "0"],
        "--games/--episodes": ["--model", str(breakout["model"]), "--episodes", "0"],
    }
    for needle, argv in cases.items():
        assert infer.main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err, "infer")
        assert needle in line, line
    with pytest.raises(ModelError, match="format_version"):
        Policy.load(no_meta)


def test_bad_export_invocations_exit_2(breakout: dict, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "ckpt-000000000001.pt"
    corrupt.write_bytes(breakout["checkpoint"].read_bytes()[:-100])
    (tmp_path / "empty_run").mkdir()
    out = str(tmp_path / "p.onnx")
    ckpt = str(breakout["checkpoint"])
    cases = {
        "not found": ["--run-dir", str(tmp_path / "nope"), "--out", out],
        "no checkpoint": ["--run-dir", str(tmp_path / "empty_run"), "--out", out],
        "checksum": ["--checkpoint", str(corrupt), "--out", out],
        "does not exist": ["--checkpoint", ckpt, "--out", str(tmp_path / "no" / "p.onnx")],
        "--opset 5": ["--checkpoint", ckpt, "--out", out, "--opset", "5"],
        "required": ["--out", out],
    }
    for needle, argv in cases.items():
        assert ex.main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err, "export_onnx")
        assert needle in line, line
    assert not Path(out).exists()
    # And as a real process: no traceback, one line.
    done = _export("--checkpoint", str(corrupt), "--out", out)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    _one_error_line(done.stderr, "export_onnx")


def test_sampled_actions_follow_the_logits(cartpole: dict) -> None:
    policy = Policy.load(cartpole["model"])
    obs = np.array([0.01, -0.02, 0.03, 0.0], dtype=np.float32)
    logits = policy.logits(obs[None])[0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    rng = np.random.default_rng(0)
    counts = np.bincount([policy.act(obs, sample=True, rng=rng) for _ in range(2000)],
                         minlength=2)
    assert np.allclose(counts / 2000, probs, atol=0.05)
    assert policy.act(obs) == int(np.argmax(logits))
    with pytest.raises(ValueError, match="shape"):
        policy.act(np.zeros(5, dtype=np.float32))


def test_int8_agrees_with_the_float_model(cartpole: dict, tmp_path: Path) -> None:
    out = tmp_path / "cp.onnx"
    done = _export("--checkpoint", str(cartpole["checkpoint"]), "--out", str(out),
                   "--quantize", "int8")
    assert done.returncode == 0, done.stderr
    int8 = json.loads(done.stdout)["int8"]
    path = tmp_path / "cp.int8.onnx"
    assert int8["path"] == str(path) and int8["kept"]
    assert int8["action_agreement"] >= 0.97 and int8["held_out_frames"] == 256
    assert int8["size_bytes"] == path.stat().st_size < out.stat().st_size
    # Measured again here, on 256 frames of another seed the exporter never saw.
    float_policy, int8_policy = Policy.load(out), Policy.load(path)
    frames = ex.stream_frames(float_policy.metadata, 256, seed=21)
    agreement = float(np.mean(float_policy.logits(frames).argmax(axis=-1)
                              == int8_policy.logits(frames).argmax(axis=-1)))
    assert agreement >= 0.97, agreement
    assert int8_policy.metadata["env_id"] == "CartPole-v1"
    assert float_policy.metadata["num_actions"] == 2  # the float model stays valid


def test_record_writes_one_video_per_game(breakout: dict, tmp_path: Path) -> None:
    done = cli("runtime.infer", "--model", str(breakout["model"]), "--max-steps", "40",
               "--record", str(tmp_path / "videos"))
    assert done.returncode == 0, done.stderr
    videos = json.loads(done.stdout)["videos"]
    assert videos == [str(tmp_path / "videos" / "game-0000.mp4")]
    assert Path(videos[0]).stat().st_size > 1000


def test_a_time_feature_run_exports_and_plays_with_its_clock(tmp_path: Path) -> None:
    """The time feature is part of the deploy contract: the device rebuilds the observation
    with the clock from the policy's metadata alone."""
    ckpt = _train(tmp_path / "run", 250, "--set", "env.id=MountainCar-v0",
                  "--set", "env.time_feature=auto")
    out = tmp_path / "timed.onnx"
    done = _export("--checkpoint", str(ckpt), "--out", str(out))
    assert done.returncode == 0, done.stderr
    policy = Policy.load(out)
    assert policy.observation_shape == (3,) and policy.metadata["time_feature"] is True
    stream = make_stream_from_metadata(policy.metadata, seed=1)
    assert stream.spec.observation_shape == (3,) and stream.reset()[-1] == -0.5
    diff, ours, ref = _parity(out, ckpt, seed=4)
    assert diff <= 1e-4 and (ours == ref).all()
    played = cli("runtime.infer", "--model", str(out), "--max-steps", "250")
    assert played.returncode == 0, played.stderr
    assert json.loads(played.stdout)["games"] == 1  # the 200-step limit ended one game
    # Without the clock the same stream does not fit the model: refused, one line.
    refused = cli("runtime.daemon", "--config", "config.yaml", "--run-dir",
                  str(tmp_path / "run"), "--max-steps", "300", "--set", "env.id=MountainCar-v0")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "observation_shape is [3] there, [2] here" in refused.stderr.strip().splitlines()[-1]
