"""tools/device_check.py without the emulator: parity logic, the recorded frame set, the
probe (tools/device_probe.py) on an exported model, how the wheel gets onto the device
(tools/device_emulator.py, tools/device_wheel.py), and the whole check with a device that is
a directory of this machine. The emulated run itself takes minutes and runs only with
RUN_DEVICE_CHECK=1."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEVICE_DEPENDENCIES, ROOT, _device_env, _env, cli
from tools import device_check as dc
from tools import device_emulator as emulator
from tools import device_probe, device_wheel

TOOL = ROOT / "tools" / "device_check.py"
PROBE = ROOT / "tools" / "device_probe.py"
FRAMES = ROOT / "tests" / "data" / "breakout_frames.npz"


def _tool(*args: str, timeout: float = 300, tool: Path = TOOL
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(tool), *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 100-step Breakout checkpoint exported to ONNX (made once)."""
    base = tmp_path_factory.mktemp("device")
    done = cli("runtime.daemon", "--config", "config.yaml", "--run-dir", str(base / "run"),
               "--max-steps", "100", "--set", "checkpoint.every_steps=100000")
    assert done.returncode == 0, done.stderr
    out = base / "policy.onnx"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "export_onnx.py"), "--run-dir",
                           str(base / "run"), "--out", str(out)], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr
    return out


# -- parity logic ----------------------------------------------------------------------------

def _logits(n: int = 96, actions: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, actions)).astype(np.float32)


def test_identical_logits_agree_fully() -> None:
    ref = _logits()
    result = dc.compare_logits(ref, ref.copy())
    assert result["action_agreement"] == 1.0
    assert result["max_abs_logit_diff"] == 0.0
    assert result["passed"] and result["disagreeing_frames"] == []
    assert result["frames"] == 96


def test_small_noise_keeps_actions_and_reports_the_difference() -> None:
    ref = _logits()
    noisy = ref + np.float32(3e-7) * np.sign(_logits(seed=1))
    result = dc.compare_logits(ref, noisy)
    assert result["passed"] and result["action_agreement"] == 1.0
    assert 2e-7 < result["max_abs_logit_diff"] < 4e-7


def test_a_flipped_argmax_is_detected() -> None:
    ref = _logits()
    cand = ref.copy()
    best = int(ref[17].argmax())
    cand[17, (best + 1) % 4] = ref[17, best] + 1.0  # another action now wins frame 17
    result = dc.compare_logits(ref, cand)
    assert result["disagreeing_frames"] == [17]
    assert result["action_agreement"] == pytest.approx(95 / 96)
    assert not result["passed"]  # 98.96% < 99.9%
    assert result["max_abs_logit_diff"] > 0.5


def test_threshold_is_enforced_inclusively() -> None:
    ref = _logits(n=1000)
    for flips, passed in ((0, True), (1, True), (2, False)):
        cand = ref.copy()
        for i in range(flips):
            cand[i] = ref[i][::-1] if ref[i].argmax() != ref[i][::-1].argmax() else -ref[i]
        result = dc.compare_logits(ref, cand)
        assert result["action_agreement"] == pytest.approx(1 - flips / 1000)
        assert result["passed"] is passed, (flips, result)
    # The int8 bar is an argument: 96% passes at 0.95, not at 0.97.
    cand = ref.copy()
    cand[:40] = -ref[:40]
    agreement = dc.compare_logits(ref, cand)["action_agreement"]
    assert agreement == pytest.approx(0.96)
    assert dc.compare_logits(ref, cand, 0.95)["passed"]
    assert not dc.compare_logits(ref, cand, 0.97)["passed"]


def test_non_finite_or_mismatched_logits() -> None:
    ref = _logits()
    bad = ref.copy()
    bad[3, 0] = np.nan
    result = dc.compare_logits(ref, bad)
    assert not result["passed"] and result["max_abs_logit_diff"] is None
    with pytest.raises(ValueError, match="one shape"):
        dc.compare_logits(ref, ref[:-1])
    with pytest.raises(ValueError, match="one shape"):
        dc.compare_logits(ref[0], ref[0])
    with pytest.raises(ValueError, match="min_agreement"):
        dc.compare_logits(ref, ref, 1.5)


# -- the frame set ---------------------------------------------------------------------------

def test_frame_set_shape_and_dtype() -> None:
    frames = device_probe.load_frames(FRAMES)
    assert frames.dtype == np.uint8
    assert frames.shape[1:] == (4, 84, 84) and 64 <= frames.shape[0] <= 128
    assert FRAMES.stat().st_size < 200_000


