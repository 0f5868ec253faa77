"""Sensor streams: the environment side of the online-learning daemon.

A *stream* is an endless source of (observation, reward, terminated,
truncated, info) tuples. The daemon calls ``reset()`` after every step that
returned ``terminated`` or ``truncated``; ``info["game_over"]`` tells it
whether a whole game ended (for episode statistics), which differs from
``terminated`` for Atari games where a lost life ends a *learning* episode.

This module must stay free of torch: it is reused by a torch-free inference
runtime on small devices. Only numpy, gymnasium and (lazily) ale_py are used.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np

from runtime.contract import ALE_KWARGS_SET_BY_OPTIONS, StreamError, StreamOptions
from runtime.errors import first_line

_ATARI_ENTRY_POINT = "ale_py.env:AtariEnv"


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
    with torch (measured 10x slowdown on 2 cores).
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


def _new_generator(state: dict[str, Any]) -> np.random.Generator:
    generator = np.random.Generator(getattr(np.random, state["bit_generator"])())
    generator.bit_generator.state = state
    return generator


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
                raise StreamError("time_feature: only a stream of float vectors under a time "
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
        unwrapped._np_random = _new_generator(state["np_random"])
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
        self._rng = _new_generator(state["noop_rng"])
        self._lives = int(state["lives"])
        self._life_lost_pending = bool(state["life_lost_pending"])
        self._seed = state["seed_pending"]

    def render_rgb(self) -> np.ndarray | None:
        """Current full-resolution RGB screen (H, W, 3) uint8, for videos."""
        return self._ale.getScreenRGB()

    def close(self) -> None:
        self._env.close()


def _lookup_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """Find the registry entry; ale_py is imported only if the id is not yet known.
    `package.module:Env-v0` imports the module first (a user's own sensor, registered
    there), as gymnasium.make does."""
    if ":" in env_id:
        module, env_id = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise StreamError(f"cannot import module {module!r} of environment id "
                              f"{env_id!r}: {first_line(exc)}") from None
    try:
        return gym.spec(env_id)
    except gym.error.Error:
        with contextlib.suppress(ImportError):
            import ale_py  # noqa: F401  (importing registers the ALE/ ids)
    try:
        return gym.spec(env_id)
    except gym.error.Error as exc:
        raise StreamError(f"unknown environment id {env_id!r}: {first_line(exc)}") from None


def _is_atari(spec: gym.envs.registration.EnvSpec) -> bool:
    entry = spec.entry_point
    if isinstance(entry, str):
        return entry == _ATARI_ENTRY_POINT
    return getattr(entry, "__module__", "") == "ale_py.env"


def is_atari_id(env_id: str) -> bool:
    """Whether `make_stream` gives an Atari stream (with its preprocessing) for this id;
    raises StreamError for an unknown id."""
    return _is_atari(_lookup_spec(env_id))


def _make_env(env_id: str, kwargs: dict[str, Any], user_kwargs: bool) -> gym.Env:
    """gym.make with errors converted to one-line StreamErrors (blaming the user's kwargs
    when there are any)."""
    try:
        return gym.make(env_id, **kwargs)
    except TypeError as exc:
        raise StreamError(
            f"bad kwargs {sorted(kwargs)} for {env_id!r}: {first_line(exc)}", "kwargs"
        ) from None
    except (gym.error.Error, RuntimeError, ValueError) as exc:  # e.g. ALE "Invalid game mode"
        raise StreamError(f"cannot create environment {env_id!r}: {first_line(exc)}",
                          "kwargs" if user_kwargs else "id") from None


def make_stream(
    env_id: str,
    env_kwargs: dict | None = None,
    *,
    seed: int = 0,
    options: StreamOptions | None = None,
) -> Stream:
    """Create the stream for ``env_id``; ALE ids get Atari preprocessing.

    ``options`` (default ``StreamOptions()``): the Atari ones are used only for ALE ids,
    the time feature only for the others.
    ``env_kwargs`` are passed to ``gym.make``; for Atari they override the
    defaults chosen here, except the ones an option sets
    (``runtime.contract.ALE_KWARGS_SET_BY_OPTIONS``: ``frameskip``, as the stream does
    the skipping itself, and ``repeat_action_probability``).
    """
    user_kwargs = dict(env_kwargs or {})
    spec = _lookup_spec(env_id)
    opts = options if options is not None else StreamOptions()
    if not _is_atari(spec):
        return GymStream(_make_env(env_id, user_kwargs, bool(user_kwargs)), seed=seed,
                         time_feature=opts.time_feature)
    if opts.time_feature is True:
        raise StreamError("time_feature: an Atari stream gives frames, which take no time "
                          "feature", "time_feature")
    for kwarg, option in ALE_KWARGS_SET_BY_OPTIONS.items():
        if kwarg in user_kwargs:
            raise StreamError(f"set the Atari {option} via StreamOptions.{option}, not "
                              f"{kwarg!r}", "kwargs")
    kwargs: dict[str, Any] = {
        "frameskip": 1,
        "repeat_action_probability": opts.repeat_action_probability,
        "obs_type": "grayscale",
        "full_action_space": False,
    }
    kwargs.update(user_kwargs)
    env = _make_env(env_id, kwargs, bool(user_kwargs))
    from ale_py.env import AtariEnv  # already imported by the registry lookup

    if not isinstance(env.unwrapped, AtariEnv):
        env.close()
        raise StreamError(f"environment {env_id!r} is not an ale_py AtariEnv")
    return AtariStream(env, opts, seed=seed)


def open_stream(env: EnvSettings, seed: int, *, own_process: bool = False) -> Stream:
    """The stream an env config section describes: what the daemon learns from, and what
    the exporter and the benchmarks replay; `own_process` runs it in a child process
    (runtime.sensor_process)."""
    if own_process:
        from runtime.sensor_process import ProcessStream  # it imports this module

        return ProcessStream(env.id, dict(env.kwargs), seed=seed,
                             options=StreamOptions.of(env))
    return make_stream(env.id, dict(env.kwargs), seed=seed, options=StreamOptions.of(env))
