"""Export the actor of a checkpoint to one self-contained ONNX file, then verify it.

    python tools/export_onnx.py (--run-dir DIR | --checkpoint FILE) --out policy.onnx
        [--opset N (default 17)] [--quantize int8]

The graph is the policy half of the network only: input ``observation`` exactly as the
stream gives it (uint8 N x C x H x W frames or float32 N x D vectors, dynamic N), outputs
``logits`` (float32 N x A) and ``action`` (int64 N, the greedy argmax). uint8 scaling and
the frozen observation-normalisation statistics are inside the graph. The file carries in
its metadata everything ``runtime.infer`` needs to rebuild the same stream.

After writing, the model is checked (onnx.checker) and compared with the torch actor on real
stream observations (random actions): max |logit difference| <= 1e-4 and identical greedy
actions, else exit 1. ``--quantize int8`` also writes a static QDQ per-channel int8 model
beside it (``policy.int8.onnx``), calibrated on real frames, kept only when its greedy
actions agree with the float model's on >= 97% of held-out frames. Bad input: exit 2 with
one line ``export_onnx: error: ...``. Prints one JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

# Allow running as a plain script from the repository root or elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx  # noqa: E402
import torch  # noqa: E402

from agent.learner import A2CLearner  # noqa: E402
from runtime.cli import OneLineParser, UsageError  # noqa: E402
from runtime.daemon.checkpoints import CheckpointError, CheckpointStore, read_checkpoint  # noqa: E402
from runtime.daemon.config import Config, ConfigError, from_dict  # noqa: E402
from runtime.infer import (  # noqa: E402
    ModelError,
    Policy,
    make_stream_from_metadata,
    parse_metadata,
)
from runtime.streams import StreamError  # noqa: E402

FORMAT_VERSION = "1"
DEFAULT_OPSET = 17
# LayerNormalization (the stream and mlp networks) is an ONNX op from opset 17; asked for
# less, the dynamo exporter silently writes opset 18 instead.
MIN_OPSET = 17
LOGIT_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.97
PARITY_FRAMES = 64
CALIBRATION_FRAMES = 128
HELD_OUT_FRAMES = 256


class ExportError(Exception):
    """Bad input (exit 2): one line naming the cause."""


class VerificationError(Exception):
    """The written model does not behave like the torch actor (exit 1)."""


class _Actor(torch.nn.Module):
    """obs -> (logits, greedy action as int64): the deployed interface."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.policy(observation)
        return logits, torch.argmax(logits, dim=-1)


# -- loading -----------------------------------------------------------------------------


def resolve_checkpoint(run_dir: str | None, checkpoint: str | None) -> tuple[dict, Path]:
    """Load the given checkpoint, or the newest good one of a run; raises ExportError."""
    try:
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise ExportError(f"checkpoint {path} not found")
            return read_checkpoint(path), path
        directory = Path(run_dir)
        if not directory.is_dir():
            raise ExportError(f"run directory {directory} not found")
        found = CheckpointStore(directory / "checkpoints", keep=1).load_latest()
        if found is None:
            raise ExportError(f"no checkpoint in {directory / 'checkpoints'}")
        return found
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None


