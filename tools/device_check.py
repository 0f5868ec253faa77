"""Prove the torch-free inference runtime on a second architecture: an emulated aarch64 device.

    python tools/device_check.py --model policy.onnx [--games N (default 1)]
        [--frames tests/data/breakout_frames.npz] [--max-steps M]
        [--device-dir DIR (default ~/.cache/stream-agent/aarch64-bookworm)]
        [--cpu QEMU_CPU (default cortex-a72)] [--mirror URL] [--rebuild] [--timeout S]
    python tools/device_check.py --record-frames OUT [--count N] [--stride S] [--seed S]

The device is a Debian bookworm arm64 root file system made (or reused, if already built)
under --device-dir and entered with proot + qemu-user (tools/device_emulator.py). It gets
the project exactly as README "Device install" says: the wheel built from this repository
(tools/device_wheel.py), its dependencies downloaded on the host as aarch64 wheels (numpy,
onnxruntime, pyyaml, gymnasium, ale-py, never torch or onnx) and ``pip install --no-index
--find-links`` into a venv of bookworm's python3.11 inside the device. Only the model, the
frame set and the probe (tools/device_probe.py, one file) are copied in, never source files.

Then, on the device:

(a) ``python -m runtime.infer --model ... --games N`` plays N games; its JSON is kept
    (and compared with the same command run natively: same seed, same greedy policy);
(b) the policy's logits and greedy actions on the recorded frames are compared with the
    native run of the same model on the same frames: greedy actions must agree on >= 99.9%;
    the max absolute logit difference is reported;
(c) peak RSS (VmHWM of /proc/self/status, read inside the emulated process) and the model's
    file size. qemu-user does not emulate /proc/self/status: the figure is the emulator
    process's (guest + qemu), an upper bound, so a bare interpreter's figure on the device
    and the native figures are reported beside it.

A ``policy.int8.onnx`` beside the model (``export_onnx.py --quantize int8``) is checked too:
on the device against the float model (the exporter's 97% bar) and against itself on x86,
size and latency side by side. Progress goes to stderr; ONE JSON object to stdout. Exit 0
when every check passed, 1 with one line ``device_check: error: ...`` when a check failed or
a step broke, 2 on bad usage. Under emulation inference is a few hundred times slower than
native: the first build takes minutes (debootstrap's second stage), a check about a minute.

``--record-frames OUT`` regenerates tests/data/breakout_frames.npz: real observations of
the default Breakout stream (runtime.streams, default options) under seeded random actions,
one every --stride agent steps so that the set spans whole games.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli import OneLineParser, UsageError, positive_int
from runtime.streams import make_stream
from tools import ROOT
from tools.device_emulator import (
    DEB_ARCH,
    DEFAULT_CPU,
    DEFAULT_DEVICE_DIR,
    DEFAULT_MIRROR,
    PROBE,
    QEMU,
    SUITE,
    Device,
    log,
)
from tools.device_probe import DeviceCheckError, load_frames, report_error
from tools.device_wheel import build_wheel

DEFAULT_FRAMES = ROOT / "tests" / "data" / "breakout_frames.npz"
MIN_AGREEMENT = 0.999  # float model, aarch64 vs x86
INT8_MIN_AGREEMENT = 0.97  # int8 vs float on the device: the exporter's own bar
Probed = tuple[dict[str, Any], dict[str, np.ndarray]]  # the probe's summary, its arrays


# --------------------------------------------------------------------------------------------
# Parity of two logit arrays (unit-tested without the emulator).


def compare_logits(reference: np.ndarray, candidate: np.ndarray,
                   min_agreement: float = MIN_AGREEMENT) -> dict[str, Any]:
    """Greedy-action agreement and max |logit difference| of `candidate` vs `reference`
    (both N x A); `passed` when agreement >= min_agreement and every logit is finite."""
    ref = np.asarray(reference)
    cand = np.asarray(candidate)
    if ref.ndim != 2 or ref.shape != cand.shape or ref.shape[0] == 0:
        raise ValueError(f"logits must be two non-empty N x A arrays of one shape, got "
                         f"{ref.shape} and {cand.shape}")
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    finite = bool(np.isfinite(ref).all() and np.isfinite(cand).all())
    ref_actions, cand_actions = ref.argmax(axis=1), cand.argmax(axis=1)
    differ = np.flatnonzero(ref_actions != cand_actions)
    agreement = 1.0 - len(differ) / len(ref)
    diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    return {
        "frames": int(len(ref)),
        "action_agreement": float(agreement),
        "max_abs_logit_diff": float(diff.max()) if finite else None,
        "disagreeing_frames": [int(i) for i in differ[:10]],
        "min_agreement": float(min_agreement),
        "passed": bool(finite and agreement >= min_agreement),
    }


# --------------------------------------------------------------------------------------------
# The frame set.


def record_frames(out: str | Path, count: int = 96, stride: int = 6, seed: int = 0,
                  env_id: str = "ALE/Breakout-v5") -> dict[str, Any]:
    """Play the default stream of `env_id` with seeded uniform random actions and keep one
    observation every `stride` agent steps (over several games) until `count`; writes a
    compressed npz (frames, steps, env_id, seed, stride). Returns a small summary."""
    if count < 1 or stride < 1:
        raise DeviceCheckError("--count and --stride must be >= 1")
    stream = make_stream(env_id, seed=seed)
    rng = np.random.default_rng(seed)
    frames, steps, games = [], [], 0
    try:
        obs, step = stream.reset(), 0
        while len(frames) < count:
            if step % stride == 0:
                frames.append(obs)
                steps.append(step)
            obs, _, terminated, truncated, info = stream.step(
                int(rng.integers(stream.spec.num_actions)))
            step += 1
            games += bool(info.get("game_over"))
            if terminated or truncated:
                obs = stream.reset()
    finally:
        stream.close()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, frames=np.stack(frames), steps=np.asarray(steps, dtype=np.int64),
                        env_id=np.asarray(env_id), seed=np.asarray(seed),
                        stride=np.asarray(stride))
    return {"path": str(out), "frames": len(frames), "shape": list(np.stack(frames).shape),
            "agent_steps": step, "games_finished": games, "size_bytes": out.stat().st_size}


# --------------------------------------------------------------------------------------------
# The native side: the same probe and game as their own processes (a fair peak RSS).


def _json_line(text: str, what: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    raise DeviceCheckError(f"{what} printed no JSON summary")


def _native(argv: Sequence[str], what: str, timeout: float = 600) -> dict[str, Any]:
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, text=True, capture_output=True,
                          timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip() or "no output").splitlines()[-1][:200]
        raise DeviceCheckError(f"{what} failed natively (exit {done.returncode}): {tail}")
    return _json_line(done.stdout, what)


def native_probe(model: Path, frames_path: Path, out: Path) -> Probed:
    """The probe as its own native process (a fair peak RSS): (summary, {logits, actions})."""
    summary = _native([str(PROBE), "--model", str(model), "--frames", str(frames_path),
                       "--out", str(out)], "probe")
    with np.load(out) as data:
        return summary, {"logits": data["logits"], "actions": data["actions"]}


def int8_sibling(model: Path) -> Path | None:
    sibling = model.with_name(model.name.removesuffix(".onnx") + ".int8.onnx")
    return sibling if sibling != model and sibling.is_file() else None


def _game_argv(model: str, games: int, max_steps: int | None) -> list[str]:
    argv = ["-m", "runtime.infer", "--model", model, "--games", str(games), "--seed", "0"]
    return argv + (["--max-steps", str(max_steps)] if max_steps else [])


def _compact(summary: dict[str, Any], drop: Sequence[str] = ("model",)) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in drop}


# --------------------------------------------------------------------------------------------
# The check: native reference, device build, device runs, comparison.


@dataclass
class Runs:
    """What one side, native or device, gave: each model's probe, a game of
    runtime.infer, a bare interpreter's peak RSS."""

    probes: dict[Path, Probed]
    game: dict[str, Any]
    bare: dict[str, Any]
    game_seconds: float = 0.0
    game_maxrss_kb: int | None = None  # the device's: the emulator process's, from wait4


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """The whole check: the one JSON object the command prints."""
    model = Path(args.model).resolve()
    frames_path = Path(args.frames).resolve()
    if not model.is_file():
        raise UsageError(f"--model {args.model}: not a file")
    frames = load_frames(frames_path)
    int8 = int8_sibling(model)
    models = [model] + ([int8] if int8 else [])
    device_dir = Path(args.device_dir).expanduser().resolve()
    device = Device(device_dir, args.mirror, args.cpu)
    started = time.monotonic()
    result: dict[str, Any] = {"model": str(model), "model_size_bytes": model.stat().st_size,
                              "frames": {"path": str(frames_path),
                                         "shape": list(frames.shape)},
                              "device_dir": str(device_dir)}

    # Native reference first: cheap, and it fails fast on a bad model.
    native = native_runs(models, frames_path, device_dir / "native", args)

    build_start = time.monotonic()
    rootfs = device.ensure_rootfs(rebuild=args.rebuild)
    wheel = build_wheel(device_dir / "dist")
    wheels, digest = device.ensure_wheels(wheel)
    venv = device.ensure_venv(wheel.name, digest)
    placed = device.stage_app(models, frames_path)
    build_seconds = time.monotonic() - build_start
    result["build"] = {"seconds": round(build_seconds, 1), "rootfs": rootfs, "venv": venv,
                       "wheel": wheel.name, "wheels": wheels}

    check_start = time.monotonic()
    on_device = device_runs(device, placed, models, len(frames), args)
    check_seconds = time.monotonic() - check_start

    failures = _compare_float(result, model, native, on_device, args.cpu)
    failures += _compare_int8(result, model, int8, native, on_device)
    result["durations_s"] = {"native": round(build_start - started, 1),
                             "build": round(build_seconds, 1),
                             "check": round(check_seconds, 1),
                             "total": round(time.monotonic() - started, 1)}
    result["passed"] = not failures
    result["failures"] = failures
    return result