def test_frame_set_is_real_breakout_not_noise() -> None:
    frames = device_probe.load_frames(FRAMES)
    # Mostly the black background...
    assert np.bincount(frames.ravel(), minlength=256).argmax() == 0
    assert (frames == 0).mean() > 0.5
    # ... the four frames of a stack nearly identical (noise would not correlate) ...
    flat = frames.astype(np.float64)
    assert np.corrcoef(flat[:, 0].ravel(), flat[:, 3].ravel())[0, 1] > 0.9
    assert np.abs(np.diff(flat, axis=1)).mean() < 5
    # ... yet the observations differ from one another (the ball, the paddle, the bricks).
    assert len({f.tobytes() for f in frames}) == len(frames)
    with np.load(FRAMES) as data:
        steps = data["steps"]
        assert str(data["env_id"]) == "ALE/Breakout-v5"
    assert len(steps) == len(frames) and steps[-1] - steps[0] >= 300  # spread over games


def test_frame_set_regenerates_identically(tmp_path: Path) -> None:
    """--record-frames with the recorded seed and stride gives the same leading frames."""
    with np.load(FRAMES) as data:
        seed, stride = int(data["seed"]), int(data["stride"])
        frames = data["frames"]
    done = _tool("--record-frames", str(tmp_path / "f.npz"), "--count", "8",
                 "--stride", str(stride), "--seed", str(seed))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["frames"] == 8 and summary["shape"] == [8, 4, 84, 84]
    np.testing.assert_array_equal(device_probe.load_frames(tmp_path / "f.npz"), frames[:8])


def test_bad_frame_files_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "nokey.npz", other=np.zeros((2, 4, 84, 84), np.uint8))
    np.savez(tmp_path / "float.npz", frames=np.zeros((2, 4, 84, 84), np.float32))
    (tmp_path / "junk.npz").write_text("not a zip")
    for name, match in (("nokey", "no 'frames'"), ("float", "uint8"),
                        ("junk", "not a readable"), ("missing", "not a readable")):
        with pytest.raises(device_probe.DeviceCheckError, match=match):
            device_probe.load_frames(tmp_path / f"{name}.npz")


# -- the native side of the check ------------------------------------------------------------

def test_probe_on_an_exported_model(exported: Path) -> None:
    frames = device_probe.load_frames(FRAMES)
    result = device_probe.probe(exported, frames)
    logits, actions, summary = result["logits"], result["actions"], result["summary"]
    assert logits.shape == (len(frames), 4) and logits.dtype == np.float32
    np.testing.assert_array_equal(actions, logits.argmax(axis=1))
    assert summary["graph_action_is_argmax"]
    assert summary["size_bytes"] == exported.stat().st_size
    assert summary["latency_us_p50"] > 0
    assert dc.compare_logits(logits, device_probe.probe(exported, frames)["logits"])["passed"]


def test_native_probe_process_is_torch_free(exported: Path, tmp_path: Path) -> None:
    """The probe as the device runs it (its own process): no torch imported, a peak RSS."""
    summary, arrays = dc.native_probe(exported, FRAMES, tmp_path / "probe.npz")
    assert summary["machine"] == platform.machine()
    assert summary["torch_imported"] is False
    assert summary["vmhwm_kb"] and summary["vmhwm_kb"] >= summary["vmrss_kb"] > 0
    assert arrays["logits"].shape == (summary["frames"], 4)
    bare = json.loads(_tool("--bare", tool=PROBE).stdout)
    assert 0 < bare["vmhwm_kb"] < summary["vmhwm_kb"]


def test_int8_sibling_lookup(tmp_path: Path) -> None:
    model = tmp_path / "policy.onnx"
    model.write_bytes(b"x")
    assert dc.int8_sibling(model) is None
    (tmp_path / "policy.int8.onnx").write_bytes(b"y")
    assert dc.int8_sibling(model) == tmp_path / "policy.int8.onnx"


def test_only_data_is_copied_in(tmp_path: Path) -> None:
    """The runtime comes from the installed wheel: no source file is copied onto the device."""
    device = emulator.Device(tmp_path / "dev")
    model = tmp_path / "policy.onnx"
    model.write_bytes(b"onnx")
    placed = device.stage_app([model], FRAMES)
    app = device.rootfs / emulator.APP.lstrip("/")
    files = sorted(str(p.relative_to(app)) for p in app.rglob("*") if p.is_file())
    assert files == ["device_probe.py", "frames.npz", "model/policy.onnx"]
    assert placed == {str(model): "model/policy.onnx"}


