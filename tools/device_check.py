"""Prove the torch-free inference runtime on a second architecture: an emulated aarch64 device.

    python tools/device_check.py --model policy.onnx [--games N (default 1)]
        [--frames tests/data/breakout_frames.npz] [--max-steps M]
        [--device-dir DIR (default ~/.cache/stream-agent/aarch64-bookworm)]
        [--cpu QEMU_CPU (default cortex-a72)] [--mirror URL] [--rebuild] [--timeout S]
    python tools/device_check.py --record-frames OUT [--count N] [--stride S] [--seed S]

The device is a Debian bookworm arm64 root file system made (or reused, if already built)
under --device-dir with ``debootstrap --arch=arm64 --foreign`` and finished inside
``proot -q qemu-aarch64-static``: no binfmt, no privileged container, but root on the host
(debootstrap) and the Debian packages debootstrap, proot and qemu-user-static. The device
gets the project exactly as README "Device install" says: the wheel built from this
repository (``pip wheel --no-deps``), its dependencies downloaded on the host as aarch64
wheels (``pip download --platform ...``: numpy, onnxruntime, pyyaml, gymnasium, ale-py,
never torch or onnx) and ``pip install --no-index --find-links`` into a venv of bookworm's
python3.11 inside the device. Only the model, the frame set and this file (the probe) are
copied in, never source files. Then, on the device:

Then, on the device:

(a) ``python -m runtime.infer --model ... --episodes N`` plays N games; its JSON is kept
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

Two workarounds make bookworm's proot 5.1 + qemu 7.2 work: a seccomp filter turns the
syscalls proot 5.1 does not translate (statx, faccessat2, clone3) into ENOSYS so glibc and
qemu fall back to ones it does; and a Cortex-A72 /proc/cpuinfo is bound over the host's,
which qemu 7.2 passes through and onnxruntime's cpuinfo library crashes on.

``--record-frames OUT`` regenerates tests/data/breakout_frames.npz: real observations of
the default Breakout stream (runtime.streams, default options) under seeded random actions,
one every --stride agent steps so that the set spans whole games.

Only the standard library, numpy and runtime.cli are imported at module level: ``--probe``
(internal) runs this file on the device, where the installed wheel provides ``runtime``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# runtime.* from the installed project: the editable install here, the wheel on the device.
from runtime.cli import OneLineParser, UsageError, positive_int
from runtime.errors import first_line

# Not tools.ROOT: this file also runs on the device, where there is no tools package.
ROOT = Path(__file__).resolve().parent.parent

DEFAULT_FRAMES = ROOT / "tests" / "data" / "breakout_frames.npz"
DEFAULT_DEVICE_DIR = Path("~/.cache/stream-agent/aarch64-bookworm")
# What a wheel of the project is built from (a copy, so the tree gets no build/ litter):
# all that `pip wheel .` in a checkout reads, tools included, which the wheel leaves out.
WHEEL_SOURCES = ("pyproject.toml", "setup.py", "README.md", "agent", "runtime", "tools")
PROJECT = "stream-agent-runtime"
LEARNER_ONLY = ("torch", "onnx", "onnxscript")  # never on a device
MIN_AGREEMENT = 0.999  # float model, aarch64 vs x86
INT8_MIN_AGREEMENT = 0.97  # int8 vs float on the device: the exporter's own bar
SUITE, DEB_ARCH, QEMU = "bookworm", "arm64", "qemu-aarch64-static"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEVICE_PACKAGES = ("python3", "python3-venv")
# The emulated core: a Cortex-A72 (Raspberry Pi 4 class: ARMv8.0 NEON, no dotprod, no SVE),
# so onnxruntime takes the kernels such a device would; qemu's "max" enables everything.
DEFAULT_CPU = "cortex-a72"
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
DEVICE_PYTHON_VERSION = "3.11"  # bookworm's python3
# Paths inside the device.
APP, VENV, WHEELS = "/opt/stream-agent/app", "/opt/stream-agent/venv", "/wheels"
DEVICE_PATH = "/opt/stream-agent/venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
FRAMES_KEY = "frames"


class DeviceCheckError(Exception):
    """A failed step or check: one line, exit 1."""



# --------------------------------------------------------------------------------------------
# Pure parts: parity of two logit arrays, the frame set (unit-tested without the emulator).


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


# --------------------------------------------------------------------------------------------
# The wheel: what a device installs (README "Device install"). Standard library only.


def build_wheel(dest: Path, root: Path = ROOT) -> Path:
    """`pip wheel --no-deps` of the project into `dest`; returns the wheel's path. Built from
    a temporary copy of the sources (no build/ or egg-info left in the tree) with the
    installed setuptools (--no-build-isolation: no index needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheel-src-") as tmp:
        for name in WHEEL_SOURCES:
            source = root / name
            if source.is_dir():
                shutil.copytree(source, Path(tmp) / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, Path(tmp) / name)
        before = set(dest.glob("*.whl"))
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                               "--no-build-isolation", "--disable-pip-version-check", "-q",
                               "-w", str(dest), tmp], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip() or "no output").splitlines()[-1][:200]
        raise DeviceCheckError(f"pip wheel failed (exit {done.returncode}): {tail}")
    name = PROJECT.replace("-", "_")
    built = sorted(set(dest.glob(f"{name}-*.whl")) - before) or sorted(dest.glob(f"{name}-*.whl"))
    if not built:
        raise DeviceCheckError(f"pip wheel wrote no {name}-*.whl into {dest}")
    return built[-1]