def native_runs(models: Sequence[Path], frames_path: Path, work: Path,
                args: argparse.Namespace) -> Runs:
    """The reference on this machine: each model's probe, the game, a bare interpreter."""
    log(f"native ({platform.machine()}) reference: probe and {args.games} game(s) ...")
    work.mkdir(parents=True, exist_ok=True)
    probes = {m: native_probe(m, frames_path, work / f"{m.name}.npz") for m in models}
    game = _native(_game_argv(str(models[0]), args.games, args.max_steps), "runtime.infer",
                   timeout=3600)
    return Runs(probes, game, _native([str(PROBE), "--bare"], "bare python"))


def device_runs(device: Device, placed: dict[str, str], models: Sequence[Path], frames: int,
                args: argparse.Namespace) -> Runs:
    """The same on the device: the game, each model's probe, a bare interpreter. Each
    summary gets the host's wait4 peak RSS of its process (the emulator's, guest and all)."""
    log(f"[device] playing {args.games} game(s): python -m runtime.infer (slow: emulated) ...")
    t0 = time.monotonic()
    got = device.device_python(_game_argv(placed[str(models[0])], args.games, args.max_steps),
                               "device-game", timeout=args.timeout)
    game = _json_line(device.must(got, "python -m runtime.infer (device)", "device-game"),
                      "runtime.infer (device)")
    game_seconds = time.monotonic() - t0
    log(f"[device] game done in {game_seconds:.0f} s: {json.dumps(_compact(game))}")

    probes: dict[Path, Probed] = {}
    for m in models:
        log(f"[device] probe {m.name} on {frames} frames ...")
        name = f"{m.name}.npz"
        ran = device.device_python(["device_probe.py", "--model", placed[str(m)],
                                    "--frames", "frames.npz", "--out", f"out/{name}"],
                                   f"device-probe-{m.name}", timeout=args.timeout)
        summary = _json_line(device.must(ran, f"probe {m.name} (device)",
                                         f"device-probe-{m.name}"), "probe (device)")
        summary["host_maxrss_kb"] = ran[3]
        with np.load(device.out_dir() / name) as data:
            probes[m] = (summary, {"logits": data["logits"], "actions": data["actions"]})
    ran = device.device_python(["device_probe.py", "--bare"], "device-bare", timeout=600)
    bare = _json_line(device.must(ran, "bare python (device)", "device-bare"),
                      "bare python (device)")
    bare["host_maxrss_kb"] = ran[3]
    return Runs(probes, game, bare, game_seconds, got[3])


