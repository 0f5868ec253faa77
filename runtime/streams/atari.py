"""AtariStream: DQN-style preprocessing of an ALE environment, driving the emulator
directly (frame skip with max-pool, area resize without OpenCV, frame stack, no-op starts,
FIRE on reset, life loss as a learning episode's end)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from runtime.contract import StreamError, StreamOptions
from runtime.streams.base import StreamSpec, generator_from_state


def area_resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """Return the (n_out, n_in) float32 matrix of an area (box) resize.

    Row i averages the source interval [i*s, (i+1)*s) with s = n_in / n_out,
    weighting partially covered source pixels by their overlap; this is what
    OpenCV's INTER_AREA computes when shrinking, so ``Wr @ img @ Wc.T``
    reproduces it without needing OpenCV on the device.
    """
    scale = n_in / n_out
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
            weights[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def _banded(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a resize matrix into K (index, weight) bands, K = max taps per row.

    Each output pixel of an area shrink reads at most ceil(scale) + 1 source
    pixels, so K gathers + multiply-adds replace a dense matmul. That keeps
    the resize off BLAS, whose thread pool thrashes when it shares the CPU
    with torch.
    """
    rows = [np.flatnonzero(w) for w in weights]
    taps = max(len(r) for r in rows)
    index = np.zeros((taps, len(rows)), dtype=np.intp)
    value = np.zeros((taps, len(rows)), dtype=np.float32)
    for i, nz in enumerate(rows):
        index[:, i] = nz[-1]  # padding taps re-read a valid pixel with weight 0
        index[: len(nz), i] = nz
        value[: len(nz), i] = weights[i, nz]
    return index, value