def _wheel_text(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(f".dist-info/{member}")]
        if not names:
            raise DeviceCheckError(f"{wheel.name} has no {member}")
        return archive.read(names[0]).decode()


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's own dependencies, extras left out: what `pip install WHEEL` pulls."""
    found = []
    for line in _wheel_text(wheel, "METADATA").splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            found.append(line.split(":", 1)[1].strip())
    return found


def requirement_name(requirement: str) -> str:
    """`onnxruntime<2,>=1.17` -> `onnxruntime` (normalised: lower case, `_` -> `-`)."""
    match = re.match(r"[A-Za-z0-9_.-]+", requirement.strip())
    return match.group(0).lower().replace("_", "-") if match else ""


def wheel_digest(wheel: Path) -> str:
    """SHA-256 of the wheel's RECORD (a hash of every file in it): equal for equal
    contents, unlike the zip's bytes, which carry build times."""
    return hashlib.sha256(_wheel_text(wheel, "RECORD").encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# The probe: what runs on the device (and natively, for the reference). numpy + runtime.infer.


def probe(model: str | Path, frames: np.ndarray, threads: int = 1) -> dict[str, Any]:
    """Logits and greedy actions of `model` on every frame, one frame per call as a device
    would act, with per-action latency and this process's peak RSS."""
    t0 = time.perf_counter()
    from runtime.infer import Policy  # numpy + onnxruntime only

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
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _run_probe(args: argparse.Namespace) -> int:
    """--probe: write logits/actions to --out (npz), print the summary as one JSON line."""
    result = probe(args.model, load_frames(args.frames), threads=args.threads)
    np.savez(args.out, logits=result["logits"], actions=result["actions"])
    result["summary"].update(read_memory_kb())  # peak after the run
    print(json.dumps(result["summary"]))
    return 0


def bare_memory() -> dict[str, Any]:
    """--bare: an interpreter that imports nothing of ours; its peak RSS (the emulator's
    own footprint under qemu-user)."""
    return {"machine": platform.machine(), **read_memory_kb()}


# --------------------------------------------------------------------------------------------
# The frame set.


def record_frames(out: str | Path, count: int = 96, stride: int = 6, seed: int = 0,
                  env_id: str = "ALE/Breakout-v5") -> dict[str, Any]:
    """Play the default stream of `env_id` with seeded uniform random actions and keep one
    observation every `stride` agent steps (over several games) until `count`; writes a
    compressed npz (frames, steps, env_id, seed, stride). Returns a small summary."""
    from runtime.streams import make_stream

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
# The emulated device.


def _log(message: str) -> None:
    print(f"device_check: {message}", file=sys.stderr, flush=True)


# x86-64 syscalls that proot 5.1 (Debian bookworm's) does not know, so it would pass their
# path arguments through untranslated (the host's files, not the device's): statx,
# faccessat2 (glibc's access() tries it first), clone3. A seccomp filter makes them fail
# with ENOSYS for proot and everything it runs, and glibc and qemu fall back to the old,
# translated calls (fstatat, faccessat, clone).
_UNTRANSLATED_SYSCALLS = {"statx": 332, "clone3": 435, "faccessat2": 439}
_AUDIT_ARCH_X86_64 = 0xC000003E


def _seccomp_enosys() -> None:  # pragma: no cover - runs in the child before exec
    """preexec_fn: make the syscalls above return ENOSYS (x86-64 hosts only)."""
    ld_abs, jeq, ret = 0x20, 0x15, 0x06
    allow, enosys = 0x7FFF0000, 0x00050000 | 38
    nrs = list(_UNTRANSLATED_SYSCALLS.values())
    prog = [(ld_abs, 0, 0, 4), (jeq, 0, len(nrs) + 1, _AUDIT_ARCH_X86_64), (ld_abs, 0, 0, 0)]
    prog += [(jeq, len(nrs) - i, 0, nr) for i, nr in enumerate(nrs)]
    prog += [(ret, 0, 0, allow), (ret, 0, 0, enosys)]
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *p) for p in prog))

    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Fprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


