"""Tests for runtime.streams: Atari preprocessing, gym adapter, errors, no torch."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from runtime.streams import (
    AtariStream,
    GymStream,
    Stream,
    StreamError,
    StreamOptions,
    area_resize_weights,
    make_stream,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
BREAKOUT = "ALE/Breakout-v5"


def _reference_area_resize(frame: np.ndarray) -> np.ndarray:
    """Exact 210x160 -> 84x84 area average by integer supersampling.

    Repeating rows x2 (420 = 84*5) and columns x21 (3360 = 84*40) makes every
    output pixel an exact block mean, independent of the weight matrices.
    """
    up = np.repeat(np.repeat(frame.astype(np.float64), 2, axis=0), 21, axis=1)
    return up.reshape(84, 5, 84, 40).mean(axis=(1, 3))


def _play_until_game_over(
    stream: Stream, rng: np.random.Generator, max_steps: int = 4000
) -> list[dict]:
    """Random actions until a whole game ends; returns the terminal infos."""
    stream.reset()
    ends = []
    for _ in range(max_steps):
        _, _, terminated, truncated, info = stream.step(int(rng.integers(stream.spec.num_actions)))
        if terminated or truncated:
            ends.append({"terminated": terminated, "truncated": truncated, **info})
            if info["game_over"]:
                return ends
            stream.reset()
    raise AssertionError(f"no game over within {max_steps} steps")


def test_atari_spec_shape_dtype() -> None:
    stream = make_stream(BREAKOUT, seed=0)
    assert isinstance(stream, AtariStream)
    assert isinstance(stream, Stream)
    spec = stream.spec
    assert spec.observation_shape == (4, 84, 84)
    assert spec.observation_dtype == "uint8"
    assert spec.action_meanings == ("NOOP", "FIRE", "RIGHT", "LEFT")
    assert (spec.num_actions, spec.frame_stack, spec.frame_skip) == (4, 4, 4)
    obs = stream.reset()
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    obs, reward, terminated, truncated, info = stream.step(0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert isinstance(reward, float) and not terminated and not truncated
    assert info["game_over"] is False and info["lives"] == 5 and "frame_number" in info
    rgb = stream.render_rgb()
    assert rgb is not None and rgb.shape == (210, 160, 3) and rgb.dtype == np.uint8
    stream.close()


def test_atari_stacking_order_and_fresh_arrays() -> None:
    stream = make_stream(BREAKOUT, seed=1)
    obs = stream.reset()
    # No history on a new game: all slots hold the first frame.
    assert all(np.array_equal(obs[0], obs[i]) for i in range(4))
    rng = np.random.default_rng(0)
    for _ in range(20):
        kept = obs.copy()
        new, *_ = stream.step(int(rng.integers(4)))
        assert np.array_equal(new[:-1], obs[1:]), "newest frame must be last"
        assert np.array_equal(obs, kept), "a step must not mutate an earlier observation"
        assert new is not obs
        obs = new
    # The screen changes while playing, so the newest frame is a real new one.
    assert not np.array_equal(obs[0], obs[-1])


def test_area_resize_constant_and_reference() -> None:
    wr, wc = area_resize_weights(210, 84), area_resize_weights(160, 84)
    np.testing.assert_allclose(wr.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(wc.sum(axis=1), 1.0, rtol=1e-6)
    stream = make_stream(BREAKOUT, seed=0)
    assert isinstance(stream, AtariStream)
    stream.reset()

    def resize(frame: np.ndarray) -> np.ndarray:
        stream._pooled[...] = frame  # drive the real hot-path resize
        stream._push_frame()
        return stream._stack[-1].copy()

    assert np.all(resize(np.full((210, 160), 137, np.uint8)) == 137)
    assert np.all(resize(np.full((210, 160), 255, np.uint8)) == 255)
    rng = np.random.default_rng(0)
    screen = stream._ale.getScreenGrayscale()
    for frame in (rng.integers(0, 256, (210, 160), dtype=np.uint8), screen):
        ours = resize(frame).astype(np.int32)
        ref = np.rint(_reference_area_resize(frame)).astype(np.int32)
        assert np.abs(ours - ref).max() <= 1


def test_life_loss_is_terminal_but_not_game_over() -> None:
    stream = make_stream(BREAKOUT, seed=2)
    ends = _play_until_game_over(stream, np.random.default_rng(2))
    life_losses = [e for e in ends if not e["game_over"]]
    assert len(life_losses) == 4  # Breakout has 5 lives
    assert all(e["terminated"] and not e["truncated"] for e in ends)
    assert [e["lives"] for e in life_losses] == [4, 3, 2, 1]
    assert ends[-1]["game_over"] and ends[-1]["lives"] == 0
    # After a real game over, reset starts a fresh game with all lives.
    stream.reset()
    *_, info = stream.step(0)
    assert info["lives"] == 5 and not info["game_over"]


def test_reset_after_life_loss_keeps_stack_continuous() -> None:
    stream = make_stream(BREAKOUT, seed=3)
    rng = np.random.default_rng(3)
    stream.reset()
    for _ in range(4000):
        obs, _, terminated, _, info = stream.step(int(rng.integers(4)))
        if terminated:
            break
    assert terminated and not info["game_over"]
    after = stream.reset()
    # reset() pressed FIRE once: one new frame pushed, history kept.
    assert np.array_equal(after[:-1], obs[1:])
    *_, info = stream.step(0)
    assert info["lives"] == 4


def test_life_loss_not_terminal_when_disabled() -> None:
    opts = StreamOptions(terminal_on_life_loss=False)
    stream = make_stream(BREAKOUT, seed=4, options=opts)
    ends = _play_until_game_over(stream, np.random.default_rng(4), max_steps=8000)
    assert len(ends) == 1 and ends[0]["game_over"] and ends[0]["terminated"]


def test_truncation_is_game_over() -> None:
    for kwargs in ({"max_num_frames_per_episode": 400}, {"max_episode_steps": 400}):
        # Life losses would end learning episodes first; only truncation here.
        opts = StreamOptions(terminal_on_life_loss=False)
        stream = make_stream(BREAKOUT, kwargs, seed=0, options=opts)
        stream.reset()
        for _ in range(200):
            _, _, terminated, truncated, info = stream.step(1)
            if terminated or truncated:
                break
        assert truncated and not terminated and info["game_over"], kwargs
        # ALE stops at exactly 400 frames; the TimeLimit check may overshoot
        # by up to frame_skip - 1 frames.
        assert 400 <= info["episode_frame_number"] < 404, kwargs


def test_atari_determinism() -> None:
    def run(seed: int) -> list[np.ndarray]:
        stream = make_stream(BREAKOUT, seed=seed)
        rng = np.random.default_rng(123)
        out = [stream.reset()]
        for _ in range(400):
            obs, _, terminated, truncated, _ = stream.step(int(rng.integers(4)))
            out.append(obs)
            if terminated or truncated:
                out.append(stream.reset())
        return out

    a, b = run(7), run(7)
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_cartpole_gym_stream() -> None:
    stream = make_stream("CartPole-v1", seed=0)
    assert isinstance(stream, GymStream)
    assert stream.spec.observation_shape == (4,)
    assert stream.spec.observation_dtype == "float32"
    assert stream.spec.action_meanings == ("0", "1")
    assert (stream.spec.frame_stack, stream.spec.frame_skip) == (1, 1)
    assert stream.render_rgb() is None
    obs = stream.reset()
    assert obs.shape == (4,) and obs.dtype == np.float32
    games = 0
    for _ in range(500):
        obs, reward, terminated, truncated, info = stream.step(0)
        assert obs.dtype == np.float32 and reward == 1.0
        assert info["game_over"] == (terminated or truncated)
        if terminated or truncated:
            games += 1
            stream.reset()
    assert games > 5  # always pushing left ends episodes quickly


def test_gym_stream_seeded_once() -> None:
    first = [make_stream("CartPole-v1", seed=5) for _ in range(2)]
    starts = [[s.reset() for _ in range(3)] for s in first]
    for x, y in zip(*starts, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(starts[0][0], starts[0][1])  # RNG continues


def test_unknown_env_id_raises_stream_error() -> None:
    for env_id in ("Foo-v0", "ALE/NoSuchGame-v5", "Nope/Foo-v0"):
        with pytest.raises(StreamError, match=f"unknown environment id '{env_id}'") as exc:
            make_stream(env_id)
        assert "\n" not in str(exc.value)
    assert issubclass(StreamError, ValueError)


def test_bad_kwargs_and_spaces_raise_stream_error() -> None:
    with pytest.raises(StreamError, match="bogus"):
        make_stream("CartPole-v1", {"bogus": 1})
    with pytest.raises(StreamError, match="Discrete"):
        make_stream("Pendulum-v1")
    with pytest.raises(StreamError, match="frame_skip"):
        make_stream(BREAKOUT, {"frameskip": 4})
    with pytest.raises(StreamError):
        StreamOptions(frame_skip=0)


def test_streams_module_does_not_import_torch(tmp_path: pathlib.Path) -> None:
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('torch is forbidden in streams')\n")
    script = textwrap.dedent(
        f"""
        import sys
        from runtime.streams import make_stream
        s = make_stream({BREAKOUT!r}, seed=0)
        s.reset()
        obs, *_ = s.step(1)
        assert obs.shape == (4, 84, 84)
        s.load_state_dict(s.state_dict())
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


