"""Shared helpers: run the daemon (and other CLIs) as real subprocesses."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = ["--set", "env.id=CartPole-v1"]


def cli(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args` from the repository root; returns the finished process."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env=_env())


def load_tool(name: str) -> ModuleType:
    """Import tools/<name>.py as a module (tools/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_daemon(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "runtime.daemon", *args], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


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