class Device:
    """An arm64 Debian root file system under `directory`, entered with proot + qemu."""

    def __init__(self, directory: Path, mirror: str = DEFAULT_MIRROR,
                 cpu: str = DEFAULT_CPU) -> None:
        self.dir = directory
        self.cpu = cpu
        self.rootfs = directory / "rootfs"
        self.wheels = directory / "wheels"
        self.logs = directory / "logs"
        self.mirror = mirror
        self.marker = directory / "rootfs.json"

    # -- running things ---------------------------------------------------------------------
    def host(self, argv: Sequence[str], log_name: str, *, timeout: float = 3600,
             seccomp: bool = False, heartbeat: float = 60.0,
             env: dict[str, str] | None = None) -> tuple[int, str, str, int]:
        """Run argv on the host with stdout/stderr in logs/<log_name>.{out,err}; returns
        (rc, stdout, stderr, peak RSS in KiB of the process tree from wait4)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        out_path, err_path = self.logs / f"{log_name}.out", self.logs / f"{log_name}.err"
        preexec = _seccomp_enosys if seccomp and platform.machine() == "x86_64" else None
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env,
                                    stdin=subprocess.DEVNULL, preexec_fn=preexec)
            start = last_beat = time.monotonic()
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    break
                now = time.monotonic()
                if now - start > timeout:
                    proc.kill()
                    proc.wait()
                    raise DeviceCheckError(f"{log_name}: timed out after {timeout:.0f} s "
                                           f"(log: {err_path})")
                if now - last_beat >= heartbeat:
                    last_beat = now
                    _log(f"  ... {log_name}: {now - start:.0f} s, {_last_line(out_path, err_path)}")
                time.sleep(0.2)
        return (proc.returncode, out_path.read_text(errors="replace"),
                err_path.read_text(errors="replace"), int(usage.ru_maxrss))

    def guest(self, argv: Sequence[str], log_name: str, *, cwd: str = "/",
              binds: Sequence[tuple[Path, str]] = (), timeout: float = 3600,
              env: dict[str, str] | None = None) -> tuple[int, str, str, int]:
        """Run argv inside the device (proot -q qemu-aarch64-static, fake root), with a clean
        environment (proot hands its own to the guest)."""
        qemu = shutil.which(QEMU) or QEMU
        cmd = [shutil.which("proot") or "proot", "-q", f"{qemu} -cpu {self.cpu}", "-0",
               "-r", str(self.rootfs), "-b", "/dev", "-b", "/proc", "-b", "/sys",
               "-b", f"{self._cpuinfo()}:/proc/cpuinfo"]
        for host_path, guest_path in binds:
            cmd += ["-b", f"{host_path}:{guest_path}"]
        variables = {"PATH": DEVICE_PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        rc, out, err, maxrss = self.host([*cmd, "-w", cwd, *argv], log_name, timeout=timeout,
                                         seccomp=True, env=variables)
        # proot's exit status can miss a guest killed by a signal; qemu always says so.
        crash = [ln for ln in err.splitlines() if ln.startswith("qemu: uncaught target signal")]
        if crash and rc == 0:
            rc = 128 + int(crash[0].split("signal ")[1].split()[0])
        return rc, out, err, maxrss

    def _cpuinfo(self) -> Path:
        """A /proc/cpuinfo for the device. qemu 7.2 (bookworm) does not emulate it for
        aarch64 guests, and onnxruntime's cpuinfo library segfaults on the x86 host's."""
        path = self.dir / "cpuinfo"
        core = ("BogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
                "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
                "CPU part\t: 0xd08\nCPU revision\t: 3\n")  # Cortex-A72
        text = "\n".join(f"processor\t: {i}\n{core}" for i in range(os.cpu_count() or 1))
        if not path.is_file() or path.read_text() != text:
            self.dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return path

    def _must(self, result: tuple[int, str, str, int], what: str, log_name: str) -> str:
        rc, out, err, _ = result
        if rc != 0:
            tail = (err.strip() or out.strip() or "no output").splitlines()[-1][:200]
            raise DeviceCheckError(f"{what} failed (exit {rc}): {tail} (log: "
                                   f"{self.logs / log_name}.err)")
        return out

    # -- building ---------------------------------------------------------------------------
    def ensure_rootfs(self, rebuild: bool = False) -> dict[str, Any]:
        """debootstrap --foreign (host) + --second-stage (proot + qemu); reused when built."""
        wanted = {"suite": SUITE, "arch": DEB_ARCH, "packages": list(DEVICE_PACKAGES)}
        if not rebuild and self.marker.is_file() and self.rootfs.is_dir():
            with contextlib.suppress(ValueError):
                if {k: v for k, v in json.loads(self.marker.read_text()).items()
                        if k in wanted} == wanted:
                    _log(f"reusing the {SUITE} {DEB_ARCH} root file system in {self.rootfs}")
                    return {"reused": True, "seconds": 0.0}
        for tool, package in (("debootstrap", "debootstrap"), ("proot", "proot"),
                              (QEMU, "qemu-user-static")):
            if shutil.which(tool) is None:
                raise DeviceCheckError(f"{tool} not found: apt-get install debootstrap proot "
                                       f"qemu-user-static ({package} is missing)")
        if os.geteuid() != 0:
            raise DeviceCheckError("building the device root file system needs root "
                                   "(debootstrap creates device nodes and chowns files)")
        start = time.monotonic()
        self.marker.unlink(missing_ok=True)
        if self.rootfs.exists():
            _log(f"removing the unfinished root file system {self.rootfs}")
            shutil.rmtree(self.rootfs)
        self.rootfs.parent.mkdir(parents=True, exist_ok=True)
        _log(f"[build] debootstrap --foreign {SUITE} {DEB_ARCH} (host side, ~1 min) ...")
        self._must(self.host(["debootstrap", f"--arch={DEB_ARCH}", "--foreign",
                              "--variant=minbase", f"--include={','.join(DEVICE_PACKAGES)}",
                              SUITE, str(self.rootfs), self.mirror], "debootstrap-1"),
                   "debootstrap --foreign", "debootstrap-1")
        # debootstrap makes /proc a symlink to the host's /proc when it thinks it runs in a
        # container; proot's bind of /proc then loops. A plain directory it is.
        proc = self.rootfs / "proc"
        if proc.is_symlink():
            proc.unlink()
            proc.mkdir()
        stage1 = time.monotonic() - start
        _log(f"[build] stage 1 done in {stage1:.0f} s; debootstrap --second-stage under "
             f"emulation (many minutes) ...")
        self._must(self.guest(["/bin/sh", "/debootstrap/debootstrap", "--second-stage"],
                              "debootstrap-2", env={"DEBOOTSTRAP_DIR": "/debootstrap"}),
                   "debootstrap --second-stage", "debootstrap-2")
        rc, out, _, _ = self.guest(["/usr/bin/python3", "-c", "import platform; "
                                    "print(platform.machine(), platform.python_version())"],
                                   "python-version")
        if rc != 0 or not out.startswith("aarch64"):
            raise DeviceCheckError(f"the device's python3 does not run as aarch64 ({out!r})")
        seconds = time.monotonic() - start
        self.marker.write_text(json.dumps({**wanted, "python": out.split()[1],
                                           "build_seconds": round(seconds, 1),
                                           "mirror": self.mirror}))
        _log(f"[build] root file system ready in {seconds:.0f} s ({out.strip()})")
        return {"reused": False, "seconds": round(seconds, 1), "stage1_seconds": round(stage1, 1)}

    def ensure_wheels(self, wheel: Path) -> tuple[list[str], str]:
        """The project wheel and aarch64 cp311 wheels of its dependencies in one folder,
        as README "Device install" fetches them (pip download on the host). Dependencies
        are downloaded again only when the wheel's requirements change. Returns (wheel
        names, digest of the project wheel)."""
        required = wheel_requirements(wheel)
        forbidden = [r for r in required if requirement_name(r) in LEARNER_ONLY]
        if forbidden:
            raise DeviceCheckError(f"the wheel {wheel.name} requires {forbidden}")
        requirements = "\n".join(required) + "\n"
        stamp = self.wheels / ".requirements.sha256"
        req_digest = hashlib.sha256(requirements.encode()).hexdigest()
        if stamp.is_file() and stamp.read_text() == req_digest:
            _log(f"reusing the aarch64 dependency wheels in {self.wheels}")
        else:
            if self.wheels.exists():
                shutil.rmtree(self.wheels)
            self.wheels.mkdir(parents=True)
            _log(f"[build] pip download: aarch64 wheels for the dependencies of {wheel.name} ...")
            (self.wheels / "requirements.txt").write_text(requirements)
            cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:",
                   "--disable-pip-version-check", "--python-version", DEVICE_PYTHON_VERSION,
                   "-r", str(self.wheels / "requirements.txt"), "-d", str(self.wheels)]
            for plat in WHEEL_PLATFORMS:
                cmd += ["--platform", plat]
            self._must(self.host(cmd, "pip-download", timeout=1800), "pip download",
                       "pip-download")
            stamp.write_text(req_digest)
        project = PROJECT.replace("-", "_")
        for old in self.wheels.glob(f"{project}-*.whl"):
            old.unlink()
        shutil.copy2(wheel, self.wheels / wheel.name)
        names = sorted(p.name for p in self.wheels.glob("*.whl"))
        heavy = [n for n in names if requirement_name(n.split("-")[0]) in LEARNER_ONLY]
        if heavy:
            raise DeviceCheckError(f"the device wheels must not include {heavy}")
        return names, wheel_digest(wheel)

    def ensure_venv(self, wheel_name: str, digest: str) -> dict[str, Any]:
        """python3 -m venv + pip install --no-index --find-links of the project wheel (and
        so its dependencies) inside the device; reused while the wheel's contents match."""
        venv = self.rootfs / VENV.lstrip("/")
        stamp = venv / ".wheel.sha256"
        if stamp.is_file() and stamp.read_text() == digest:
            _log(f"reusing the device venv {VENV}")
            return {"reused": True, "seconds": 0.0}
        if venv.exists():
            shutil.rmtree(venv)
        start = time.monotonic()
        _log(f"[build] device venv {VENV} + offline pip install (minutes under emulation) ...")
        self._must(self.guest(["/usr/bin/python3", "-m", "venv", VENV], "venv"), "python3 -m venv",
                   "venv")
        self._must(self.guest(device_install_argv(wheel_name), "pip-install",
                              binds=[(self.wheels, WHEELS)]),
                   "pip install (device)", "pip-install")
        stamp.write_text(digest)
        seconds = time.monotonic() - start
        _log(f"[build] device venv ready in {seconds:.0f} s")
        return {"reused": False, "seconds": round(seconds, 1)}

    def stage_app(self, models: Sequence[Path], frames: Path) -> dict[str, str]:
        """Copy this probe, the models and the frames into APP (replacing what was there):
        data only, the runtime comes from the installed wheel. Returns host model path ->
        device path."""
        app = self.rootfs / APP.lstrip("/")
        if app.exists():
            shutil.rmtree(app)
        (app / "model").mkdir(parents=True)
        (app / "out").mkdir()
        shutil.copy2(Path(__file__), app / "device_probe.py")
        shutil.copy2(frames, app / "frames.npz")
        placed = {}
        for model in models:
            shutil.copy2(model, app / "model" / model.name)
            placed[str(model)] = f"model/{model.name}"
        return placed

    def device_python(self, argv: Sequence[str], log_name: str, timeout: float
                      ) -> tuple[int, str, str, int]:
        return self.guest([f"{VENV}/bin/python", *argv], log_name, cwd=APP, timeout=timeout)

    def out_dir(self) -> Path:
        return self.rootfs / APP.lstrip("/") / "out"


