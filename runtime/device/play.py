"""Playing a stream with a policy: the stream a model was trained on, the check that a
model fits a stream, and the play loop with its per-game summary.

A policy is anything with `act(observation, sample, rng)`, `path` and the model's
observation shape, dtype and action count: a runtime.device.policy.Policy, or a
runtime.device.follow.Follower, which swaps policies between games. The sensor stream
(runtime.streams: gymnasium + ale-py) is imported only when one is made, so importing this
module costs numpy and onnxruntime alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.contract import OPTION_NAMES, StreamOptions
from runtime.device.policy import ModelError, Policy

if TYPE_CHECKING:
    from runtime.video import GameRecorder

KEPT_LATENCIES = 100_000  # act latencies behind the p50/p99 (the newest)
KEPT_RETURNS = 100  # game returns listed when playing until stopped (the newest)


def check_fits(policy: Policy, spec: Any, env_id: str | None = None) -> None:
    """Refuse a model whose observation shape/dtype or action count differ from the stream's
    (`spec` is a runtime.streams.StreamSpec); raises ModelError naming both values."""
    checks = (("observation shape", policy.observation_shape, tuple(spec.observation_shape)),
              ("observation dtype", str(policy.observation_dtype), str(spec.observation_dtype)),
              ("number of actions", policy.num_actions, int(spec.num_actions)))
    for what, model_value, stream_value in checks:
        if model_value != stream_value:
            raise ModelError(f"model does not fit the stream: {what} is {model_value} in the "
                             f"model ({policy.metadata['env_id']}), {stream_value} in the stream"
                             f"{f' ({env_id})' if env_id else ''}")


def make_stream_from_metadata(metadata: Mapping[str, Any], env_id: str | None = None,
                              seed: int = 0, extra_kwargs: Mapping[str, Any] | None = None):
    """The stream the model was trained on (same preprocessing), or `env_id` with the same
    preprocessing options. Raises runtime.streams.StreamError."""
    from runtime.streams import make_stream

    options = StreamOptions(**{name: metadata[name] for name in OPTION_NAMES})
    kwargs = {**metadata["env_kwargs"], **(extra_kwargs or {})}
    return make_stream(env_id or metadata["env_id"], kwargs, seed=seed, options=options)


def _percentile_us(latencies_ns: Sequence[int], q: float) -> float | None:
    if not latencies_ns:
        return None
    return round(float(np.percentile(np.asarray(latencies_ns, dtype=np.float64), q)) / 1e3, 1)


def play(policy: Policy, stream: Any, *, games: int | None = 1,
         max_steps: int | None = None, sample: bool = False, seed: int = 0,
         recorder: GameRecorder | None = None, env_id: str | None = None,
         between_games: Callable[[float], None] | None = None,
         should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Play whole games (info["game_over"]) and return the summary dict the CLI prints.
    `games` None = until `should_stop()`; `between_games(return)` after each game (a
    runtime.device.follow.Follower, which plays like a Policy, swaps policies there)."""
    check_fits(policy, stream.spec, env_id)
    rng = np.random.default_rng(seed)
    # Bounded, so that playing for days keeps a constant memory: the summary then reports
    # the latency of the newest actions and the returns of the newest games.
    returns: deque[float] = deque(maxlen=KEPT_RETURNS if games is None else None)
    latencies: deque[int] = deque(maxlen=KEPT_LATENCIES)
    game_return, steps, game_steps, played = 0.0, 0, 0, 0
    render = getattr(stream, "render_rgb", lambda: None)
    obs = stream.reset()
    if recorder is not None:
        recorder.start("game-0000")
        recorder.frame(render)
    clock = time.perf_counter_ns
    start = time.perf_counter()
    try:
        while (games is None or played < games) \
                and (max_steps is None or steps < max_steps) \
                and (should_stop is None or not should_stop()):
            t0 = clock()
            action = policy.act(obs, sample=sample, rng=rng)
            latencies.append(clock() - t0)
            obs, reward, terminated, truncated, info = stream.step(action)
            steps += 1
            game_steps += 1
            game_return += reward
            if recorder is not None:
                recorder.frame(render)
            if info.get("game_over", terminated or truncated):
                returns.append(game_return)
                played += 1
                if between_games is not None:
                    between_games(game_return)
                game_return, game_steps = 0.0, 0
                if recorder is not None:
                    recorder.finish()
                    if games is None or played < games:
                        recorder.start(f"game-{played:04d}")
            if terminated or truncated:
                obs = stream.reset()
                if recorder is not None and (games is None or played < games):
                    recorder.frame(render)
    finally:
        if recorder is not None:
            recorder.finish()
    elapsed = time.perf_counter() - start
    summary: dict[str, Any] = {
        "model": policy.path,
        "env_id": env_id,
        "returns": list(returns),
        "mean_return": float(np.mean(returns)) if returns else None,
        "games": played,
        "steps": steps,
        "latency_us_p50": _percentile_us(latencies, 50),
        "latency_us_p99": _percentile_us(latencies, 99),
        "steps_per_s": round(steps / elapsed, 1) if elapsed > 0 else None,
    }
    if game_steps:  # stopped inside a game (by --max-steps or a signal)
        summary["unfinished_game_return"] = game_return
    if recorder is not None:
        summary["videos"] = recorder.paths
    return summary
