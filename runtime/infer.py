"""The torch-free inference runtime: play a stream with an exported ONNX actor.

    python -m runtime.infer --model policy.onnx [--env ID] [--games N] [--seed S]
        [--sample] [--threads T] [--max-steps M] [--record DIR]
    python -m runtime.infer --follow SOURCE [--key FILE] [--interval S] [--wait S]
        [--cache DIR] [--timeout S] [--max-policy-mb MB] [--games N] [...]

--follow plays the newest verified policy published in SOURCE (a policies directory or an
http(s) URL of one) and swaps to newer ones between games (runtime.follow); it plays until
--games, --max-steps or SIGINT/SIGTERM, then prints its summary.

Only the standard library, numpy and onnxruntime are imported at module level; the sensor
stream (``runtime.streams``: gymnasium + ale-py, no torch) is imported only when a game is
played, and imageio only when one is recorded. Nothing here may import torch, onnx,
``agent.*`` or the torch-side runtime modules (config, daemon, checkpoints): this file is
what runs on a small device. Exit codes: 0 played, 2 bad usage, model or environment (one
line ``infer: error: ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from runtime.cli import (
    OneLineParser,
    UsageError,
    non_negative_float,
    positive_float,
    positive_int,
)
from runtime.contract import (
    ACTION,
    INPUT_NAME,
    KNOWN_POLICY_FORMAT_VERSIONS,
    LOGITS,
    OPTION_NAMES,
    OUTPUTS,
    REQUIRED_OPTION_NAMES,
    StreamOptions,
)
from runtime.errors import first_line

if TYPE_CHECKING:
    from runtime.video import GameRecorder

# Metadata keys the exporter writes besides the stream options (StreamOptions reads those);
# all values are strings in the ONNX file.
_INT_KEYS = ("num_actions", "training_step")
_JSON_KEYS = ("observation_shape", "action_meanings", "env_kwargs")
_STR_KEYS = ("format_version", "env_id", "observation_dtype")
REQUIRED_KEYS = _STR_KEYS + _INT_KEYS + _JSON_KEYS + REQUIRED_OPTION_NAMES
_ORT_DTYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}
KEPT_LATENCIES = 100_000  # act latencies behind the p50/p99 (the newest)
KEPT_RETURNS = 100  # game returns listed when playing until stopped (the newest)


class ModelError(ValueError):
    """A model that cannot be used (missing, not ONNX, bad metadata, wrong stream); one line."""


def parse_metadata(raw: Mapping[str, str], source: str = "model") -> dict[str, Any]:
    """Validate and decode the exporter's string metadata; raises ModelError."""
    version = raw.get("format_version")
    if version is None:
        raise ModelError(f"{source}: no format_version in the metadata (not exported by "
                         f"tools/export_onnx.py?)")
    if version not in KNOWN_POLICY_FORMAT_VERSIONS:
        raise ModelError(f"{source}: metadata format_version {version!r} is not supported "
                         f"(known: {', '.join(KNOWN_POLICY_FORMAT_VERSIONS)})")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise ModelError(f"{source}: metadata lacks {', '.join(missing)}")
    meta: dict[str, Any] = {key: raw[key] for key in _STR_KEYS}
    try:
        for key in _INT_KEYS:
            meta[key] = int(raw[key])
        for key in _JSON_KEYS:
            meta[key] = json.loads(raw[key])
    except ValueError as exc:
        raise ModelError(f"{source}: malformed metadata value ({first_line(exc, 300)})") from None
    try:
        meta.update(dataclasses.asdict(StreamOptions.from_metadata(raw)))
    except ValueError as exc:  # names the option and the value
        raise ModelError(f"{source}: {first_line(exc, 300)}") from None
    shape = meta["observation_shape"]
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0
                                                      for d in shape)):
        raise ModelError(f"{source}: metadata observation_shape {raw['observation_shape']} "
                         f"is not a list of positive ints")
    meta["observation_shape"] = tuple(shape)
    if meta["observation_dtype"] not in ("uint8", "float32"):
        raise ModelError(f"{source}: metadata observation_dtype {meta['observation_dtype']!r} "
                         f"is not uint8 or float32")
    if meta["num_actions"] < 1 or len(meta["action_meanings"]) != meta["num_actions"]:
        raise ModelError(f"{source}: metadata num_actions {meta['num_actions']} does not match "
                         f"{len(meta['action_meanings'])} action meanings")
    if not isinstance(meta["env_kwargs"], dict):
        raise ModelError(f"{source}: metadata env_kwargs is not a JSON object")
    meta["action_meanings"] = tuple(str(m) for m in meta["action_meanings"])
    # Keys written by newer exporters within the same format version are kept as strings.
    for key, value in raw.items():
        meta.setdefault(key, value)
    return meta