def test_the_device_gets_the_wheel_and_its_aarch64_dependencies(tmp_path: Path) -> None:
    """ensure_wheels downloads (pip, host) the wheel's own requirements for aarch64 once,
    puts the project wheel beside them, and the device installs that wheel offline."""
    wheel = device_wheel.build_wheel(tmp_path / "dist")
    device = emulator.Device(tmp_path / "dev")
    calls: list[list[str]] = []

    def fake_host(argv, log_name, **_kw):  # noqa: ANN001, ANN202 - stands in for pip download
        calls.append(list(argv))
        dest = Path(argv[argv.index("-d") + 1])
        (dest / "numpy-2.0.0-cp311-cp311-manylinux_2_28_aarch64.whl").write_bytes(b"w")
        return 0, "", "", 1

    device.host = fake_host
    names, digest = device.ensure_wheels(wheel)
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"] == \
        list(emulator.WHEEL_PLATFORMS)
    assert cmd[cmd.index("--python-version") + 1] == "3.11"
    requirements = (device.wheels / "requirements.txt").read_text().split()
    assert {device_wheel.requirement_name(r) for r in requirements} == DEVICE_DEPENDENCIES
    assert wheel.name in names and digest == device_wheel.wheel_digest(wheel)
    assert device.ensure_wheels(wheel)[1] == digest and len(calls) == 1  # reused
    rebuilt = device_wheel.build_wheel(tmp_path / "dist2")
    # same sources, same digest, whatever the time
    assert device_wheel.wheel_digest(rebuilt) == digest
    argv = emulator.device_install_argv(wheel.name)
    assert argv[:4] == [f"{emulator.VENV}/bin/python", "-m", "pip", "install"]
    assert "--no-index" in argv and argv[argv.index("--find-links") + 1] == emulator.WHEELS
    assert argv[-1] == f"{emulator.WHEELS}/{wheel.name}"


def test_a_wheel_that_requires_torch_is_refused(tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "stream_agent_runtime-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("stream_agent_runtime-0.1.0.dist-info/METADATA",
                         "Name: stream-agent-runtime\nRequires-Dist: numpy<3\n"
                         "Requires-Dist: torch>=2.4\n"
                         "Requires-Dist: pytest; extra == \"dev\"\n")
    assert device_wheel.wheel_requirements(wheel) == ["numpy<3", "torch>=2.4"]
    with pytest.raises(device_probe.DeviceCheckError, match="torch"):
        emulator.Device(tmp_path / "dev").ensure_wheels(wheel)


def test_probe_file_imports_only_what_a_device_has() -> None:
    """The probe is one file on the device, beside the installed wheel: the standard
    library, numpy, onnxruntime and the device side of runtime (never runtime.daemon), and
    nothing of tools/, which the device does not have. Its lazy imports count too."""
    lines = [line.strip() for line in PROBE.read_text().splitlines()]
    dotted = {re.match(r"(?:import|from) ([\w.]+)", line).group(1) for line in lines
              if re.match(r"(import|from) \w", line)}
    runtime = {name for name in dotted if name.startswith("runtime")}
    assert runtime and not any(name.startswith("runtime.daemon") for name in runtime)
    modules = {name.split(".")[0] for name in dotted - runtime}
    assert modules <= {"__future__", "argparse", "contextlib", "importlib", "json",
                       "platform", "sys", "time", "collections", "pathlib", "typing",
                       "numpy", "onnxruntime"}, modules


def test_probe_cli_refuses_bad_usage_with_one_line(tmp_path: Path) -> None:
    done = _tool("--model", str(tmp_path / "policy.onnx"), tool=PROBE)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "device_probe: error: --model needs --frames and --out"
    done = _tool("--model", str(tmp_path / "policy.onnx"), "--frames", str(FRAMES),
                 "--out", str(tmp_path / "out.npz"), tool=PROBE)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("device_probe: error: ")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter is x86-64's")
def test_untranslated_syscalls_fail_with_enosys(tmp_path: Path) -> None:
    """proot 5.1 passes statx/faccessat2 paths through untranslated; the filter turns them
    into ENOSYS so that glibc and qemu fall back to calls proot translates."""
    script = ("import ctypes, os\n"
              "libc = ctypes.CDLL(None, use_errno=True)\n"
              "buf = ctypes.create_string_buffer(256)\n"
              "r = libc.syscall(332, -100, b'/', 0, 0x7ff, buf)\n"
              "e = ctypes.get_errno()\n"
              "r2 = libc.syscall(439, -100, b'/', 0, 0)\n"
              "print(r, e, r2, ctypes.get_errno(), os.access('/', os.R_OK), os.stat('/').st_mode)")
    device = emulator.Device(tmp_path)
    rc, out, err, maxrss = device.host([sys.executable, "-c", script], "enosys", seccomp=True)
    assert rc == 0, err
    r, errno, r2, errno2, access, _ = out.split()
    assert (r, errno, r2, errno2, access) == ("-1", "38", "-1", "38", "True")
    assert maxrss > 0


