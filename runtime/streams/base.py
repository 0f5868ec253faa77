"""What every stream is: the Stream protocol, the StreamSpec a learner builds its network
from, and the env settings the factory reads (runtime.streams). No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class StreamSpec:
    """What a learner needs to know about a stream to build its network."""

    observation_shape: tuple[int, ...]
    observation_dtype: str  # "uint8" or "float32"
    num_actions: int
    action_meanings: tuple[str, ...]
    frame_stack: int  # 1 for non-image streams
    frame_skip: int  # 1 for non-Atari
    time_feature: bool = False  # the observation's last entry is the episode's clock


class EnvSettings(Protocol):
    """The config's env section, as the stream factory reads it: the id, the kwargs and
    every StreamOptions field, by attribute name (so this module needs none of the learner
    side's config code)."""

    id: str
    kwargs: dict


@runtime_checkable
class Stream(Protocol):
    """An endless environment stream; see the module docstring for semantics."""

    spec: StreamSpec
    renders_frames: bool  # render_rgb() gives RGB frames (videos)

    def reset(self) -> np.ndarray: ...

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]: ...

    def close(self) -> None: ...

    # Checkpoints: why the state cannot be captured (None when it can), and the state as
    # plain data (bytes, numbers, strings, lists, dicts) that a restart puts back.
    state_unavailable: str | None

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def generator_from_state(state: dict[str, Any]) -> np.random.Generator:
    """A numpy Generator put back from its bit generator's saved state."""
    generator = np.random.Generator(getattr(np.random, state["bit_generator"])())
    generator.bit_generator.state = state
    return generator