def _last_line(*paths: Path) -> str:
    for path in paths:
        with contextlib.suppress(OSError):
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
            if lines:
                return lines[-1][:120]
    return "no output yet"


def _json_line(text: str, what: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    raise DeviceCheckError(f"{what} printed no JSON summary")


def _native(argv: Sequence[str], what: str, timeout: float = 600) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, text=True, capture_output=True,
                          timeout=timeout, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip() or "no output").splitlines()[-1][:200]
        raise DeviceCheckError(f"{what} failed natively (exit {done.returncode}): {tail}")
    return _json_line(done.stdout, what)


def native_probe(model: Path, frames_path: Path, out: Path) -> tuple[dict[str, Any], dict]:
    """The probe as its own native process (a fair peak RSS): (summary, {logits, actions})."""
    summary = _native([str(Path(__file__).resolve()), "--probe", "--model", str(model),
                       "--frames", str(frames_path), "--out", str(out)], "probe")
    with np.load(out) as data:
        return summary, {"logits": data["logits"], "actions": data["actions"]}


def int8_sibling(model: Path) -> Path | None:
    sibling = model.with_name(model.name.removesuffix(".onnx") + ".int8.onnx")
    return sibling if sibling != model and sibling.is_file() else None


def device_install_argv(wheel_name: str) -> list[str]:
    """The offline install on the device, as README "Device install" gives it."""
    return [f"{VENV}/bin/python", "-m", "pip", "install", "--no-index", "--find-links", WHEELS,
            "--no-compile", "--disable-pip-version-check", f"{WHEELS}/{wheel_name}"]