def load_actor(payload: dict[str, Any], name: str = "checkpoint"
               ) -> tuple[torch.nn.Module, Config]:
    """The torch actor (obs -> logits, eval mode) and the run's Config; raises ExportError."""
    try:
        config = from_dict(payload["config"])
        spec = payload["spec"]
        learner = A2CLearner(config.agent, tuple(spec["observation_shape"]),
                             int(spec["num_actions"]))
        # Only the weights (and the normaliser statistics among them) make the actor; the
        # optimiser state is not needed, so its format may change without breaking export.
        learner.net.load_state_dict(payload["learner"]["network"])
    except ConfigError as exc:
        raise ExportError(f"{name}: stored config is invalid: {exc}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"{name}: does not hold a usable actor ({type(exc).__name__}: "
                          f"{first[:200]})") from None
    return learner.net.policy().eval(), config


def build_metadata(payload: dict[str, Any], config: Config,
                   stream_spec: Any) -> dict[str, str]:
    """The ONNX metadata_props (string -> string) that runtime.infer reads back."""
    env = config.env
    return {
        "format_version": FORMAT_VERSION,
        "env_id": env.id,
        "observation_shape": json.dumps(list(stream_spec.observation_shape)),
        "observation_dtype": stream_spec.observation_dtype,
        "frame_stack": str(stream_spec.frame_stack),
        "frame_skip": str(stream_spec.frame_skip),
        "num_actions": str(stream_spec.num_actions),
        "action_meanings": json.dumps(list(stream_spec.action_meanings)),
        "training_step": str(int(payload.get("counters", {}).get("steps", 0))),
        "screen_size": str(env.screen_size),
        "noop_max": str(env.noop_max),
        "terminal_on_life_loss": json.dumps(env.terminal_on_life_loss),
        "repeat_action_probability": json.dumps(env.repeat_action_probability),
        "env_kwargs": json.dumps(env.kwargs, sort_keys=True),
        "network": str(payload.get("spec", {}).get("network", "")),
        "producer": "tools/export_onnx.py",
    }


def stream_frames(metadata: dict[str, Any], count: int, seed: int) -> np.ndarray:
    """`count` real observations from the stream the model was trained on, random actions,
    built exactly as runtime.infer builds it (so the metadata is proven sufficient)."""
    stream = make_stream_from_metadata(metadata, seed=seed)
    try:
        rng = np.random.default_rng(seed)
        frames = [stream.reset()]
        while len(frames) < count:
            action = int(rng.integers(stream.spec.num_actions))
            obs, _, terminated, truncated, _ = stream.step(action)
            frames.append(stream.reset() if terminated or truncated else obs)
        return np.stack(frames[:count])
    finally:
        stream.close()


# -- export and verification ----------------------------------------------------------------


@contextlib.contextmanager
def _quiet_loggers(*names: str):  # noqa: ANN202
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export(actor: torch.nn.Module, example: np.ndarray, out: Path, opset: int,
           metadata: dict[str, str]) -> None:
    """Write `out` (one file, weights inside) and add the metadata; raises ExportError."""
    # The dynamo exporter (torch 2.13's default): the legacy TorchScript exporter cannot
    # export LayerNormNoParams (F.layer_norm(x, x.shape[1:]) with a dynamic batch axis makes
    # the normalised shape a traced value, which it refuses). external_data=False keeps the
    # weights inside the one file (the default writes a separate .onnx.data).
    example_t = torch.from_numpy(np.ascontiguousarray(example))
    batch = torch.export.Dim("batch", min=1)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        # The exporter chats on stdout and through torch's loggers (opset conversion notes,
        # torchvision not installed); the outcome is checked below, so keep the console clean.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                _quiet_loggers("torch.onnx", "torch._export", "torch.export", "onnxscript"):
            warnings.simplefilter("ignore")
            torch.onnx.export(_Actor(actor), (example_t,), tmp, dynamo=True,
                              external_data=False, opset_version=opset,
                              input_names=["observation"], output_names=["logits", "action"],
                              dynamic_shapes={"observation": {0: batch}}, verbose=False)
        model = onnx.load(str(tmp))
        written = {o.domain: o.version for o in model.opset_import}.get("", None)
        if written != opset:
            raise ExportError(f"--opset {opset}: the exporter wrote opset {written} instead "
                              f"(supported here: {MIN_OPSET}..{onnx.defs.onnx_opset_version()})")
        del model.metadata_props[:]
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        model.producer_name = "stream-agent-runtime"
        onnx.save(model, str(tmp))
        os.replace(tmp, out)
    except OSError as exc:
        raise ExportError(f"cannot write {out} ({exc.strerror or exc})") from None
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures are many and varied
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"export at opset {opset} failed: {first[:200]}") from None
    finally:
        tmp.unlink(missing_ok=True)


