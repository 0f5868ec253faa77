"""The command line of the device side: play games with an exported ONNX actor (no torch).

    python -m runtime.infer --model policy.onnx [--env ID] [--games N] [--seed S]
        [--sample] [--threads T] [--max-steps M] [--record DIR]
    python -m runtime.infer --follow SOURCE [--key FILE ...] [--interval S] [--wait S]
        [--cache DIR] [--timeout S] [--max-policy-mb MB] [--games N]
        [--metrics-port PORT [--metrics-address ADDR]] [...]

--follow plays the newest verified policy published in SOURCE (a policies directory or an
http(s) URL of one) and swaps to newer ones between games (runtime.device.follow); it plays
until --games, --max-steps or SIGINT/SIGTERM, then prints its summary. Each --key names a
key the device trusts (the learner's public key, e.g. fleet.pub; two during a rotation).
--metrics-port serves Prometheus metrics and a health check (runtime.device.monitoring).

This module is the front end only: options, signals, the printed summary, and the domain's
errors (runtime.device: ModelError, FollowError, KeyFileError; runtime.streams.StreamError;
runtime.video.VideoError) turned into one line ``infer: error: ...`` and exit 2. The sensor
stream (gymnasium + ale-py) is imported only when a game is played, and imageio only when
one is recorded. Nothing here may import torch, onnx, ``agent.*`` or runtime.daemon: this
is what runs on a small device. Exit codes: 0 played, 2 bad usage, model or environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from runtime.cli import (
    OneLineParser,
    UsageError,
    non_negative_float,
    port_number,
    positive_float,
    positive_int,
)
from runtime.device.follow import Follower, FollowError
from runtime.device.keys import KeyFileError
from runtime.device.monitoring import PlayerTally, player_health, player_metrics
from runtime.device.play import check_fits, make_stream_from_metadata, play
from runtime.device.policy import ModelError, Policy
from runtime.device.sources import Source
from runtime.monitoring import MetricsServer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m runtime.infer",
                            description="Play games with an exported ONNX actor (no torch).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="ONNX policy exported by the learner "
                                          "(tools/export_onnx.py)")
    source.add_argument("--follow", metavar="SOURCE",
                        help="a policies directory or its http(s) URL: play the newest "
                             "verified policy, swap to newer ones between games")
    parser.add_argument("--env", help="environment id (default: the model's env_id)")
    parser.add_argument("--games", "--episodes", type=positive_int,
                        help="whole games to play (default 1; with --follow until stopped); "
                             "--episodes is its former name")
    parser.add_argument("--seed", type=int, default=0, help="seeds the stream and sampling")
    parser.add_argument("--sample", action="store_true",
                        help="sample from softmax(logits) instead of the greedy action")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="onnxruntime intra-op threads")
    parser.add_argument("--max-steps", type=positive_int, help="stop after this many agent steps")
    parser.add_argument("--record", metavar="DIR", help="write one MP4 per game to DIR")
    follow = parser.add_argument_group("with --follow")
    follow.add_argument("--key", metavar="FILE", action="append",
                        help="the learner's public key (NAME.pub; or a shared HMAC key "
                             "file): refuse policies not signed by a key given; repeat "
                             "it to trust several (a key rotation)")
    follow.add_argument("--interval", type=positive_float, default=30.0,
                        help="seconds between looks at latest.json (default 30)")
    follow.add_argument("--wait", type=non_negative_float, default=0.0,
                        help="seconds to wait for a first policy (default 0: exit 2 at once)")
    follow.add_argument("--cache", metavar="DIR",
                        help="where verified policies are kept (default "
                             "~/.cache/stream-agent/follow/<hash of SOURCE>)")
    follow.add_argument("--timeout", type=positive_float, default=10.0,
                        help="network timeout in seconds (default 10)")
    follow.add_argument("--max-policy-mb", type=positive_int, default=64,
                        help="refuse policies larger than this before downloading (default 64)")
    follow.add_argument("--metrics-port", type=port_number,
                        help="serve Prometheus metrics at /metrics and health at /healthz "
                             "on this port (default: off)")
    follow.add_argument("--metrics-address", default="127.0.0.1",
                        help="where --metrics-port listens (default 127.0.0.1; 0.0.0.0: "
                             "scraped from elsewhere)")
    args = parser.parse_args(argv)
    if args.follow is None:
        given = [flag for flag, value, default in (
            ("--key", args.key, None), ("--interval", args.interval, 30.0),
            ("--wait", args.wait, 0.0),
            ("--cache", args.cache, None), ("--timeout", args.timeout, 10.0),
            ("--max-policy-mb", args.max_policy_mb, 64),
            ("--metrics-port", args.metrics_port, None),
            ("--metrics-address", args.metrics_address, "127.0.0.1")) if value != default]
        if given:
            raise UsageError(f"{given[0]} applies to --follow only")
        args.games = args.games or 1
    elif args.record:
        raise UsageError("--record applies to --model only")
    return args


def run_model(args: argparse.Namespace) -> dict[str, Any]:
    """The --model command: returns the JSON summary. Raises ModelError, StreamError or
    VideoError (one line, exit 2)."""
    policy = Policy.load(args.model, threads=args.threads)
    env_id = args.env or policy.metadata["env_id"]
    stream = make_stream_from_metadata(policy.metadata, env_id, seed=args.seed)
    try:
        check_fits(policy, stream.spec, env_id)
        recorder = None
        if args.record:
            if getattr(stream, "render_rgb", lambda: None)() is None:
                # Plain gymnasium envs render only when made with render_mode="rgb_array".
                stream.close()
                stream = make_stream_from_metadata(policy.metadata, env_id, seed=args.seed,
                                                   extra_kwargs={"render_mode": "rgb_array"})
            from runtime.video import GameRecorder  # only when recording: imageio is optional

            recorder = GameRecorder(Path(args.record), fps=30)
        return play(policy, stream, games=args.games, max_steps=args.max_steps,
                    sample=args.sample, seed=args.seed, recorder=recorder, env_id=env_id)
    finally:
        stream.close()


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


def run_follow(args: argparse.Namespace) -> dict[str, Any]:
    """The --follow command: the stream rebuilt from the followed policy's metadata, played
    until stopped; returns the JSON summary with the games per policy played. Raises
    UsageError, FollowError, ModelError or StreamError (one line, exit 2)."""
    try:
        source = Source(args.follow, timeout=args.timeout)
    except ValueError as exc:
        raise UsageError(f"--follow {exc}") from None
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s follow: %(message)s")
    try:
        follower = Follower(source, key_file=args.key, cache_dir=args.cache,
                            interval=args.interval, max_policy_bytes=args.max_policy_mb << 20,
                            threads=args.threads)
    except KeyFileError as exc:
        raise UsageError(f"--key: {exc}") from None
    per_policy: dict[int, list[float]] = {}  # step -> [games, sum of returns]
    tally = PlayerTally()

    def between_games(game_return: float) -> None:
        games = per_policy.setdefault(follower.step, [0, 0.0])
        games[0] += 1
        games[1] += game_return
        tally.game(game_return)
        follower.reload()

    stream, stop, summary, server = None, None, None, None
    try:
        if args.metrics_port is not None:
            server = serve_metrics(args, follower, tally)
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
                           between_games=between_games, should_stop=tally.stepping(stop))
    finally:
        tally.stopped = True
        if stop is not None:
            stop.restore()
        if server is not None:
            server.close()
        follower.close()
        if stream is not None:
            stream.close()
    summary.update(follower.summary())
    summary["policies"] = [
        {"step": step, "games": int(games), "mean_return": round(total / games, 3)}
        for step, (games, total) in per_policy.items()]
    return summary


def serve_metrics(args: argparse.Namespace, follower: Follower,
                  tally: PlayerTally) -> MetricsServer:
    address, port = args.metrics_address, args.metrics_port
    try:
        server = MetricsServer(address, port, lambda: player_metrics(follower, tally),
                               lambda: player_health(follower, tally))
    except OSError as exc:
        raise UsageError(f"--metrics-port: cannot listen on {address}:{port} "
                         f"({exc.strerror or exc})") from None
    logging.getLogger("runtime.follow").info(
        "metrics at http://%s:%d/metrics, health at /healthz", address, server.port)
    return server


def _not_played(follower: Follower, args: argparse.Namespace) -> dict[str, Any]:
    """The summary of a player stopped before its first step (the keys play() gives)."""
    playing = follower.current is not None
    return {"model": follower.path if playing else None,
            "env_id": args.env or (follower.metadata["env_id"] if playing else None),
            "returns": [], "mean_return": None, "games": 0, "steps": 0,
            "latency_us_p50": None, "latency_us_p99": None, "steps_per_s": None,
            "stopped_before_play": True}


def main(argv: list[str] | None = None) -> int:
    from runtime.streams import StreamError  # torch-free; gymnasium is needed to play anyway
    from runtime.video import VideoError  # numpy only; imageio is imported when recording

    try:
        args = parse_args(argv)
        summary = run_follow(args) if args.follow is not None else run_model(args)
    except VideoError as exc:
        print(f"infer: error: --record: {exc}", file=sys.stderr)
        return 2
    except (UsageError, ModelError, StreamError, FollowError) as exc:
        print(f"infer: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
