"""Export the actor of a checkpoint to one self-contained ONNX file, then verify it.

A thin command line over runtime.daemon.export: the one export + verification, which the
daemon's policy publisher runs too.

    python tools/export_onnx.py (--run-dir DIR | --checkpoint FILE) --out policy.onnx
        [--opset N (default 17)] [--quantize int8]

The graph is the policy half of the network only: input ``observation`` exactly as the
stream gives it (uint8 N x C x H x W frames or float32 N x D vectors, dynamic N), outputs
``logits`` (float32 N x A) and ``action`` (int64 N, the greedy argmax). uint8 scaling and
the frozen observation-normalisation statistics are inside the graph. The file carries in
its metadata everything the device side (``runtime.device``) needs to rebuild the same
stream.

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
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from runtime.cli import OneLineParser, UsageError
from runtime.contract import INPUT_NAME
from runtime.daemon.export import (
    DEFAULT_OPSET,
    MIN_OPSET,
    PARITY_FRAMES,
    ExportError,
    VerificationError,
    build_metadata,
    check_actor_fits,
    export_verified,
    load_actor,
    quiet_loggers,
    resolve_checkpoint,
    stream_frames,
    stream_spec,
    training_frames,
)
from runtime.device.policy import Policy
from runtime.streams import StreamError

INT8_MIN_AGREEMENT = 0.97
CALIBRATION_FRAMES = 128
HELD_OUT_FRAMES = 256
# The verification stream and the checkpoint reader live in runtime.daemon.export, shared
# with the daemon's publisher; tools/bench/infer.py reaches them through this module too.
__all__ = ["ExportError", "main", "resolve_checkpoint", "stream_frames"]


class _FrameReader:
    """onnxruntime CalibrationDataReader over real stream frames, one per batch."""

    def __init__(self, frames: np.ndarray) -> None:
        self._iter = iter(frames)

    def get_next(self) -> dict[str, np.ndarray] | None:
        frame = next(self._iter, None)
        return None if frame is None else {INPUT_NAME: frame[None]}

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
        with contextlib.redirect_stdout(io.StringIO()), quiet_loggers("root"):
            quantize_static(str(prepared), str(out), _FrameReader(calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                            nodes_to_exclude=[first_layer] if first_layer else [])
    # Quantisation drops custom metadata: carry it over so the device side accepts the file.
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
    spec = payload.get("spec", {})
    step = int(payload.get("counters", {}).get("steps", 0))
    try:
        raw = build_metadata(config, stream_spec(config, args.seed), step,
                             str(spec.get("network", "")), producer="tools/export_onnx.py")
    except StreamError as exc:
        raise ExportError(f"cannot recreate the training stream: {exc}") from None
    n_quant = CALIBRATION_FRAMES + HELD_OUT_FRAMES if args.quantize else 0
    metadata, frames = training_frames(raw, PARITY_FRAMES + n_quant, args.seed, str(ckpt_path))
    check_actor_fits(metadata, spec.get("observation_shape"), spec.get("num_actions"),
                     str(ckpt_path))
    checks = export_verified(actor, raw, frames[:PARITY_FRAMES], out, args.opset)
    summary: dict[str, Any] = {"path": str(out), "size_bytes": out.stat().st_size,
                               **checks, "opset": args.opset, "checkpoint": str(ckpt_path),
                               "training_step": metadata["training_step"],
                               "env_id": metadata["env_id"]}
    if args.quantize:
        rest = frames[PARITY_FRAMES:]
        summary["int8"] = quantize_int8(out, rest[:CALIBRATION_FRAMES],
                                        rest[CALIBRATION_FRAMES:])
    return summary


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