# -- state capture: a stream restored from its state_dict goes on exactly as the original ----


def _trajectory(stream: Stream, actions: np.ndarray) -> list[tuple]:
    """Everything the stream hands out for these actions, resets included."""
    out = []
    for action in actions:
        obs, reward, terminated, truncated, info = stream.step(int(action))
        out.append((obs.tobytes(), reward, terminated, truncated, info["game_over"]))
        if terminated or truncated:
            out.append((stream.reset().tobytes(),))
    return out


def _through_a_checkpoint(state: dict) -> dict:
    """The state as a checkpoint stores it: torch.save, then a weights_only load."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _play_to(stream: Stream, rng: np.random.Generator, steps: int,
             stop_on_life_loss: bool = False) -> None:
    stream.reset()
    for _ in range(steps):
        _, _, terminated, truncated, info = stream.step(int(rng.integers(stream.spec.num_actions)))
        if terminated and stop_on_life_loss and not info["game_over"]:
            return  # the life-loss reset is still pending
        if terminated or truncated:
            stream.reset()


@pytest.mark.parametrize(("options", "steps", "at_life_loss"), [
    (StreamOptions(repeat_action_probability=0.25), 700, False),
    (StreamOptions(), 300, True),
    (StreamOptions(frame_stack=2, terminal_on_life_loss=False, noop_max=5), 900, False),
], ids=["sticky-mid-game", "at-a-pending-life-loss", "stack-2-whole-games"])
def test_atari_stream_restored_from_its_state_goes_on_identically(
        options: StreamOptions, steps: int, at_life_loss: bool) -> None:
    rng = np.random.default_rng(4)
    original = make_stream(BREAKOUT, seed=4, options=options)
    _play_to(original, rng, steps, stop_on_life_loss=at_life_loss)
    assert original._life_lost_pending == at_life_loss
    state = _through_a_checkpoint(original.state_dict())
    actions = rng.integers(4, size=2500)
    expected = _trajectory(original, actions)
    restored = make_stream(BREAKOUT, seed=99, options=options)  # another seed: state wins
    restored.load_state_dict(state)
    assert _trajectory(restored, actions) == expected
    assert sum(len(t) > 1 and t[4] for t in expected) >= 2  # whole new games were started


@pytest.mark.parametrize(("env_id", "kwargs", "resets"), [
    ("CartPole-v1", {}, 1), ("Acrobot-v1", {}, 0), ("MountainCar-v0", {}, 1),
    ("FrozenLake-v1", {}, 1), ("CliffWalking-v1", {"is_slippery": True}, 0),
    ("Taxi-v4", {"is_rainy": True, "fickle_passenger": True}, 1)])
def test_gym_stream_restored_from_its_state_goes_on_identically(env_id: str, kwargs: dict,
                                                                resets: int) -> None:
    rng = np.random.default_rng(1)
    original = make_stream(env_id, kwargs, seed=1)
    assert original.state_unavailable is None
    _play_to(original, rng, 150)
    state = _through_a_checkpoint(original.state_dict())
    actions = rng.integers(original.spec.num_actions, size=600)
    expected = _trajectory(original, actions)
    restored = make_stream(env_id, kwargs, seed=7)
    restored.load_state_dict(state)
    assert _trajectory(restored, actions) == expected
    assert sum(len(t) == 1 for t in expected) >= resets  # new episodes from the restored RNG


def test_time_feature_is_the_elapsed_fraction_of_the_time_limit() -> None:
    plain = make_stream("MountainCar-v0", seed=3, options=StreamOptions(time_feature=False))
    timed = make_stream("MountainCar-v0", seed=3, options=StreamOptions(time_feature=True))
    assert (plain.spec.observation_shape, timed.spec.observation_shape) == ((2,), (3,))
    assert timed.spec.time_feature and not plain.spec.time_feature
    first = timed.reset()
    assert np.array_equal(first[:-1], plain.reset()) and first[-1] == -0.5
    for elapsed in range(1, 201):  # the registered limit is 200 steps
        obs, _, terminated, truncated, _ = timed.step(elapsed % 3)
        assert np.array_equal(obs[:-1], plain.step(elapsed % 3)[0])
        assert obs[-1] == np.float32(elapsed / 200 - 0.5) and obs.dtype == np.float32
    assert truncated and not terminated and obs[-1] == 0.5
    assert timed.reset()[-1] == -0.5
    # A one-hot observation takes it too; auto adds it where it can, and only there.
    lake = make_stream("FrozenLake-v1", options=StreamOptions(time_feature="auto"))
    assert lake.spec.observation_shape == (17,) and lake.reset()[-1] == -0.5
    assert not make_stream(BREAKOUT, options=StreamOptions(time_feature="auto")).spec.time_feature
    unlimited = make_stream("CliffWalking-v1", options=StreamOptions(time_feature="auto"))
    assert unlimited.spec.observation_shape == (48,)  # registered without a time limit


def test_time_feature_is_refused_where_there_is_no_clock_to_read() -> None:
    for env_id, kwargs, why in [(BREAKOUT, {}, "frames"),
                                ("CliffWalking-v1", {}, "without a limit")]:
        with pytest.raises(StreamError, match=why) as err:
            make_stream(env_id, kwargs, options=StreamOptions(time_feature=True))
        assert err.value.key == "time_feature"
    with pytest.raises(StreamError, match="time_feature: must be bool or auto"):
        StreamOptions(time_feature="yes")


def test_time_feature_goes_on_from_a_restored_state() -> None:
    options = StreamOptions(time_feature=True)
    rng = np.random.default_rng(2)
    original = make_stream("Acrobot-v1", seed=2, options=options)
    _play_to(original, rng, 120)
    state = _through_a_checkpoint(original.state_dict())
    actions = rng.integers(3, size=600)
    expected = _trajectory(original, actions)
    restored = make_stream("Acrobot-v1", seed=5, options=options)
    restored.load_state_dict(state)
    assert _trajectory(restored, actions) == expected


def test_stream_state_is_refused_by_another_stream_and_unknown_envs_say_why() -> None:
    cartpole = make_stream("CartPole-v1", seed=0)
    cartpole.reset()
    with pytest.raises(StreamError, match="not one of"):
        make_stream("Acrobot-v1").load_state_dict(cartpole.state_dict())
    breakout = make_stream(BREAKOUT, seed=0)
    breakout.reset()
    with pytest.raises(StreamError, match="not one of"):
        make_stream("ALE/Pong-v5").load_state_dict(breakout.state_dict())
    with pytest.raises(StreamError, match="not one of"):
        make_stream(BREAKOUT, options=StreamOptions(frame_stack=2)).load_state_dict(
            breakout.state_dict())
    import tests.faulty_env  # noqa: F401  (registers FaultyCartPole-v0)

    subclass = make_stream("FaultyCartPole-v0")
    assert "FaultyCartPole is not an environment whose state" in subclass.state_unavailable
    with pytest.raises(StreamError, match="FaultyCartPole"):
        subclass.state_dict()
