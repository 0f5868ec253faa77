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
from typing import Any

import gymnasium as gym

from runtime.contract import ALE_KWARGS_SET_BY_OPTIONS, StreamError, StreamOptions
from runtime.errors import first_line
from runtime.streams.atari import AtariStream, area_resize_weights
from runtime.streams.base import EnvSettings, Stream, StreamSpec
from runtime.streams.gymnasium_stream import GymStream

__all__ = ["AtariStream", "EnvSettings", "GymStream", "Stream", "StreamError", "StreamOptions",
           "StreamSpec", "area_resize_weights", "is_atari_id", "make_stream", "open_stream"]

_ATARI_ENTRY_POINT = "ale_py.env:AtariEnv"


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
        raise StreamError("an Atari stream gives frames, which take no time "
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


def open_stream(env: EnvSettings, seed: int) -> Stream:
    """The stream an env config section describes: what the daemon learns from, and what
    the exporter and the benchmarks replay."""
    return make_stream(env.id, dict(env.kwargs), seed=seed, options=StreamOptions.of(env))
