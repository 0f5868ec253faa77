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
    AtariOptions,
    AtariStream,
    GymStream,
    Stream,
    StreamError,
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
    opts = AtariOptions(terminal_on_life_loss=False)
    stream = make_stream(BREAKOUT, seed=4, atari=opts)
    ends = _play_until_game_over(stream, np.random.default_rng(4), max_steps=8000)
    assert len(ends) == 1 and ends[0]["game_over"] and ends[0]["terminated"]


def test_truncation_is_game_over() -> None:
    for kwargs in ({"max_num_frames_per_episode": 400}, {"max_episode_steps": 400}):
        # Life losses would end learning episodes first; only truncation here.
        opts = AtariOptions(terminal_on_life_loss=False)
        stream = make_stream(BREAKOUT, kwargs, seed=0, atari=opts)
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
        AtariOptions(frame_skip=0)


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
