"""Action latency and peak memory: the ONNX inference runtime vs the torch actor.

    python tools/bench/infer.py (--run-dir DIR | --checkpoint FILE) [--frames 256]
        [--repeats 4] [--model policy.onnx]

Same machine, same run, same real stream observations (random actions): the actor is
exported to a temporary ONNX file (or --model is used), the frames are saved once, and each
runtime then runs in its own fresh subprocess, so that its peak RSS (ru_maxrss) is its own:
(a) runtime.device.policy.Policy.act (numpy + onnxruntime, 1 thread), (b) the torch actor
(eager, 1 thread, no_grad, argmax). Each observation is acted on one at a time, as when
deployed. Prints one JSON object with both and their ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tools import ROOT


def _peak_rss_mb() -> float:
    """Peak resident set of this process, MB.

    Linux carries ru_maxrss across execve (it keeps the high-water mark of the image being
    replaced), so a child started by a 500 MB parent reports at least 500 MB whatever it
    does. VmHWM in /proc/self/status belongs to the current image only; ru_maxrss is the
    fallback where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / (1024 * 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)


def _timed(act, frames: np.ndarray, repeats: int) -> dict:  # noqa: ANN001
    for frame in frames[:16]:  # warm-up: allocator, lazy initialisation, caches
        act(frame)
    latencies = []
    actions = []
    clock = time.perf_counter_ns
    for _ in range(repeats):
        for frame in frames:
            t0 = clock()
            action = act(frame)
            latencies.append(clock() - t0)
            actions.append(action)
    lat = np.asarray(latencies, dtype=np.float64) / 1e3
    return {"latency_us_p50": round(float(np.percentile(lat, 50)), 1),
            "latency_us_p99": round(float(np.percentile(lat, 99)), 1),
            "acts": len(latencies), "actions": actions[:len(frames)]}


def child_onnx(model: str, frames_path: str, repeats: int) -> dict:
    start = time.perf_counter()
    from runtime.device.policy import Policy

    policy = Policy.load(model, threads=1)
    load_s = time.perf_counter() - start
    frames = np.load(frames_path)
    result = _timed(policy.act, frames, repeats)
    result.update(load_s=round(load_s, 3), peak_rss_mb=_peak_rss_mb(),
                  torch_imported="torch" in sys.modules)
    return result


def child_torch(checkpoint: str, frames_path: str, repeats: int) -> dict:
    start = time.perf_counter()
    import torch

    from agent.learner import A2CLearner
    from runtime.daemon.checkpoints import read_checkpoint
    from runtime.daemon.config import from_dict

    torch.set_num_threads(1)
    payload = read_checkpoint(Path(checkpoint))
    config = from_dict(payload["config"])
    spec = payload["spec"]
    learner = A2CLearner(config.agent, tuple(spec["observation_shape"]),
                         int(spec["num_actions"]))
    learner.net.load_state_dict(payload["learner"]["network"])
    actor = learner.net.policy().eval()
    load_s = time.perf_counter() - start
    frames = np.load(frames_path)

    def act(frame: np.ndarray) -> int:
        with torch.no_grad():
            return int(actor(torch.from_numpy(frame).unsqueeze(0)).argmax(dim=-1)[0])

    result = _timed(act, frames, repeats)
    result.update(load_s=round(load_s, 3), peak_rss_mb=_peak_rss_mb())
    return result


def _run_child(kind: str, target: str, frames_path: str, repeats: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--target", target,
                           "--frames-file", frames_path, "--repeats", str(repeats)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"bench_infer: error: {kind} benchmark failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_infer", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run-dir", help="run directory: its newest good checkpoint")
    source.add_argument("--checkpoint", help="one checkpoint file")
    parser.add_argument("--model", help="use this exported model instead of exporting")
    parser.add_argument("--frames", type=int, default=256, help="real stream observations")
    parser.add_argument("--repeats", type=int, default=4, help="passes over the frames")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["onnx", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--frames-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run = child_onnx if args.child == "onnx" else child_torch
        print(json.dumps(run(args.target, args.frames_file, args.repeats)))
        return 0
    if args.run_dir is None and args.checkpoint is None:
        parser.error("one of --run-dir or --checkpoint is required")

    from tools import export_onnx as ex  # here, not at the top: the onnx child has no torch

    try:
        payload, ckpt = ex.resolve_checkpoint(args.run_dir, args.checkpoint)
    except ex.ExportError as exc:
        print(f"bench_infer: error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "policy.onnx")
            with contextlib.redirect_stdout(io.StringIO()):  # one JSON object: ours
                code = ex.main(["--checkpoint", str(ckpt), "--out", model, "--seed",
                                str(args.seed)])
            if code != 0:
                return code
        from runtime.device.policy import Policy

        metadata = Policy.load(model).metadata
        frames_path = str(Path(tmp) / "frames.npy")
        np.save(frames_path, ex.stream_frames(metadata, args.frames, args.seed + 1))
        onnx_result = _run_child("onnx", model, frames_path, args.repeats)
        torch_result = _run_child("torch", str(ckpt), frames_path, args.repeats)
    agreement = float(np.mean(np.asarray(onnx_result.pop("actions"))
                              == np.asarray(torch_result.pop("actions"))))
    summary = {
        "checkpoint": str(ckpt), "env_id": metadata["env_id"], "frames": args.frames,
        "onnxruntime": onnx_result, "torch": torch_result,
        "greedy_action_agreement": agreement,
        "latency_p50_ratio_torch_over_onnx": round(
            torch_result["latency_us_p50"] / onnx_result["latency_us_p50"], 2),
        "latency_p99_ratio_torch_over_onnx": round(
            torch_result["latency_us_p99"] / onnx_result["latency_us_p99"], 2),
        "peak_rss_ratio_torch_over_onnx": round(
            torch_result["peak_rss_mb"] / onnx_result["peak_rss_mb"], 2),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
