"""The emulated aarch64 device of tools/device_check.py: a Debian bookworm arm64 root file
system under a directory of the host, made with ``debootstrap --arch=arm64 --foreign`` and
finished inside ``proot -q qemu-aarch64-static`` (no binfmt, no privileged container, but
root on the host for debootstrap, and the Debian packages debootstrap, proot and
qemu-user-static), then given the project as README "Device install" says: the wheel, its
dependencies downloaded on the host as aarch64 wheels, ``pip install --no-index
--find-links`` into a venv of bookworm's python3.11. Each step is reused while what it was
made from is unchanged.

Two workarounds make bookworm's proot 5.1 + qemu 7.2 work: a seccomp filter turns the
syscalls proot 5.1 does not translate (statx, faccessat2, clone3) into ENOSYS so glibc and
qemu fall back to ones it does; and a Cortex-A72 /proc/cpuinfo is bound over the host's,
which qemu 7.2 passes through and onnxruntime's cpuinfo library crashes on.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools import device_probe
from tools.device_probe import DeviceCheckError
from tools.device_wheel import (
    LEARNER_ONLY,
    WHEEL_PREFIX,
    requirement_name,
    wheel_digest,
    wheel_requirements,
)

DEFAULT_DEVICE_DIR = Path("~/.cache/stream-agent/aarch64-bookworm")
PROBE = Path(device_probe.__file__).resolve()  # the one file of tools/ a device gets
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


def log(message: str) -> None:
    """Progress, on stderr: the command's one JSON object is stdout's only line."""
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
                    log(f"  ... {log_name}: {now - start:.0f} s, {_last_line(out_path, err_path)}")
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

    def must(self, result: tuple[int, str, str, int], what: str, log_name: str) -> str:
        """The stdout of a finished command (host or guest); one line naming its log when
        it failed."""
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
                    log(f"reusing the {SUITE} {DEB_ARCH} root file system in {self.rootfs}")
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
            log(f"removing the unfinished root file system {self.rootfs}")
            shutil.rmtree(self.rootfs)
        self.rootfs.parent.mkdir(parents=True, exist_ok=True)
        log(f"[build] debootstrap --foreign {SUITE} {DEB_ARCH} (host side, ~1 min) ...")
        self.must(self.host(["debootstrap", f"--arch={DEB_ARCH}", "--foreign",
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
        log(f"[build] stage 1 done in {stage1:.0f} s; debootstrap --second-stage under "
             f"emulation (many minutes) ...")
        self.must(self.guest(["/bin/sh", "/debootstrap/debootstrap", "--second-stage"],
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
        log(f"[build] root file system ready in {seconds:.0f} s ({out.strip()})")
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
            log(f"reusing the aarch64 dependency wheels in {self.wheels}")
        else:
            if self.wheels.exists():
                shutil.rmtree(self.wheels)
            self.wheels.mkdir(parents=True)
            log(f"[build] pip download: aarch64 wheels for the dependencies of {wheel.name} ...")
            (self.wheels / "requirements.txt").write_text(requirements)
            cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:",
                   "--disable-pip-version-check", "--python-version", DEVICE_PYTHON_VERSION,
                   "-r", str(self.wheels / "requirements.txt"), "-d", str(self.wheels)]
            for plat in WHEEL_PLATFORMS:
                cmd += ["--platform", plat]
            self.must(self.host(cmd, "pip-download", timeout=1800), "pip download",
                      "pip-download")
            stamp.write_text(req_digest)
        for old in self.wheels.glob(f"{WHEEL_PREFIX}-*.whl"):
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
            log(f"reusing the device venv {VENV}")
            return {"reused": True, "seconds": 0.0}
        if venv.exists():
            shutil.rmtree(venv)
        start = time.monotonic()
        log(f"[build] device venv {VENV} + offline pip install (minutes under emulation) ...")
        self.must(self.guest(["/usr/bin/python3", "-m", "venv", VENV], "venv"), "python3 -m venv",
                  "venv")
        self.must(self.guest(device_install_argv(wheel_name), "pip-install",
                             binds=[(self.wheels, WHEELS)]),
                  "pip install (device)", "pip-install")
        stamp.write_text(digest)
        seconds = time.monotonic() - start
        log(f"[build] device venv ready in {seconds:.0f} s")
        return {"reused": False, "seconds": round(seconds, 1)}

    def stage_app(self, models: Sequence[Path], frames: Path) -> dict[str, str]:
        """Copy the probe (tools/device_probe.py, one file), the models and the frames into
        APP (replacing what was there): the runtime comes from the installed wheel. Returns
        host model path -> device path."""
        app = self.rootfs / APP.lstrip("/")
        if app.exists():
            shutil.rmtree(app)
        (app / "model").mkdir(parents=True)
        (app / "out").mkdir()
        shutil.copy2(PROBE, app / "device_probe.py")
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


def device_install_argv(wheel_name: str) -> list[str]:
    """The offline install on the device, as README "Device install" gives it."""
    return [f"{VENV}/bin/python", "-m", "pip", "install", "--no-index", "--find-links", WHEELS,
            "--no-compile", "--disable-pip-version-check", f"{WHEELS}/{wheel_name}"]