def session_options(threads: int = 1) -> ort.SessionOptions:
    """One small CPU: `threads` intra-op threads, no inter-op parallelism, sequential
    execution, all graph optimisations (constant folding, conv+activation fusion...)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: keep stderr for our own one-line messages
    return opts


class Policy:
    """An exported actor: observation (as the stream gives it) -> action."""

    def __init__(self, session: ort.InferenceSession, metadata: dict[str, Any],
                 path: str = "model") -> None:
        self._session = session
        self.metadata = metadata
        self.path = path
        self.observation_shape: tuple[int, ...] = metadata["observation_shape"]
        self.observation_dtype = np.dtype(metadata["observation_dtype"])
        self.num_actions: int = metadata["num_actions"]
        self._default_rng = np.random.default_rng()

    @classmethod
    def load(cls, path: str | Path, threads: int = 1) -> Policy:
        """Open and validate an exported model; raises ModelError (one line)."""
        path = Path(path)
        if threads < 1:
            raise ModelError(f"threads must be >= 1, got {threads}")
        if not path.is_file():
            raise ModelError(f"model file {path} not found")
        try:
            session = ort.InferenceSession(str(path), sess_options=session_options(threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/Invalid*
            raise ModelError(f"{path}: not a loadable ONNX model "
                             f"({first_line(exc, 300)})") from None
        meta = parse_metadata(session.get_modelmeta().custom_metadata_map, str(path))
        inputs = session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ModelError(f"{path}: expected one input named {INPUT_NAME!r}, found "
                             f"{[i.name for i in inputs]}")
        outputs = [o.name for o in session.get_outputs()]
        if not set(OUTPUTS) <= set(outputs):
            raise ModelError(f"{path}: expected outputs {list(OUTPUTS)}, found {outputs}")
        graph_dtype = _ORT_DTYPES.get(inputs[0].type, inputs[0].type)
        if graph_dtype != meta["observation_dtype"]:
            raise ModelError(f"{path}: graph input is {graph_dtype} but the metadata says "
                             f"{meta['observation_dtype']}")
        graph_shape = tuple(inputs[0].shape[1:])
        if graph_shape != meta["observation_shape"]:
            raise ModelError(f"{path}: graph input shape {graph_shape} does not match the "
                             f"metadata observation_shape {meta['observation_shape']}")
        return cls(session, meta, str(path))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, num_actions) float32 for a batch (N, *observation_shape)."""
        batch = np.ascontiguousarray(batch, dtype=self.observation_dtype)
        if batch.shape[1:] != self.observation_shape:
            raise ValueError(f"batch shape {batch.shape} does not fit the model's observation "
                             f"shape {self.observation_shape}")
        return self._session.run([LOGITS], {INPUT_NAME: batch})[0]

    def act(self, observation: np.ndarray, sample: bool = False,
            rng: np.random.Generator | None = None) -> int:
        """Action for one observation (no batch axis): greedy argmax, or sampled from
        softmax(logits) with `rng` (a fresh unseeded generator when None)."""
        obs = np.asarray(observation, dtype=self.observation_dtype)
        if obs.shape != self.observation_shape:
            raise ValueError(f"observation shape {obs.shape} does not fit the model's "
                             f"{self.observation_shape}")
        batch = obs[None]
        if not sample:
            return int(self._session.run([ACTION], {INPUT_NAME: batch})[0][0])
        logits = self._session.run([LOGITS], {INPUT_NAME: batch})[0][0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        cdf = np.cumsum(probs)
        u = (rng if rng is not None else self._default_rng).random() * cdf[-1]
        return min(int(np.searchsorted(cdf, u, side="right")), self.num_actions - 1)


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
    runtime.follow.Follower, which plays like a Policy, swaps policies there)."""
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m runtime.infer",
                            description="Play games with an exported ONNX actor (no torch).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="ONNX file from tools/export_onnx.py")
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
    follow.add_argument("--key", metavar="FILE",
                        help="shared key file: refuse policies not signed with it")
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
    args = parser.parse_args(argv)
    if args.follow is None:
        given = [flag for flag, value, default in (
            ("--key", args.key, None), ("--interval", args.interval, 30.0),
            ("--wait", args.wait, 0.0),
            ("--cache", args.cache, None), ("--timeout", args.timeout, 10.0),
            ("--max-policy-mb", args.max_policy_mb, 64)) if value != default]
        if given:
            raise UsageError(f"{given[0]} applies to --follow only")
        args.games = args.games or 1
    elif args.record:
        raise UsageError("--record applies to --model only")
    return args


def main(argv: list[str] | None = None) -> int:
    from runtime.follow import FollowError
    from runtime.follow_command import run_follow  # torch-free, like this module
    from runtime.streams import StreamError  # torch-free; gymnasium is needed to play anyway
    from runtime.video import VideoError  # numpy only; imageio is imported when recording

    stream = None
    try:
        args = parse_args(argv)
        if args.follow is not None:
            print(json.dumps(run_follow(args)))
            return 0
        policy = Policy.load(args.model, threads=args.threads)
        env_id = args.env or policy.metadata["env_id"]
        stream = make_stream_from_metadata(policy.metadata, env_id, seed=args.seed)
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
        summary = play(policy, stream, games=args.games, max_steps=args.max_steps,
                       sample=args.sample, seed=args.seed, recorder=recorder, env_id=env_id)
    except VideoError as exc:
        print(f"infer: error: --record: {exc}", file=sys.stderr)
        return 2
    except (UsageError, ModelError, StreamError, FollowError) as exc:
        print(f"infer: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if stream is not None:
            stream.close()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
