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
    """SIGINT/SIGTERM. Before play (the first policy being fetched, the stream being made)
    the first one interrupts at once (KeyboardInterrupt, caught by run_follow: a download
    in progress ends and its partial file is removed); while playing, play ends after the
    current step. Either way the follower is closed and the summary printed."""

    def __init__(self) -> None:
        self.stopped = False
        self.interrupt = True  # before play
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, _signum: int, _frame: Any) -> None:
        self.stopped = True
        if self.interrupt:
            self.interrupt = False  # once: a second signal only sets the flag
            raise KeyboardInterrupt

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

    stream, stop, summary = None, None, None
    try:
        try:
            stop = _StopOnSignal()
            follower.start(wait=args.wait)
            env_id = args.env or follower.metadata["env_id"]
            stream = make_stream_from_metadata(follower.metadata, env_id, seed=args.seed)
            check_fits(follower.policy, stream.spec, env_id)
            stop.interrupt = False
        except KeyboardInterrupt:  # SIGINT/SIGTERM before play: nothing played
            summary = _not_played(follower, args)
        if summary is None:
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


def _not_played(follower: Follower, args: Any) -> dict[str, Any]:
    """The summary of a player stopped before its first step (the keys play() gives)."""
    playing = follower.current is not None
    return {"model": follower.path if playing else None,
            "env_id": args.env or (follower.metadata["env_id"] if playing else None),
            "returns": [], "mean_return": None, "games": 0, "steps": 0,
            "latency_us_p50": None, "latency_us_p99": None, "steps_per_s": None,
            "stopped_before_play": True}