def _game_argv(model: str, games: int, max_steps: int | None) -> list[str]:
    argv = ["-m", "runtime.infer", "--model", model, "--episodes", str(games), "--seed", "0"]
    return argv + (["--max-steps", str(max_steps)] if max_steps else [])


def _compact(summary: dict[str, Any], drop: Sequence[str] = ("model",)) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in drop}


def run_check(args: argparse.Namespace) -> dict[str, Any]:
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
    _log(f"native ({platform.machine()}) reference: probe and {args.games} game(s) ...")
    work = device_dir / "native"
    work.mkdir(parents=True, exist_ok=True)
    native = {m: native_probe(m, frames_path, work / f"{m.name}.npz") for m in models}
    native_game = _native(_game_argv(str(model), args.games, args.max_steps), "runtime.infer",
                          timeout=3600)
    native_bare = _native([str(Path(__file__).resolve()), "--bare"], "bare python")

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
    dmodel = placed[str(model)]
    _log(f"[device] playing {args.games} game(s): python -m runtime.infer (slow: emulated) ...")
    t0 = time.monotonic()
    rc, out, err, game_maxrss = device.device_python(
        _game_argv(dmodel, args.games, args.max_steps), "device-game", timeout=args.timeout)
    device._must((rc, out, err, game_maxrss), "python -m runtime.infer (device)",
                 "device-game")
    game = _json_line(out, "runtime.infer (device)")
    game_seconds = time.monotonic() - t0
    _log(f"[device] game done in {game_seconds:.0f} s: {json.dumps(_compact(game))}")

    dev: dict[Path, tuple[dict[str, Any], dict]] = {}
    for m in models:
        _log(f"[device] probe {m.name} on {len(frames)} frames ...")
        name = f"{m.name}.npz"
        got = device.device_python(["device_probe.py", "--probe", "--model", placed[str(m)],
                                    "--frames", "frames.npz", "--out", f"out/{name}"],
                                   f"device-probe-{m.name}", timeout=args.timeout)
        summary = _json_line(device._must(got, f"probe {m.name} (device)",
                                          f"device-probe-{m.name}"), "probe (device)")
        summary["host_maxrss_kb"] = got[3]
        with np.load(device.out_dir() / name) as data:
            dev[m] = (summary, {"logits": data["logits"], "actions": data["actions"]})
    got = device.device_python(["device_probe.py", "--bare"], "device-bare", timeout=600)
    device_bare = _json_line(device._must(got, "bare python (device)", "device-bare"),
                             "bare python (device)")
    device_bare["host_maxrss_kb"] = got[3]
    check_seconds = time.monotonic() - check_start

    # (b) parity: float model, aarch64 vs x86.
    dsum, dout = dev[model]
    nsum, nout = native[model]
    parity = compare_logits(nout["logits"], dout["logits"], MIN_AGREEMENT)
    parity["graph_actions_agree"] = float(np.mean(nout["actions"] == dout["actions"]))
    same_trajectory = (game.get("returns") == native_game.get("returns")
                       and game.get("steps") == native_game.get("steps"))
    result.update({
        "device": {"machine": dsum["machine"], "python": dsum["python"],
                   "numpy": dsum["numpy"], "onnxruntime": dsum["onnxruntime"],
                   "torch_installed": dsum["torch_installed"],
                   "onnx_installed": dsum["onnx_installed"],
                   "emulation": f"proot -q '{QEMU} -cpu {args.cpu}', {SUITE} {DEB_ARCH}"},
        "game": {"device": _compact(game), "native": _compact(native_game),
                 "same_trajectory": same_trajectory, "device_seconds": round(game_seconds, 1)},
        "parity": parity,
        "latency_us": {"device": _pick(dsum, "latency_us"), "native": _pick(nsum, "latency_us")},
        "memory_kb": {
            "device_probe_vmhwm": dsum["vmhwm_kb"],
            "device_probe_host_maxrss": dsum["host_maxrss_kb"],
            "device_bare_python_vmhwm": device_bare["vmhwm_kb"],
            "device_game_host_maxrss": game_maxrss,
            "native_probe_vmhwm": nsum["vmhwm_kb"],
            "native_bare_python_vmhwm": native_bare["vmhwm_kb"],
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

    # (3) the int8 sibling, on the device: vs the float model there, and vs itself on x86.
    if int8 is not None:
        isum, iout = dev[int8]
        vs_float = compare_logits(dout["logits"], iout["logits"], INT8_MIN_AGREEMENT)
        cross = compare_logits(native[int8][1]["logits"], iout["logits"], MIN_AGREEMENT)
        result["int8"] = {
            "model": str(int8),
            "vs_float_on_device": vs_float,
            "vs_x86": {k: cross[k] for k in ("action_agreement", "max_abs_logit_diff",
                                             "disagreeing_frames", "passed")},
            "size_bytes": {"float": dsum["size_bytes"], "int8": isum["size_bytes"]},
            "device_latency_us_p50": {"float": dsum["latency_us_p50"],
                                      "int8": isum["latency_us_p50"]},
            "native_latency_us_p50": {"float": nsum["latency_us_p50"],
                                      "int8": native[int8][0]["latency_us_p50"]},
            "device_vmhwm_kb": {"float": dsum["vmhwm_kb"], "int8": isum["vmhwm_kb"]},
        }
        if not vs_float["passed"]:
            failures.append(f"int8 vs float on the device: {vs_float['action_agreement']:.2%}"
                            f" below {INT8_MIN_AGREEMENT:.0%}")
    else:
        result["int8"] = None
    result["durations_s"] = {"native": round(build_start - started, 1),
                             "build": round(build_seconds, 1),
                             "check": round(check_seconds, 1),
                             "total": round(time.monotonic() - started, 1)}
    result["passed"] = not failures
    result["failures"] = failures
    return result


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
    mode.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=positive_int, default=1, help=argparse.SUPPRESS)
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
    args = parser.parse_args(argv)
    if args.probe and not (args.model and args.out):
        raise UsageError("--probe needs --model and --out")
    return args


def main(argv: list[str] | None = None, run: Callable[..., dict] = run_check) -> int:
    try:
        args = parse_args(argv)
        if args.bare:
            print(json.dumps(bare_memory()))
            return 0
        if args.probe:
            return _run_probe(args)
        if args.record_frames:
            print(json.dumps(record_frames(args.record_frames, args.count, args.stride,
                                           args.seed)))
            return 0
        result = run(args)
    except UsageError as exc:
        print(f"device_check: error: {exc}", file=sys.stderr)
        return 2
    except DeviceCheckError as exc:
        print(f"device_check: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        print(f"device_check: error: {type(exc).__name__}: {first_line(exc, 300)}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    if not result["passed"]:
        print(f"device_check: error: {'; '.join(result['failures'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
