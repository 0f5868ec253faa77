"""Shared helpers: run the daemon (and other CLIs) as real subprocesses."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.device.keys import Signer, new_key_pair
from tools import device_wheel
from tools.device_wheel import LEARNER_ONLY

# Every learner in the tests, in this process and in the daemons it starts, runs its update
# eagerly (agent.compile: auto honours torch's own switch): compiling costs seconds per
# configuration and the tests use dozens. tests/test_compiled.py turns it back on.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = ["--set", "env.id=CartPole-v1"]
# The daemons the tests start publish no final policy at their stop (an export costs
# seconds, and dozens of daemons stop); a test about it sets export.on_stop=true after this.
NO_FINAL_POLICY = ["--set", "export.on_stop=false"]
# What the wheel's base install pulls onto a device: the device runtime and nothing of the
# learner (torch, onnx).
DEVICE_DEPENDENCIES = {"numpy", "onnxruntime", "pyyaml", "gymnasium", "ale-py",
                       "prometheus-client", "cryptography"}


def cli(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args` from the repository root; returns the finished process."""
    if module == "runtime.daemon":
        args = (*NO_FINAL_POLICY, *args)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env=_env())


def start_daemon(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "runtime.daemon", *NO_FINAL_POLICY, *args],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, an error status included: what a scraper sees."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_for_status(run_dir: Path, min_step: int, timeout: float = 60) -> dict:
    """Poll status.json until its step reaches min_step."""
    deadline = time.monotonic() + timeout
    path = run_dir / "status.json"
    while time.monotonic() < deadline:
        if path.exists():
            status = json.loads(path.read_text())
            if status["step"] >= min_step:
                return status
        time.sleep(0.05)
    raise AssertionError(f"status.json never reached step {min_step}")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


# -- the device install: the project's wheel in a fresh venv without torch ---------------------

def _dependency_closure(requirements: list[str]) -> list:
    """The installed distributions (importlib.metadata) that `requirements` pull,
    transitively, extras and non-matching markers left out."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    found, todo = {}, list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue  # pip install --no-index reports it below
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key not in found:
            found[key] = dist
            todo.extend(dist.requires or [])
    return list(found.values())


def make_device_venv(base: Path) -> dict:
    """Build the wheel (tools.device_wheel.build_wheel), make a venv without pip, give it
    the wheel's dependencies from this environment (symlinks of exactly their files, so
    torch is not among them) and `pip install --no-index` the wheel into it, as a device
    installs it offline. `torch` and `onnx` in it raise on import, to be sure."""
    wheel = device_wheel.build_wheel(base / "dist")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig."
                                   "get_path('purelib'))"], check=True, text=True,
                                  capture_output=True).stdout.strip())
    deps = base / "deps"
    deps.mkdir()
    closure = _dependency_closure(device_wheel.wheel_requirements(wheel))
    for dist in closure:
        for top in {f.parts[0] for f in dist.files or ()} - {"..", "__pycache__"}:
            if not (deps / top).exists():
                (deps / top).symlink_to(dist.locate_file(top))
    (purelib / "deps.pth").write_text(f"{deps}\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                           "--no-index", "--disable-pip-version-check", "-q", str(wheel)],
                          text=True, capture_output=True, env=_device_env())
    assert done.returncode == 0, done.stderr
    for name in LEARNER_ONLY:
        (purelib / name).mkdir()
        (purelib / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not available on this device')\n")
    return {"python": python, "wheel": wheel, "purelib": purelib,
            "dependencies": sorted(d.metadata["Name"].lower() for d in closure)}


def _device_env() -> dict[str, str]:
    """The environment of a device process: nothing of this repository on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env


@pytest.fixture(scope="session")
def device_venv(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_device_venv(tmp_path_factory.mktemp("device-install"))


def device_run(venv: dict, *args: str, cwd: Path, timeout: float = 120
               ) -> subprocess.CompletedProcess[str]:
    """`python args` with the device venv's interpreter, from `cwd` (outside the repo)."""
    return subprocess.run([str(venv["python"]), *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, env=_device_env())


@pytest.fixture
def one_torch_thread() -> object:
    """One torch thread, as the daemon runs (two spin against each other on a busy box)."""
    import torch  # only the tests that ask for this fixture need torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A signing key, as `policy.key` in the test's directory, readable by its owner only."""
    path = tmp_path / "policy.key"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path



@dataclass(frozen=True)
class KeyPair:
    """An Ed25519 pair as `python -m runtime.keys new NAME` makes it: the learner's private
    key file, the devices' public key file, its key id, and a signer of the private key."""

    private: Path
    public: Path
    key_id: str
    signer: Signer


def make_key_pair(directory: Path, name: str = "fleet") -> KeyPair:
    private, public, key_id = new_key_pair(directory / name)
    return KeyPair(private, public, key_id, Signer.from_file(private))


@pytest.fixture
def fleet(tmp_path: Path) -> KeyPair:
    """The learner's Ed25519 pair, fleet.key (mode 0600) and fleet.pub, in the test's
    directory."""
    return make_key_pair(tmp_path)
