"""The device side of tools/device_check.py: what runs on the emulated aarch64 device, and
natively for the reference.

    python device_probe.py --model policy.onnx --frames frames.npz --out out.npz [--threads 1]
    python device_probe.py --bare

The first gives the model's logits and greedy actions on every recorded frame, one frame per
call as a device would act, to --out (npz), and prints one JSON line: latency, peak RSS,
the versions it ran with, whether torch or onnx is installed. --bare prints only the peak
RSS of an interpreter that ran none of it (under qemu-user: the emulator's own footprint).
Exit 1 with one line ``device_probe: error: ...`` when a step broke, 2 on bad usage.

device_check copies this one file onto the device, where the installed wheel provides
``runtime`` and nothing of tools/ exists: it imports the standard library, numpy and the
device side of runtime (onnxruntime through runtime.device.policy), never torch, onnx or
another tool. The frame set (load_frames) and DeviceCheckError live here for that reason:
the host reads and raises them too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli import OneLineParser, UsageError, positive_int
from runtime.errors import first_line

FRAMES_KEY = "frames"


class DeviceCheckError(Exception):
    """A failed step or check: one line, exit 1."""


def load_frames(path: str | Path) -> np.ndarray:
    """The recorded frame set: uint8 N x C x H x W under the key 'frames'."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if FRAMES_KEY not in data.files:
                raise DeviceCheckError(f"{path}: no {FRAMES_KEY!r} array (found "
                                       f"{', '.join(data.files) or 'none'})")
            frames = data[FRAMES_KEY]
    except (OSError, ValueError) as exc:
        raise DeviceCheckError(f"{path}: not a readable .npz frame set ({first_line(exc, 300)})"
                               ) from None
    if frames.dtype != np.uint8 or frames.ndim != 4 or 0 in frames.shape:
        raise DeviceCheckError(f"{path}: frames must be a non-empty uint8 N x C x H x W "
                               f"array, got {frames.dtype} {frames.shape}")
    return frames


def latency_summary(latencies_ns: Sequence[int]) -> dict[str, float | None]:
    """p50/p99/mean in microseconds (one decimal)."""
    if not latencies_ns:
        return {"latency_us_p50": None, "latency_us_p99": None, "latency_us_mean": None}
    lat = np.asarray(latencies_ns, dtype=np.float64) / 1e3
    return {"latency_us_p50": round(float(np.percentile(lat, 50)), 1),
            "latency_us_p99": round(float(np.percentile(lat, 99)), 1),
            "latency_us_mean": round(float(lat.mean()), 1)}


def read_memory_kb(status_path: str = "/proc/self/status") -> dict[str, int | None]:
    """VmHWM (peak RSS) and VmRSS in KiB from a /proc status file; None where absent."""
    found: dict[str, int | None] = {"vmhwm_kb": None, "vmrss_kb": None}
    with contextlib.suppress(OSError):
        for line in Path(status_path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key.lower() + "_kb"] = int(value.split()[0])
    return found


def probe(model: str | Path, frames: np.ndarray, threads: int = 1) -> dict[str, Any]:
    """Logits and greedy actions of `model` on every frame, one frame per call as a device
    would act, with per-action latency and this process's peak RSS."""
    t0 = time.perf_counter()
    # Imported here: load_s counts it; --bare never does.
    from runtime.device.policy import Policy

    policy = Policy.load(model, threads=threads)
    load_s = time.perf_counter() - t0
    logits = np.concatenate([policy.logits(frame[None]) for frame in frames])
    actions, latencies = [], []
    for frame in frames:
        start = time.perf_counter_ns()
        actions.append(policy.act(frame))
        latencies.append(time.perf_counter_ns() - start)
    import onnxruntime

    return {
        "logits": logits.astype(np.float32),
        "actions": np.asarray(actions, dtype=np.int64),
        "summary": {
            "model": str(model),
            "size_bytes": Path(model).stat().st_size,
            "frames": int(len(frames)),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__,
            "load_s": round(load_s, 3),
            **latency_summary(latencies),
            "graph_action_is_argmax": bool((np.asarray(actions) == logits.argmax(1)).all()),
            "torch_imported": "torch" in sys.modules,
            "torch_installed": _installed("torch"),
            "onnx_installed": _installed("onnx"),
            **read_memory_kb(),
        },
    }


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def bare_memory() -> dict[str, Any]:
    """--bare: an interpreter that runs nothing of the probe; its peak RSS (the emulator's
    own footprint under qemu-user)."""
    return {"machine": platform.machine(), **read_memory_kb()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="device_probe.py",
                           description="The model on recorded frames, as the device runs it.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--model", help="exported ONNX model")
    mode.add_argument("--bare", action="store_true", help="only the interpreter's peak RSS")
    parser.add_argument("--frames", help="recorded frame set (npz)")
    parser.add_argument("--out", help="where the logits and actions go (npz)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="onnxruntime threads (default 1)")
    args = parser.parse_args(argv)
    if args.model and not (args.frames and args.out):
        raise UsageError("--model needs --frames and --out")
    return args


def report_error(prog: str, exc: Exception) -> int:
    """One line on stderr for what a main() caught; returns the exit code (2: bad usage)."""
    if isinstance(exc, (UsageError, DeviceCheckError)):
        print(f"{prog}: error: {exc}", file=sys.stderr)
    else:
        print(f"{prog}: error: {type(exc).__name__}: {first_line(exc, 300)}", file=sys.stderr)
    return 2 if isinstance(exc, UsageError) else 1


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.bare:
            print(json.dumps(bare_memory()))
            return 0
        result = probe(args.model, load_frames(args.frames), threads=args.threads)
        np.savez(args.out, logits=result["logits"], actions=result["actions"])
        result["summary"].update(read_memory_kb())  # peak after the run
    except (UsageError, DeviceCheckError, OSError, ValueError) as exc:
        return report_error("device_probe", exc)
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