def _compare_float(result: dict[str, Any], model: Path, native: Runs, dev: Runs,
                   cpu: str) -> list[str]:
    """(a)-(c) for the float model into `result`; returns the failures."""
    dsum, dout = dev.probes[model]
    nsum, nout = native.probes[model]
    # (b) parity: float model, aarch64 vs x86.
    parity = compare_logits(nout["logits"], dout["logits"], MIN_AGREEMENT)
    parity["graph_actions_agree"] = float(np.mean(nout["actions"] == dout["actions"]))
    same_trajectory = (dev.game.get("returns") == native.game.get("returns")
                       and dev.game.get("steps") == native.game.get("steps"))
    result.update({
        "device": {"machine": dsum["machine"], "python": dsum["python"],
                   "numpy": dsum["numpy"], "onnxruntime": dsum["onnxruntime"],
                   "torch_installed": dsum["torch_installed"],
                   "onnx_installed": dsum["onnx_installed"],
                   "emulation": f"proot -q '{QEMU} -cpu {cpu}', {SUITE} {DEB_ARCH}"},
        "game": {"device": _compact(dev.game), "native": _compact(native.game),
                 "same_trajectory": same_trajectory,
                 "device_seconds": round(dev.game_seconds, 1)},
        "parity": parity,
        "latency_us": {"device": _pick(dsum, "latency_us"), "native": _pick(nsum, "latency_us")},
        "memory_kb": {
            "device_probe_vmhwm": dsum["vmhwm_kb"],
            "device_probe_host_maxrss": dsum["host_maxrss_kb"],
            "device_bare_python_vmhwm": dev.bare["vmhwm_kb"],
            "device_game_host_maxrss": dev.game_maxrss_kb,
            "native_probe_vmhwm": nsum["vmhwm_kb"],
            "native_bare_python_vmhwm": native.bare["vmhwm_kb"],
            # VmHWM read inside the guest equals the host's wait4 peak of the same process
            # (within 10%): it is the qemu process's, guest and emulator together.
            "vmhwm_is_the_emulator_process": _close(dsum["vmhwm_kb"], dsum["host_maxrss_kb"]),
            "note": "qemu-user does not emulate /proc/self/status: VmHWM on the device is the "
                    "emulator process's (guest + qemu's translated code and heap), an upper "
                    "bound; the bare-python figures give the interpreter + emulator floor, "
                    "the native probe what numpy + onnxruntime + the model take on a real CPU",
        },
    })
    failures = [] if parity["passed"] else [
        f"aarch64 vs x86 greedy actions agree on {parity['action_agreement']:.2%} of "
        f"{parity['frames']} frames, below {MIN_AGREEMENT:.1%}"]
    if dsum["torch_installed"] or dsum["onnx_installed"]:
        failures.append("torch or onnx is installed on the device")
    return failures


