"""A CartPole that misbehaves on cue, to inject faults through the stream interface.

Registered as `tests.faulty_env:FaultyCartPole-v0`; the daemon builds it from config like
any Gymnasium id. Step counts are per process (module level), so they continue across the
daemon recreating the stream after a failure.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control import CartPoleEnv

CALLS = {"step": 0, "reset": 0}


class FaultyCartPole(CartPoleEnv):
    def __init__(self, nan_obs_at: tuple[int, ...] = (), inf_reward_at: tuple[int, ...] = (),
                 huge_reward_at: tuple[int, ...] = (), raise_step_at: tuple[int, ...] = (),
                 raise_step_from: int | None = None, raise_reset_from: int | None = None,
                 step_seconds: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_obs_at, self.inf_reward_at = set(nan_obs_at), set(inf_reward_at)
        self.huge_reward_at, self.raise_step_at = set(huge_reward_at), set(raise_step_at)
        self.raise_step_from, self.raise_reset_from = raise_step_from, raise_reset_from
        self.step_seconds = step_seconds  # a slow sensor: each reading takes this long

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict]:
        CALLS["reset"] += 1
        if self.raise_reset_from is not None and CALLS["step"] >= self.raise_reset_from:
            raise OSError("sensor offline (injected)")
        return super().reset(**kwargs)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        CALLS["step"] += 1
        n = CALLS["step"]
        time.sleep(self.step_seconds)
        if n in self.raise_step_at or (self.raise_step_from is not None
                                       and n >= self.raise_step_from):
            raise RuntimeError(f"sensor read failed at call {n} (injected)")
        obs, reward, terminated, truncated, info = super().step(action)
        if n in self.nan_obs_at:
            obs = np.full_like(obs, np.nan)
        if n in self.inf_reward_at:
            reward = float("inf")
        if n in self.huge_reward_at:
            reward = 1e300  # finite as a float64, overflows float32 in the TD error
        return obs, reward, terminated, truncated, info


gym.register("FaultyCartPole-v0", entry_point=FaultyCartPole, max_episode_steps=500)
