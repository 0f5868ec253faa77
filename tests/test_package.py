"""The two installs: the device's wheel (agent and runtime, installed without torch) plays
from anywhere; the editable checkout runs its tools from anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import CARTPOLE, DEVICE_DEPENDENCIES, LEARNER_ONLY, ROOT, _env, cli, device_run
from tools import device_wheel


def test_the_wheel_pulls_no_learner(device_venv: dict) -> None:
    required = {device_wheel.requirement_name(r)
                for r in device_wheel.wheel_requirements(device_venv["wheel"])}
    assert required == DEVICE_DEPENDENCIES
    assert not set(device_venv["dependencies"]) & set(LEARNER_ONLY)
    assert not (ROOT / "requirements-device.txt").exists()  # the wheel replaces it


def test_the_wheel_leaves_the_tools_out(device_venv: dict) -> None:
    """device_wheel.build_wheel reads pyproject.toml, setup.py and the tools too, as
    `pip wheel .` in a checkout does; only agent and runtime go in (setup.py says why)."""
    with zipfile.ZipFile(device_venv["wheel"]) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
    assert {name for name in top if not name.endswith(".dist-info")} == {"agent", "runtime"}
    assert not (device_venv["purelib"] / "tools").exists()


def test_tools_run_as_scripts_from_anywhere(tmp_path: Path) -> None:
    """`python tools/research/sweep.py` puts tools/research/, not the checkout, first on
    sys.path: its `from tools import ...` resolves through the editable install, from any
    directory."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "research" / "sweep.py"), "--help"],
                          cwd=tmp_path, text=True, capture_output=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: sweep")


def test_installed_wheel_plays_outside_the_repository(device_venv: dict,
                                                      tmp_path: Path) -> None:
    run_dir, model = tmp_path / "run", tmp_path / "cartpole.onnx"
    done = cli("runtime.daemon", "--config", "config.yaml", "--run-dir", str(run_dir),
               "--max-steps", "200", *CARTPOLE)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "export_onnx.py"), "--run-dir",
                           str(run_dir), "--out", str(model)], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
    elsewhere = tmp_path / "device"
    elsewhere.mkdir()
    probe = device_run(device_venv, "-c", (
        "import importlib, json, runtime\n"
        "def fails(name):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        return True\n"
        "    return False\n"
        "print(json.dumps({'runtime': runtime.__file__, 'torch': fails('torch'),\n"
        "                  'daemon': fails('runtime.daemon.lifecycle')}))\n"), cwd=elsewhere)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["runtime"].startswith(str(device_venv["purelib"]))
    assert found["torch"] and found["daemon"]  # the learner cannot run here
    done = device_run(device_venv, "-m", "runtime.infer", "--model", str(model), "--games",
                      "2", "--seed", "3", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["games"] == 2 and summary["env_id"] == "CartPole-v1"
    assert summary["steps"] == sum(summary["returns"]) > 0