class AtariStream:
    """ALE stream with DQN preprocessing, driving ``env.unwrapped.ale`` directly.

    Per step: repeat the action ``frame_skip`` frames, max-pool the last two
    screens (Atari sprites flicker), area-resize to ``screen_size`` squared
    and push onto a uint8 stack of shape (frame_stack, H, W), oldest first.
    Bypassing the gymnasium wrapper chain avoids a screen grab per skipped
    frame, which roughly halves the cost of a step.
    """

    def __init__(self, env: gym.Env, opts: StreamOptions, *, seed: int = 0) -> None:
        self._env = env
        self._opts = opts
        unwrapped = env.unwrapped
        self._ale = unwrapped.ale
        self._actions = list(unwrapped._action_set)  # agent index -> ALE action
        meanings = tuple(unwrapped.get_action_meanings())
        self._fire = meanings.index("FIRE") if "FIRE" in meanings else None
        # A TimeLimit on the frameskip=1 env counts emulator frames.
        self._max_frames = env.spec.max_episode_steps if env.spec is not None else None
        self._seed: int | None = seed
        self._rng = np.random.default_rng(seed)  # no-op counts only
        height, width = self._ale.getScreenDims()
        size, stack = opts.screen_size, opts.frame_stack
        self._row_idx, row_w = _banded(area_resize_weights(height, size))
        self._col_idx, self._col_w = _banded(area_resize_weights(width, size))
        self._row_w = row_w[:, :, None]  # broadcast over columns
        # Preallocated buffers: the hot path allocates only the returned copy.
        self._screens = np.zeros((2, height, width), dtype=np.uint8)
        self._pooled = np.zeros((height, width), dtype=np.float32)
        self._half = np.zeros((size, width), dtype=np.float32)
        self._half_tap = np.zeros((size, width), dtype=np.float32)
        self._small = np.zeros((size, size), dtype=np.float32)
        self._small_tap = np.zeros((size, size), dtype=np.float32)
        self._stack = np.zeros((stack, size, size), dtype=np.uint8)
        self._lives = 0
        self._life_lost_pending = False  # next reset() continues the game
        self.spec = StreamSpec(
            (stack, size, size), "uint8", len(self._actions), meanings, stack, opts.frame_skip
        )
        self._env_id = env.spec.id if env.spec is not None else type(unwrapped).__name__
        self.state_unavailable: str | None = None
        self.renders_frames = True

    # -- emulator helpers -------------------------------------------------
    def _advance(self, action: int) -> tuple[float, bool]:
        """Repeat ``action`` for frame_skip frames; return (reward, life_lost)."""
        ale, skip = self._ale, self._opts.frame_skip
        ale_action = self._actions[action]
        reward, grabbed, life_lost = 0.0, 0, False
        for i in range(skip):
            reward += ale.act(ale_action)
            if i >= skip - 2:  # only the last two frames are ever looked at
                ale.getScreenGrayscale(self._screens[grabbed])
                grabbed += 1
            if ale.game_over():
                break
            if self._opts.terminal_on_life_loss and ale.lives() < self._lives:
                life_lost = True
                break
        if grabbed == 0:  # episode ended before the last two frames
            ale.getScreenGrayscale(self._screens[0])
            grabbed = 1
        if grabbed == 2:
            np.maximum(self._screens[0], self._screens[1], out=self._pooled)
        else:
            self._pooled[...] = self._screens[0]
        return reward, life_lost

    def _push_frame(self) -> None:
        """Resize the pooled screen and push it as the newest stack entry."""
        # Separable area resize: rows (210 -> 84) then columns (160 -> 84).
        self._half.fill(0.0)
        for idx, w in zip(self._row_idx, self._row_w, strict=True):
            np.take(self._pooled, idx, axis=0, out=self._half_tap, mode="clip")
            self._half_tap *= w
            self._half += self._half_tap
        self._small.fill(0.0)
        for idx, w in zip(self._col_idx, self._col_w, strict=True):
            np.take(self._half, idx, axis=1, out=self._small_tap, mode="clip")
            self._small_tap *= w
            self._small += self._small_tap
        self._stack[:-1] = self._stack[1:]
        # Round half to even like OpenCV's cvRound. No clip needed: weight
        # rows sum to 1, so values stay within [0, 255] up to float error.
        np.rint(self._small, out=self._small)
        self._stack[-1] = self._small

    def _new_game(self) -> None:
        """Reset the emulator, then 1..noop_max random no-op frames."""
        if self._seed is not None:
            self._env.reset(seed=self._seed)  # seeds and reloads the ROM once
            self._seed = None
        else:
            self._ale.reset_game()
        if self._opts.noop_max > 0:
            noop = self._actions[0]
            for _ in range(int(self._rng.integers(1, self._opts.noop_max + 1))):
                self._ale.act(noop)
                if self._ale.game_over():
                    self._ale.reset_game()
        self._lives = self._ale.lives()

    # -- Stream API ---------------------------------------------------------
    # Truncation (ALE max_num_frames_per_episode or a TimeLimit, both counted
    # in emulator frames) is checked once per agent step, so a TimeLimit may
    # overshoot by up to frame_skip - 1 frames.
    def reset(self) -> np.ndarray:
        """First observation of a learning episode (returns a fresh array)."""
        if self._life_lost_pending and not self._ale.game_over():
            # Life loss: keep the game and the stack going, just relaunch.
            self._life_lost_pending = False
            if self._fire is not None:
                self._advance(self._fire)
                self._push_frame()
            self._lives = self._ale.lives()
            if not self._ale.game_over():
                return self._stack.copy()
        self._life_lost_pending = False
        self._new_game()
        if self._fire is not None:
            self._advance(self._fire)  # games like Breakout stall without FIRE
        else:
            self._ale.getScreenGrayscale(self._screens[0])
            self._pooled[...] = self._screens[0]
        self._push_frame()
        self._stack[:-1] = self._stack[-1]  # no history yet: repeat first frame
        self._lives = self._ale.lives()
        return self._stack.copy()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Advance one agent step; the observation is a fresh array."""
        reward, life_lost = self._advance(int(action))
        self._push_frame()
        ale = self._ale
        lives = ale.lives()
        self._lives = lives
        game_terminated = ale.game_over(with_truncation=False)
        frame = ale.getEpisodeFrameNumber()
        truncated = not game_terminated and (
            ale.game_truncated() or (self._max_frames is not None and frame >= self._max_frames)
        )
        game_over = game_terminated or truncated
        self._life_lost_pending = life_lost and not game_over
        info = {"game_over": game_over, "lives": lives, "episode_frame_number": frame}
        info["frame_number"] = ale.getFrameNumber()
        terminated = game_terminated or self._life_lost_pending
        return self._stack.copy(), reward, terminated, truncated, info

    def state_dict(self) -> dict[str, Any]:
        """The emulator with its random generator (sticky actions), the frame stack, the
        no-op generator and the life bookkeeping, as plain data."""
        return {"kind": "ale", "env": self._env_id, "seed_pending": self._seed,
                "ale": self._ale.cloneState(include_rng=True).serialize(),
                "stack": self._stack.tobytes(), "noop_rng": self._rng.bit_generator.state,
                "lives": self._lives, "life_lost_pending": self._life_lost_pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a `state_dict`; raises StreamError if it belongs to another stream."""
        from ale_py import ALEState  # loaded with the environment already

        if state.get("kind") != "ale" or state.get("env") != self._env_id \
                or len(state["stack"]) != self._stack.nbytes:
            raise StreamError(f"the saved stream state is not one of {self._env_id} with "
                              f"{self._stack.shape} observations")
        self._ale.restoreState(ALEState(state["ale"]))
        self._stack[...] = np.frombuffer(state["stack"], np.uint8).reshape(self._stack.shape)
        self._rng = generator_from_state(state["noop_rng"])
        self._lives = int(state["lives"])
        self._life_lost_pending = bool(state["life_lost_pending"])
        self._seed = state["seed_pending"]

    def render_rgb(self) -> np.ndarray | None:
        """Current full-resolution RGB screen (H, W, 3) uint8, for videos."""
        return self._ale.getScreenRGB()

    def close(self) -> None:
        self._env.close()
