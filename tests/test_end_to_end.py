"""From learner to device as one product: the daemon learns CartPole and publishes policies
signed with an Ed25519 key made by `python -m runtime.keys new`, a static HTTP server serves
them, and a torch-free player installed from the wheel, holding only the public key, follows
them while bad policies are injected and the server goes down and comes back.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent.learner import A2CLearner
from runtime.daemon.config import load_config
from runtime.daemon.export import policy_weights, stream_spec
from runtime.daemon.publish import PolicyWriter
from runtime.device.keys import Signer
from runtime.device.manifest import policy_file, sha256_file, sign
from runtime.files import write_atomic
from tests.conftest import CARTPOLE, ROOT, _device_env, _env, make_key_pair

PLAYING = r"playing policy step (\d+)"


class Server:
    """`python -m http.server --directory POLICIES`, in a thread, stoppable and restartable
    on the same port."""

    def __init__(self, directory: Path) -> None:
        self.handler = functools.partial(_QuietHandler, directory=str(directory))
        self.port = 0
        self.httpd: http.server.ThreadingHTTPServer | None = None

    def start(self) -> str:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class Lines:
    """The player's stderr, line by line, as it comes."""

    def __init__(self, stream) -> None:  # noqa: ANN001
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:  # noqa: ANN001
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait(self, pattern: str, start: int = 0, timeout: float = 120,
             accept=lambda m: True) -> tuple[int, re.Match]:  # noqa: ANN001
        """The first line at or after index `start` matching `pattern` (and `accept`)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(start, len(self.lines)):
                    match = re.search(pattern, self.lines[i])
                    if match and accept(match):
                        return i, match
                start = len(self.lines)
                left = deadline - time.monotonic()
                assert left > 0, f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-20:])
                self._cond.wait(left)


def _acrobot_policy(base: Path) -> bytes:
    """A real policy, verified, for another environment (6 inputs, 3 actions)."""
    config = load_config(ROOT / "config.yaml", ["env.id=Acrobot-v1", f"run.dir={base}"])
    spec = stream_spec(config)
    learner = A2CLearner(config.agent, spec.observation_shape, spec.num_actions)
    writer = PolicyWriter(config, {"network": learner.network_name,
                                   "num_actions": spec.num_actions,
                                   "observation_shape": list(spec.observation_shape),
                                   "observation_dtype": spec.observation_dtype},
                          base / "policies", None, keep=1)
    entry = writer.publish({"step": 1, "weights": policy_weights(learner.net.policy()),
                            "recent_returns": [], "created_at": time.time()})
    return (writer.directory / entry["file"]).read_bytes()


def _inject(kind: str, policies: Path, lines: Lines, key: Signer, attacker: Signer,
            acrobot: bytes) -> dict:
    """Publish a bad policy through latest.json and wait for the player to refuse it. The
    daemon may publish a newer one before the player looks: then try again."""
    for _ in range(6):
        mark = len(lines.lines)
        try:
            latest = json.loads((policies / "latest.json").read_text())
            good = (policies / latest["file"]).read_bytes()
        except (OSError, ValueError):
            time.sleep(0.2)  # pruned or being replaced just now
            continue
        step = latest["step"] + 1
        fields = {k: v for k, v in latest.items() if k != "signature"}
        fields.update(step=step, file=policy_file(step), sha256=sha256_file(
            policies / latest["file"]), size=len(good))
        if kind == "corrupt":  # the bytes change after signing: a corrupt file
            data = bytearray(good)
            data[len(data) // 2] ^= 0xFF
            entry = sign(fields, key)
        elif kind == "another environment":
            data = acrobot
            fields.update(env_id="Acrobot-v1", observation_shape=[6], num_actions=3,
                          sha256=hashlib.sha256(acrobot).hexdigest(), size=len(acrobot))
            entry = sign(fields, key)
        elif kind == "another key":  # an attacker's own key pair
            data = good
            entry = sign(fields, attacker)
        else:  # an attacker's signature under the learner's key id
            data = good
            entry = sign(fields, attacker)
            entry["signature"] = entry["signature"].replace(attacker.key_id, key.key_id)
        (policies / entry["file"]).write_bytes(bytes(data))
        write_atomic(policies / "latest.json", json.dumps(entry).encode())
        _, match = lines.wait(rf"refused policy step {step}: (.*)|{PLAYING}", mark, timeout=30,
                              accept=lambda m, s=step: m.group(1) is not None
                              or int(m.group(2)) > s)
        if match.group(1) is not None:
            return {"step": step, "reason": match.group(1)}
    raise AssertionError(f"the {kind} policy was never looked at")


def test_a_torch_free_device_follows_the_learning_daemon(device_venv: dict,
                                                         tmp_path: Path) -> None:
    made = subprocess.run([sys.executable, "-m", "runtime.keys", "new", "fleet"],
                          cwd=tmp_path, env=_env(), text=True, capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key_file, public_key = tmp_path / "fleet.key", tmp_path / "fleet.pub"
    key, attacker = Signer.from_file(key_file), make_key_pair(tmp_path, "attacker").signer
    acrobot = _acrobot_policy(tmp_path / "acrobot")
    policies = tmp_path / "run" / "policies"
    policies.mkdir(parents=True)
    server = Server(policies)
    url = server.start()
    device = tmp_path / "device"
    device.mkdir()
    # The device: the wheel's venv (torch raises on import there), outside the repository,
    # started before anything is published; it waits for the first policy.
    player = subprocess.Popen(
        [str(device_venv["python"]), "-m", "runtime.infer", "--follow", url, "--key",
         str(public_key), "--interval", "0.3", "--wait", "300", "--timeout", "2", "--cache",
         str(device / "cache")], cwd=device, env=_device_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: os.nice(5))
    lines = Lines(player.stderr)
    with open(tmp_path / "daemon.err", "w") as daemon_log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "runtime.daemon", "--config", "config.yaml", "--run-dir",
             str(tmp_path / "run"), "--max-steps", "12000", *CARTPOLE,
             "--set", "export.every_steps=500", "--set", f"export.key_file={key_file}",
             "--set", "export.niceness=0", "--set", "checkpoint.every_steps=100000"],
            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=daemon_log)
    out = ""
    try:
        first, _ = lines.wait(PLAYING, timeout=300)
        lines.wait(PLAYING, first + 1, timeout=120)
        refused = {kind: _inject(kind, policies, lines, key, attacker, acrobot)
                   for kind in ("corrupt", "another environment", "another key",
                                "wrong key")}

        # The server goes down and comes back; play goes on and the next policy arrives.
        mark = len(lines.lines)
        server.stop()
        down_at, _ = lines.wait(r"source problem", mark, timeout=30)
        played = [int(m) for m in re.findall(PLAYING, "\n".join(lines.lines))]
        deadline = time.monotonic() + 120
        while json.loads((policies / "latest.json").read_text())["step"] <= played[-1]:
            assert time.monotonic() < deadline, "the daemon published nothing new"
            time.sleep(0.2)
        server.start()
        back, _ = lines.wait(r"answers again", down_at, timeout=30)
        lines.wait(PLAYING, back, timeout=60, accept=lambda m: int(m.group(1)) > played[-1])

        assert daemon.wait(timeout=300) == 0, (tmp_path / "daemon.err").read_text()[-2000:]
        final = json.loads((policies / "latest.json").read_text())["step"]
        lines.wait(PLAYING, 0, timeout=60, accept=lambda m: int(m.group(1)) == final)
        time.sleep(1.0)  # a few games with the final policy
    finally:
        if daemon.poll() is None:
            daemon.kill()
        player.send_signal(signal.SIGTERM)
        out = player.communicate(timeout=60)[0]
        server.stop()
    stderr = "\n".join(lines.lines)
    assert player.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    summary = json.loads(out)
    print("player summary:", json.dumps(summary))

    reasons = {kind: r["reason"] for kind, r in refused.items()}
    assert "sha256" in reasons["corrupt"]
    assert "made for Acrobot-v1" in reasons["another environment"]
    assert f"entry signed by key {attacker.key_id}, which this device does not trust" \
        in reasons["another key"]
    assert f"entry signature does not match the key {key.key_id}" in reasons["wrong key"]
    assert re.search(rf"{PLAYING} .*signed by key {key.key_id}", stderr)
    assert [r["step"] for r in summary["refused"]] == [r["step"] for r in refused.values()]
    injected = {r["step"] for r in refused.values()}
    steps = summary["policies_played"]
    assert len(steps) >= 3 and steps == sorted(set(steps)) and not injected & set(steps)
    assert steps[-1] == final and summary["source_errors"] >= 1
    per_policy = summary["policies"]
    assert [p["step"] for p in per_policy] == steps
    assert all(p["games"] >= 1 for p in per_policy)
    # The device ends on a policy that learned CartPole (500 is its cap), better than the
    # first it played unless that one had learned too: publishing into the graph is fast
    # enough that the first policy the device sees may already be a late one.
    first_score, final_score = per_policy[0]["mean_return"], per_policy[-1]["mean_return"]
    assert final_score >= 200, per_policy  # random play scores about 22
    assert final_score > first_score or first_score >= 490, per_policy
    assert summary["games"] == sum(p["games"] for p in per_policy)
