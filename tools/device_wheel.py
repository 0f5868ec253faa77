"""The project's wheel, as a device installs it (README "Device install"): built from the
checkout, read for its requirements and a digest of its contents. Standard library only.

tools/device_check.py puts it on the emulated device; the tests install it in a venv
without torch (tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tools import ROOT
from tools.device_probe import DeviceCheckError

# What a wheel of the project is built from (a copy, so the tree gets no build/ litter):
# all that `pip wheel .` in a checkout reads, tools included, which the wheel leaves out.
WHEEL_SOURCES = ("pyproject.toml", "setup.py", "README.md", "agent", "runtime", "tools")
PROJECT = "stream-agent-runtime"
WHEEL_PREFIX = PROJECT.replace("-", "_")  # what its wheel files are called: NAME-VERSION-...
LEARNER_ONLY = ("torch", "onnx", "onnxscript")  # never on a device


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
    pattern = f"{WHEEL_PREFIX}-*.whl"
    built = sorted(set(dest.glob(pattern)) - before) or sorted(dest.glob(pattern))
    if not built:
        raise DeviceCheckError(f"pip wheel wrote no {pattern} into {dest}")
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
