"""GymStream: any Gymnasium environment with discrete actions, with the time feature and
the checkpointable state of the environments and wrappers whose whole state is known."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from runtime.contract import StreamError
from runtime.streams.base import StreamSpec, generator_from_state


def _pack(value: Any) -> Any:
    """A numpy-holding attribute as plain data (arrays as bytes) for a checkpoint."""
    if isinstance(value, np.ndarray):
        return {"ndarray": value.dtype.str, "shape": list(value.shape), "data": value.tobytes()}
    if isinstance(value, np.generic):
        return {"scalar": value.dtype.str, "data": value.tobytes()}
    if isinstance(value, tuple):
        return {"tuple": [_pack(v) for v in value]}
    if isinstance(value, list):
        return [_pack(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise StreamError(f"cannot capture a {type(value).__name__} in the stream state")


def _unpack(value: Any) -> Any:
    if isinstance(value, dict):
        if "ndarray" in value:
            flat = np.frombuffer(value["data"], dtype=np.dtype(value["ndarray"]))
            return flat.reshape(value["shape"]).copy()
        if "scalar" in value:
            return np.frombuffer(value["data"], dtype=np.dtype(value["scalar"]))[0]
        return tuple(_unpack(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_unpack(v) for v in value]
    return value


# Gymnasium environments whose whole changing state is known: these attributes of the
# unwrapped env plus its np_random. Exact classes only (a subclass may keep more state).
_ENV_STATE = {
    "gymnasium.envs.classic_control.cartpole.CartPoleEnv": ("state", "steps_beyond_terminated"),
    "gymnasium.envs.classic_control.acrobot.AcrobotEnv": ("state",),
    "gymnasium.envs.classic_control.mountain_car.MountainCarEnv": ("state",),
    "gymnasium.envs.toy_text.frozen_lake.FrozenLakeEnv": ("s", "lastaction"),
    "gymnasium.envs.toy_text.cliffwalking.CliffWalkingEnv": ("s", "lastaction"),
    "gymnasium.envs.toy_text.taxi.TaxiEnv": ("s", "lastaction", "taxi_orientation",
                                             "fickle_step"),
}
# ... and of the wrappers gymnasium.make puts around them.
_WRAPPER_STATE = {
    "gymnasium.wrappers.common.TimeLimit": ("_elapsed_steps",),
    "gymnasium.wrappers.common.OrderEnforcing": ("_has_reset",),
    "gymnasium.wrappers.common.PassiveEnvChecker": (),
}
# The env checker only warns, once, on its first calls: it ran in the process that saved the
# state, so a restored stream marks its checks as done (its step check needs a reset first).
_RESTORED_AS = {
    "gymnasium.wrappers.common.PassiveEnvChecker": {
        "checked_reset": True, "checked_step": True, "checked_render": True,
        "checked_data_reuse": True, "_previous_data": None},
}


def _qualified(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _time_limit(env: gym.Env) -> gym.wrappers.TimeLimit | None:
    """The TimeLimit wrapper gymnasium.make put around the env, if any."""
    layer = env
    while isinstance(layer, gym.Wrapper):
        if isinstance(layer, gym.wrappers.TimeLimit):
            return layer
        layer = layer.env
    return None


class GymStream:
    """Adapter for any gymnasium env with a Discrete action space.

    With the time feature, each observation ends with the elapsed fraction of the episode's
    time limit, shifted to [-0.5, 0.5] and counted after the step that made it: the learner
    can then tell a state near the limit, whose future is short, from the same state early
    on. It is read from the TimeLimit wrapper's own counter, which checkpoints keep."""

    def __init__(self, env: gym.Env, *, seed: int = 0,
                 time_feature: bool | str = False) -> None:
        act_space = env.action_space
        if not isinstance(act_space, gym.spaces.Discrete):
            env.close()
            raise StreamError(f"action space {act_space} is not Discrete (only Discrete supported)")
        obs_space = env.observation_space
        if isinstance(obs_space, gym.spaces.Box):
            self._one_hot = 0
            dtype = "uint8" if obs_space.dtype == np.uint8 else "float32"
            shape = tuple(int(d) for d in obs_space.shape)
        elif isinstance(obs_space, gym.spaces.Discrete):
            # Integer states (FrozenLake, Taxi) are one-hot encoded so the
            # learner always sees a float vector.
            self._one_hot = int(obs_space.n)
            self._obs_start = int(obs_space.start)
            dtype, shape = "float32", (self._one_hot,)
        else:
            env.close()
            raise StreamError(f"observation space {obs_space} unsupported (Box or Discrete only)")
        self._clock = _time_limit(env)
        if self._clock is None or dtype != "float32" or len(shape) != 1:
            if time_feature is True:
                env.close()
                raise StreamError("only a stream of float vectors under a time "
                                  f"limit takes one, not {dtype} {shape} "
                                  f"{'with' if self._clock else 'without'} a limit",
                                  "time_feature")
            self._clock = None
        elif time_feature is False:
            self._clock = None
        else:
            shape = (shape[0] + 1,)
        self._env = env
        self._dtype = np.dtype(dtype)
        self._action_start = int(act_space.start)
        self._seed: int | None = seed  # consumed by the first reset only
        n = int(act_space.n)
        self.spec = StreamSpec(shape, dtype, n, tuple(str(a) for a in range(n)), 1, 1,
                               time_feature=self._clock is not None)
        self.renders_frames = env.render_mode == "rgb_array"  # render_rgb() gives frames
        self._layers = self._state_layers()
        self.state_unavailable: str | None = None if isinstance(self._layers, list) \
            else self._layers

    def _state_layers(self) -> list[tuple[Any, tuple[str, ...]]] | str:
        """(object, attributes) of every layer of the env, outermost first; a string says
        why the state cannot be captured."""
        layers, layer = [], self._env
        while isinstance(layer, gym.Wrapper):
            name = _qualified(layer)
            if name not in _WRAPPER_STATE:
                return f"wrapper {name} has state this stream cannot capture"
            layers.append((layer, _WRAPPER_STATE[name]))
            layer = layer.env
        name = _qualified(layer)
        if name not in _ENV_STATE:
            return f"{name} is not an environment whose state this stream can capture"
        return [*layers, (layer, _ENV_STATE[name])]

    def _convert(self, obs: Any) -> np.ndarray:
        if self._one_hot:
            out = np.zeros(self._one_hot + (self._clock is not None), dtype=np.float32)
            out[int(obs) - self._obs_start] = 1.0
        elif self._clock is None:
            # np.array (not asarray) so the caller always owns a fresh array.
            return np.array(obs, dtype=self._dtype)
        else:
            out = np.empty(self.spec.observation_shape, dtype=np.float32)
            out[:-1] = obs
        if self._clock is not None:
            clock = self._clock
            out[-1] = clock._elapsed_steps / clock._max_episode_steps - 0.5
        return out

    def reset(self) -> np.ndarray:
        """Start a new episode; only the first call seeds the env."""
        obs, _ = self._env.reset(seed=self._seed)
        self._seed = None  # later resets continue the seeded RNG sequence
        return self._convert(obs)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self._env.step(int(action) + self._action_start)
        info = dict(info)
        info["game_over"] = bool(terminated or truncated)
        return self._convert(obs), float(reward), bool(terminated), bool(truncated), info

    def state_dict(self) -> dict[str, Any]:
        """The env's state, its random generator and its wrappers' counters (plain data);
        only when `state_unavailable` is None."""
        if self.state_unavailable is not None:
            raise StreamError(self.state_unavailable)
        unwrapped = self._env.unwrapped
        return {"kind": "gym", "env": _qualified(unwrapped), "seed_pending": self._seed,
                "np_random": unwrapped.np_random.bit_generator.state,
                "np_random_seed": unwrapped.np_random_seed,
                "layers": [{a: _pack(getattr(obj, a)) for a in attributes}
                           for obj, attributes in self._layers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a `state_dict`; raises StreamError if it belongs to another stream."""
        if self.state_unavailable is not None:
            raise StreamError(self.state_unavailable)
        unwrapped = self._env.unwrapped
        if state.get("kind") != "gym" or state.get("env") != _qualified(unwrapped) \
                or len(state["layers"]) != len(self._layers):
            raise StreamError(f"the saved stream state is not one of {_qualified(unwrapped)}")
        for (obj, attributes), saved in zip(self._layers, state["layers"], strict=True):
            for attribute in attributes:
                setattr(obj, attribute, _unpack(saved[attribute]))
            for attribute, value in _RESTORED_AS.get(_qualified(obj), {}).items():
                setattr(obj, attribute, value)
        unwrapped._np_random = generator_from_state(state["np_random"])
        unwrapped._np_random_seed = state["np_random_seed"]
        self._seed = state["seed_pending"]

    def render_rgb(self) -> np.ndarray | None:
        """Current RGB frame if the env was made with render_mode='rgb_array'."""
        if self._env.render_mode != "rgb_array":
            return None
        frame = self._env.render()
        return None if frame is None else np.asarray(frame)

    def close(self) -> None:
        self._env.close()
