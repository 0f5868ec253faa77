"""`python -m runtime.infer --follow SOURCE`: play the newest published policy, swapping
between games, until stopped (no torch).

runtime.follow.Follower does the following; this is the command around it: its options,
the stream rebuilt from the policy's metadata, signals, and the summary per policy played.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from runtime.cli import UsageError
from runtime.follow import Follower
from runtime.manifest import KeyFileError
from runtime.sources import Source


class _StopOnSignal:
    """SIGINT/SIGTERM end play after the current step (then the summary is printed)."""

    def __init__(self) -> None:
        self.stopped = False
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, _signum: int, _frame: Any) -> None:
        self.stopped = True

    def __call__(self) -> bool:
        return self.stopped

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_follow(args: Any) -> dict[str, Any]:
    """The --follow command: returns the JSON summary. Raises UsageError, FollowError,
    ModelError or StreamError (one line, exit 2)."""
    from runtime.infer import check_fits, make_stream_from_metadata, play

    try:
        source = Source(args.follow, timeout=args.timeout)
    except ValueError as exc:
        raise UsageError(f"--follow {exc}") from None
    try:
        follower = Follower(source, key_file=args.key, cache_dir=args.cache,
                            interval=args.interval, max_policy_bytes=args.max_policy_mb << 20,
                            threads=args.threads)
    except KeyFileError as exc:
        raise UsageError(f"--key: {exc}") from None
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s follow: %(message)s")
    per_policy: dict[int, list[float]] = {}  # step -> [games, sum of returns]

    def between_games(game_return: float) -> None:
        tally = per_policy.setdefault(follower.step, [0, 0.0])
        tally[0] += 1
        tally[1] += game_return
        follower.reload()

    stream, stop = None, None
    try:
        follower.start(wait=args.wait)
        env_id = args.env or follower.metadata["env_id"]
        stream = make_stream_from_metadata(follower.metadata, env_id, seed=args.seed)
        check_fits(follower.policy, stream.spec, env_id)
        stop = _StopOnSignal()
        summary = play(follower, stream, games=args.games, max_steps=args.max_steps,
                       sample=args.sample, seed=args.seed, env_id=env_id,
                       between_games=between_games, should_stop=stop)
    finally:
        if stop is not None:
            stop.restore()
        follower.close()
        if stream is not None:
            stream.close()
    summary.update(follower.summary())
    summary["policies"] = [
        {"step": step, "games": int(games), "mean_return": round(total / games, 3)}
        for step, (games, total) in per_policy.items()]
    return summary