def torch_logits(actor: torch.nn.Module, frames: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return actor(torch.from_numpy(np.ascontiguousarray(frames))).numpy()


def policy_logits(policy: Policy, frames: np.ndarray) -> np.ndarray:
    """Logits one observation at a time (as deployed) and as one batch (dynamic axis)."""
    single = np.concatenate([policy.logits(f[None]) for f in frames])
    batched = policy.logits(frames)
    # Batched and single evaluations may differ by float rounding only.
    if not np.allclose(single, batched, atol=LOGIT_TOLERANCE, rtol=0):
        raise VerificationError("batched and single-observation logits differ beyond "
                                f"{LOGIT_TOLERANCE}")
    return single


def verify(path: Path, actor: torch.nn.Module, frames: np.ndarray) -> dict[str, Any]:
    """onnx.checker + parity with the torch actor; raises VerificationError."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - ValidationError and friends
        raise VerificationError(f"onnx.checker rejects {path}: "
                                f"{str(exc).strip().splitlines()[0]}") from None
    policy = Policy.load(path)
    ours = policy_logits(policy, frames)
    ref = torch_logits(actor, frames)
    diff = float(np.max(np.abs(ours - ref)))
    actions = np.array([policy.act(f) for f in frames])
    agreement = float(np.mean(actions == ref.argmax(axis=-1)))
    if not diff <= LOGIT_TOLERANCE:
        raise VerificationError(f"parity: max |logit difference| {diff:.3g} > "
                                f"{LOGIT_TOLERANCE} on {len(frames)} stream observations")
    if agreement < 1.0:
        raise VerificationError(f"parity: greedy actions agree on only {agreement:.1%} of "
                                f"{len(frames)} stream observations")
    return {"max_abs_logit_diff": diff, "action_agreement": agreement,
            "parity_frames": len(frames)}


class _FrameReader:
    """onnxruntime CalibrationDataReader over real stream frames, one per batch."""

    def __init__(self, frames: np.ndarray) -> None:
        self._iter = iter(frames)

    def get_next(self) -> dict[str, np.ndarray] | None:
        frame = next(self._iter, None)
        return None if frame is None else {"observation": frame[None]}

    def rewind(self) -> None:  # pragma: no cover - not used by quantize_static
        pass


def quantize_int8(float_path: Path, calibration: np.ndarray, held_out: np.ndarray
                  ) -> dict[str, Any]:
    """Static QDQ per-channel int8 beside the float model; kept only if it agrees enough."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = float_path.with_name(float_path.name.removesuffix(".onnx") + ".int8.onnx")
    result: dict[str, Any] = {"path": str(out)}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=False)
        # Only the weight layers are quantised, and not the first one: its input is the
        # normalised frame, where pixels that barely vary in training are scaled by up to
        # 1/sqrt(1e-8), so one 8-bit range for it wipes out the rest of the picture
        # (measured on a Breakout actor: max logit error 0.36 with it quantised, 0.035 not).
        first_layer = next((n.name for n in onnx.load(str(prepared)).graph.node
                            if n.op_type in ("Conv", "Gemm", "MatMul")), None)
        with contextlib.redirect_stdout(io.StringIO()), _quiet_loggers("root"):
            quantize_static(str(prepared), str(out), _FrameReader(calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                            nodes_to_exclude=[first_layer] if first_layer else [])
    # Quantisation drops custom metadata: carry it over so runtime.infer accepts the file.
    source, model = onnx.load(str(float_path)), onnx.load(str(out))
    del model.metadata_props[:]
    for prop in source.metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    model.metadata_props.add(key="quantization", value="int8 static QDQ per-channel")
    onnx.save(model, str(out))
    float_logits = Policy.load(float_path).logits(held_out)
    int8_logits = Policy.load(out).logits(held_out)
    agreement = float(np.mean(float_logits.argmax(axis=-1) == int8_logits.argmax(axis=-1)))
    result.update(size_bytes=out.stat().st_size, action_agreement=agreement,
                  max_abs_logit_diff=float(np.max(np.abs(float_logits - int8_logits))),
                  held_out_frames=len(held_out),
                  size_ratio=round(float_path.stat().st_size / out.stat().st_size, 2))
    if agreement >= INT8_MIN_AGREEMENT:
        result["kept"] = True
    else:
        out.unlink()
        result["kept"] = False
        result["reason"] = (f"greedy actions agree with the float model on {agreement:.1%} of "
                            f"{len(held_out)} held-out frames, below {INT8_MIN_AGREEMENT:.0%}: "
                            f"not written")
        print(f"export_onnx: int8 model discarded: {result['reason']}", file=sys.stderr)
    return result


# -- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="export_onnx",
                            description="Export a checkpoint's actor to ONNX and verify it.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="run directory: its newest good checkpoint")
    source.add_argument("--checkpoint", help="one checkpoint file (ckpt-*.pt)")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--quantize", choices=["int8"],
                        help="also write a static int8 model beside --out if it agrees enough")
    parser.add_argument("--seed", type=int, default=0, help="seed of the verification stream")
    args = parser.parse_args(argv)
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= args.opset <= max_opset:
        raise ExportError(f"--opset {args.opset}: must be in {MIN_OPSET}..{max_opset} "
                          f"(LayerNormalization needs 17; this onnx knows up to {max_opset})")
    return args


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"--out {out}: directory {out.parent} is not writable")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Export, verify, optionally quantise; returns the JSON summary."""
    out = Path(args.out)
    _check_out(out)
    payload, ckpt_path = resolve_checkpoint(args.run_dir, args.checkpoint)
    actor, config = load_actor(payload, str(ckpt_path))
    torch.set_num_threads(1)
    # The stream the model was trained on, built from the metadata we are about to write.
    spec = payload.get("spec", {})
    try:
        raw = build_metadata(payload, config, _spec_for(config, args.seed))
        metadata = parse_metadata(raw, str(ckpt_path))
        n_quant = CALIBRATION_FRAMES + HELD_OUT_FRAMES if args.quantize else 0
        frames = stream_frames(metadata, PARITY_FRAMES + n_quant, args.seed)
    except (StreamError, ModelError) as exc:
        raise ExportError(f"cannot recreate the training stream: {exc}") from None
    if list(metadata["observation_shape"]) != list(spec.get("observation_shape", [])) or \
            metadata["num_actions"] != spec.get("num_actions"):
        raise ExportError(f"{ckpt_path}: the stream gives shape {metadata['observation_shape']}"
                          f" and {metadata['num_actions']} actions, the checkpoint was made "
                          f"for {spec.get('observation_shape')} and {spec.get('num_actions')}")
    parity_frames = frames[:PARITY_FRAMES]
    export(actor, parity_frames[:2], out, args.opset, raw)
    try:
        checks = verify(out, actor, parity_frames)
    except (ModelError, VerificationError) as exc:
        out.unlink(missing_ok=True)  # never leave a model that failed its checks behind
        raise VerificationError(str(exc)) from None
    summary: dict[str, Any] = {"path": str(out), "size_bytes": out.stat().st_size,
                               **checks, "opset": args.opset, "checkpoint": str(ckpt_path),
                               "training_step": metadata["training_step"],
                               "env_id": metadata["env_id"]}
    if args.quantize:
        rest = frames[PARITY_FRAMES:]
        summary["int8"] = quantize_int8(out, rest[:CALIBRATION_FRAMES],
                                        rest[CALIBRATION_FRAMES:])
    return summary


def _spec_for(config: Config, seed: int) -> Any:
    """The StreamSpec of the run's stream, built exactly as the daemon builds it."""
    from runtime.streams import open_stream

    stream = open_stream(config.env, seed)
    try:
        return stream.spec
    finally:
        stream.close()


def main(argv: list[str] | None = None) -> int:
    try:
        summary = run(parse_args(argv))
    except (ExportError, UsageError) as exc:
        print(f"export_onnx: error: {exc}", file=sys.stderr)
        return 2
    except VerificationError as exc:
        print(f"export_onnx: verification failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