# -- the whole check, on a device that is a directory of this machine ------------------------

class NativeDevice(emulator.Device):
    """No root file system, no proot, no qemu: the staged app runs with this interpreter,
    from its directory. Everything else of run_check runs as it does for the emulator."""

    def ensure_rootfs(self, rebuild: bool = False) -> dict:
        return {"reused": True, "seconds": 0.0}

    def ensure_wheels(self, wheel: Path) -> tuple[list[str], str]:
        return [wheel.name], device_wheel.wheel_digest(wheel)

    def ensure_venv(self, wheel_name: str, digest: str) -> dict:
        return {"reused": True, "seconds": 0.0}

    def device_python(self, argv, log_name, timeout):  # noqa: ANN001, ANN201
        done = subprocess.run([sys.executable, *argv], cwd=self.rootfs / emulator.APP.lstrip("/"),
                              text=True, capture_output=True, timeout=timeout,
                              env=_device_env())
        return done.returncode, done.stdout, done.stderr, 1


def test_the_whole_check_on_a_native_device(exported: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """run_check end to end, the copied probe and `python -m runtime.infer` run from the
    staged app: the same machine on both sides agrees exactly, and it has torch."""
    model = tmp_path / "policy.onnx"
    model.write_bytes(exported.read_bytes())
    (tmp_path / "policy.int8.onnx").write_bytes(exported.read_bytes())  # a stand-in sibling
    monkeypatch.setattr(dc, "Device", NativeDevice)
    result = dc.run_check(dc.parse_args(["--model", str(model), "--max-steps", "20",
                                         "--device-dir", str(tmp_path / "dev")]))
    assert result["parity"]["passed"] and result["parity"]["action_agreement"] == 1.0
    assert result["parity"]["max_abs_logit_diff"] == 0.0
    assert result["parity"]["graph_actions_agree"] == 1.0
    assert result["game"]["same_trajectory"] and result["game"]["device"]["steps"] == 20
    assert result["device"]["machine"] == platform.machine()
    assert result["int8"]["vs_float_on_device"]["passed"] and result["int8"]["vs_x86"]["passed"]
    assert result["memory_kb"]["device_bare_python_vmhwm"] > 0
    assert set(result["durations_s"]) == {"native", "build", "check", "total"}
    assert result["build"]["wheel"].startswith(device_wheel.WHEEL_PREFIX)
    # This machine is no device: the learner is installed, and the check says so.
    assert result["device"]["torch_installed"] is True
    assert result["failures"] == ["torch or onnx is installed on the device"]
    assert result["passed"] is False


# -- command line ----------------------------------------------------------------------------

def test_cli_exit_codes_follow_the_result(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    model = tmp_path / "policy.onnx"
    model.write_bytes(b"x")
    ok = {"passed": True, "failures": []}
    assert dc.main(["--model", str(model)], run=lambda args: ok) == 0
    assert json.loads(capsys.readouterr().out) == ok
    bad = {"passed": False, "failures": ["aarch64 vs x86 greedy actions agree on 98.00%"]}
    assert dc.main(["--model", str(model)], run=lambda args: bad) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == bad
    assert captured.err.strip() == "device_check: error: aarch64 vs x86 greedy actions agree " \
                                   "on 98.00%"

    def broken(args: object) -> dict:
        raise device_probe.DeviceCheckError("debootstrap --foreign failed (exit 1): no network")

    assert dc.main(["--model", str(model)], run=broken) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert dc.main(["--games", "0", "--model", str(model)]) == 2
    assert dc.main([]) == 2
    assert capsys.readouterr().out == ""


def test_cli_refuses_a_missing_model_with_one_line(tmp_path: Path) -> None:
    done = _tool("--model", str(tmp_path / "nope.onnx"), "--device-dir", str(tmp_path / "d"))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("device_check: error: --model")
    assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""
    assert not (tmp_path / "d").exists()


# -- the emulated device (minutes; opt-in) ---------------------------------------------------

@pytest.mark.skipif(os.environ.get("RUN_DEVICE_CHECK") != "1",
                    reason="emulated aarch64 device check: set RUN_DEVICE_CHECK=1 (minutes)")
def test_emulated_device_check(exported: Path) -> None:
    args = ["--model", str(exported), "--max-steps", "40"]
    if os.environ.get("DEVICE_DIR"):
        args += ["--device-dir", os.environ["DEVICE_DIR"]]
    done = _tool(*args, timeout=4 * 3600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["passed"] and result["device"]["machine"] == "aarch64"
    assert result["parity"]["action_agreement"] >= 0.999
    assert result["device"]["torch_installed"] is False
    assert result["game"]["device"]["steps"] == 40