def _compare_int8(result: dict[str, Any], model: Path, int8: Path | None, native: Runs,
                  dev: Runs) -> list[str]:
    """The int8 sibling, on the device: vs the float model there, and vs itself on x86."""
    if int8 is None:
        result["int8"] = None
        return []
    dsum, dout = dev.probes[model]
    nsum = native.probes[model][0]
    isum, iout = dev.probes[int8]
    vs_float = compare_logits(dout["logits"], iout["logits"], INT8_MIN_AGREEMENT)
    cross = compare_logits(native.probes[int8][1]["logits"], iout["logits"], MIN_AGREEMENT)
    result["int8"] = {
        "model": str(int8),
        "vs_float_on_device": vs_float,
        "vs_x86": {k: cross[k] for k in ("action_agreement", "max_abs_logit_diff",
                                         "disagreeing_frames", "passed")},
        "size_bytes": {"float": dsum["size_bytes"], "int8": isum["size_bytes"]},
        "device_latency_us_p50": {"float": dsum["latency_us_p50"],
                                  "int8": isum["latency_us_p50"]},
        "native_latency_us_p50": {"float": nsum["latency_us_p50"],
                                  "int8": native.probes[int8][0]["latency_us_p50"]},
        "device_vmhwm_kb": {"float": dsum["vmhwm_kb"], "int8": isum["vmhwm_kb"]},
    }
    if vs_float["passed"]:
        return []
    return [f"int8 vs float on the device: {vs_float['action_agreement']:.2%}"
            f" below {INT8_MIN_AGREEMENT:.0%}"]


def _close(a: float | None, b: float | None, tolerance: float = 0.1) -> bool:
    return bool(a and b and abs(a - b) <= tolerance * max(a, b))


def _pick(summary: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k.removeprefix(prefix + "_"): v for k, v in summary.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python tools/device_check.py",
                           description="Check the inference runtime on an emulated aarch64 "
                                       "Debian device.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--model", help="exported ONNX model (tools/export_onnx.py)")
    mode.add_argument("--record-frames", metavar="OUT", help="record a frame set to OUT")
    parser.add_argument("--games", type=positive_int, default=1, help="games to play (default 1)")
    parser.add_argument("--frames", default=str(DEFAULT_FRAMES),
                        help="recorded frame set (default tests/data/breakout_frames.npz)")
    parser.add_argument("--device-dir", default=str(DEFAULT_DEVICE_DIR),
                        help="where the device is built and kept (default %(default)s)")
    parser.add_argument("--max-steps", type=positive_int,
                        help="bound the played games to this many agent steps")
    parser.add_argument("--mirror", default=DEFAULT_MIRROR, help="Debian mirror for debootstrap")
    parser.add_argument("--cpu", default=DEFAULT_CPU,
                        help="qemu -cpu model of the device (default %(default)s)")
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild the root file system even if one is there")
    parser.add_argument("--timeout", type=positive_int, default=7200,
                        help="seconds allowed to each command on the device (default 7200)")
    parser.add_argument("--count", type=positive_int, default=96, help="--record-frames: frames")
    parser.add_argument("--stride", type=positive_int, default=6,
                        help="--record-frames: agent steps between kept frames")
    parser.add_argument("--seed", type=int, default=0, help="--record-frames: seed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, run: Callable[..., dict] = run_check) -> int:
    try:
        args = parse_args(argv)
        if args.record_frames:
            print(json.dumps(record_frames(args.record_frames, args.count, args.stride,
                                           args.seed)))
            return 0
        result = run(args)
    except (UsageError, DeviceCheckError, OSError, ValueError,
            subprocess.SubprocessError) as exc:
        return report_error("device_check", exc)
    print(json.dumps(result))
    if not result["passed"]:
        print(f"device_check: error: {'; '.join(result['failures'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
