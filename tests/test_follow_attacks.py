"""Attacks on a following device through the served policies directory: whoever can write
what the device fetches, but holds no key, must not keep it from playing.

Forged, corrupt and oversized policies at start and while playing, servers that drip one
byte every 0.2 s (the body of latest.json, its headers, a policy file), SIGINT/SIGTERM
to a player process while a slow download is in progress, and genuine entries served again
to send a device back (an older step of its run, a run it left, an older run). Real HTTP
servers on 127.0.0.1, timeouts of a second or two. Torch-free: the policies are tiny ONNX
graphs made here (a linear CartPole actor with the exporter's metadata), signed with a shared
HMAC key, or with an Ed25519 key whose public key is all the device holds (the attacker's
keys, a rotation). Last, the attacks in one sequence on a player installed from the
torch-free wheel, across its restarts, its metrics scraped on the way.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.contract import StreamOptions
from runtime.device.follow import PARTIAL, Follower, FollowError
from runtime.device.keys import Signer
from runtime.device.manifest import load_key, policy_file, run_fields, sign
from runtime.device.sources import Source, SourceError
from tests.conftest import (
    ROOT,
    KeyPair,
    _device_env,
    _env,
    free_port,
    http_get,
    make_key_pair,
)

DRIP_SECONDS = 0.2  # between two bytes of a dripping server
TIMEOUT = 1.0  # the source's timeout: one read, and the whole of latest.json
DOWNLOAD = 1.5  # a policy download's deadline


# -- policies without torch --------------------------------------------------------------------


def policy_bytes(step: int, env_id: str = "CartPole-v1") -> bytes:
    """A verified-looking CartPole policy: logits = observation @ w + b, action = argmax,
    with the metadata runtime.daemon.export writes (a vector stream: no frame skip/stack)."""
    rng = np.random.default_rng(step)
    w = numpy_helper.from_array(rng.normal(size=(4, 2)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(2, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["observation", "w"], ["h"]),
         helper.make_node("Add", ["h", "b"], ["logits"]),
         helper.make_node("ArgMax", ["logits"], ["action"], axis=1, keepdims=0)],
        "policy",
        [helper.make_tensor_value_info("observation", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("action", TensorProto.INT64, ["N"])],
        [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = StreamOptions(frame_skip=1, frame_stack=1, time_feature=False)
    metadata = {"format_version": "1", "env_id": env_id, "observation_shape": "[4]",
                "observation_dtype": "float32", "num_actions": "2",
                "action_meanings": json.dumps(["left", "right"]),
                "training_step": str(step), **options.to_metadata(), "env_kwargs": "{}",
                "network": "mlp", "producer": "tests/test_follow_attacks.py"}
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def entry_for(step: int, data: bytes, key: Signer | bytes | None, **changes: object) -> dict:
    """The publisher's entry for `data` at `step` (signed with `key`: a Signer or an HMAC
    secret), with `changes`."""
    fields = {"format": 1, "step": step, "file": policy_file(step),
              "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
              "env_id": "CartPole-v1", "observation_shape": [4],
              "observation_dtype": "float32", "num_actions": 2, "network": "mlp",
              "mean_return": None, "recent_games": 0, "parity": None,
              "created_at": round(time.time(), 3), **changes}
    return sign(fields, key) if key is not None else fields


# -- a server an attacker controls -------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.root`; `server.modes[name]` says how to misbehave for one file:
    "drip" (200, no Content-Length, one byte every DRIP_SECONDS), "drip-headers" (the
    status line and headers one byte at a time), "extra" (the file and 1 MB more, no
    Content-Length), "announce" (a Content-Length of 10 GB)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        server = self.server
        name = self.path.lstrip("/")
        mode = server.modes.get(name)
        with server.lock:
            server.requests.append((name, mode, time.time()))
        path = server.root / name
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        try:
            if mode == "drip-headers":
                self._drip(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + data)
            elif mode == "drip":
                self.send_response(200)
                self.end_headers()
                self._drip(data)
            elif mode == "extra":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(data + b"\0" * (1 << 20))
            elif mode == "announce":
                self.send_response(200)
                self.send_header("Content-Length", str(10 << 30))
                self.end_headers()
                self.wfile.write(data)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
        except OSError:
            pass  # the client gave up (as it should)

    def _drip(self, data: bytes) -> None:
        for i in range(len(data)):
            if self.server.closing.is_set():
                return
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(DRIP_SECONDS)


class Served:
    """A policies directory behind an HTTP server that can be told to misbehave."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.root, self.httpd.modes = root, {}
        self.httpd.requests, self.httpd.lock = [], threading.Lock()
        self.httpd.closing = threading.Event()
        self.httpd.handle_error = lambda *args: None
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def modes(self) -> dict[str, str]:
        return self.httpd.modes

    def requests(self, name: str) -> list[tuple[str, str | None, float]]:
        with self.httpd.lock:
            return [r for r in self.httpd.requests if r[0] == name]

    def offer(self, entry: dict, data: bytes | None, mode: str | None = None) -> None:
        """`entry` as latest.json, `data` as its file (served as `mode` says)."""
        if data is not None:
            (self.root / entry["file"]).write_bytes(data)
        self.modes.pop(entry["file"], None)
        if mode is not None:
            self.modes[entry["file"]] = mode
        self.write_latest(json.dumps(entry))

    def write_latest(self, text: str) -> None:
        """Replaced at once, as the publisher does (a device never reads half of it)."""
        tmp = self.root / ".latest.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.root / "latest.json")

    def close(self) -> None:
        self.httpd.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = Served(tmp_path / "served")
    yield server
    server.close()


def _follower(url: str, key_file: Path | list[Path] | None, cache: Path,
              **kwargs: object) -> Follower:
    kwargs.setdefault("interval", 3600)
    kwargs.setdefault("download_seconds", DOWNLOAD)
    return Follower(Source(url, timeout=TIMEOUT), key_file=key_file, cache_dir=cache, **kwargs)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "runtime.follow" and r.levelno >= logging.WARNING]


def _partials(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob(f"{PARTIAL}*")) if cache.exists() else []


def _wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _cache_step(url: str, key_file: Path, cache: Path, served: Served, step: int) -> None:
    """A device that once played `step` from `url`: its cache holds it, verified."""
    data = policy_bytes(step)
    served.offer(entry_for(step, data, load_key(key_file)), data)
    follower = _follower(url, key_file, cache)
    follower.start()
    follower.close()
    assert (cache / policy_file(step)).is_file()


# -- at start: the device plays what it trusts -------------------------------------------------

# attack -> (what it does to the served directory, a needle of the reason, the most seconds
# a start with a cached policy may take)
START_ATTACKS = ("forged", "unsigned", "corrupt", "oversized entry", "oversized file",
                 "not JSON", "down", "slow latest.json", "slow headers", "slow policy file")


def _attack(attack: str, served: Served, key: bytes, step: int = 200) -> str:
    """Publish `step` as `attack` says; returns a needle of the reason a device gives."""
    data = policy_bytes(step)
    good = entry_for(step, data, key)
    if attack == "forged":
        served.offer({**good, "mean_return": 1e9}, data)  # changed after signing
        return "entry signature does not match the key"
    if attack == "unsigned":
        served.offer(entry_for(step, data, None), data)
        return "entry is not signed"
    if attack == "corrupt":
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 0xFF
        served.offer(good, bytes(bad))
        return "does not match the manifest's"
    if attack == "oversized entry":
        served.offer(entry_for(step, data, key, size=65 << 20), data)
        return "above the limit"
    if attack == "oversized file":
        served.offer(good, data, mode="extra")
        return f"more than {len(data)} bytes"
    if attack == "not JSON":
        served.write_latest("<html>it works</html>")
        return "latest.json is not JSON"
    if attack == "down":
        served.close()
        return "Connection refused"
    if attack == "slow latest.json":
        served.offer(good, data)
        served.modes["latest.json"] = "drip"
        return f"latest.json: timed out: not received within {TIMEOUT:g} s"
    if attack == "slow headers":
        served.offer(good, data)
        served.modes["latest.json"] = "drip-headers"
        return f"latest.json: timed out: not received within {TIMEOUT:g} s"
    assert attack == "slow policy file"
    served.offer(good, data, mode="drip")
    return f"{policy_file(step)}: timed out: not received within"


@pytest.mark.parametrize("attack", START_ATTACKS)
def test_a_device_with_a_cached_policy_starts_whatever_the_source_says(
        attack: str, served: Served, key_file: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """It plays the cached policy (checked again), says what it refused in one line, goes
    on looking without saying it again, and takes a genuine newer policy when one comes."""
    key, cache, url = load_key(key_file), tmp_path / "cache", served.url
    _cache_step(url, key_file, cache, served, 100)
    needle = _attack(attack, served, key)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="runtime.follow")
    follower = _follower(url, key_file, cache, interval=0.1)
    began = time.monotonic()
    try:
        follower.start()
        took = time.monotonic() - began
        assert follower.step == 100 and isinstance(follower.act(np.zeros(4, np.float32)), int)
        time.sleep(0.5)  # the watcher looks again a few times
        assert follower.step == 100 and not follower.reload()
        if attack != "down":
            served.modes.clear()
            genuine = policy_bytes(300)
            served.offer(entry_for(300, genuine, key), genuine)
            _wait_for(follower.reload, 10, "the genuine policy of step 300")
            assert follower.step == 300
    finally:
        follower.close()
    # A slow source costs the start at most its timeout (an index read, a download).
    assert took < 2 * TIMEOUT + 1.0, took
    warnings = _warnings(caplog)
    print(attack, "->", warnings)
    assert len(warnings) == 1, warnings
    assert needle in warnings[0] and "playing the cached policy of step 100" in warnings[0]
    kind = {"down": "cannot read", "not JSON": "cannot read", "slow latest.json":
            "cannot read", "slow headers": "cannot read",
            "slow policy file": "policy step 200 not fetched from",
            "oversized file": "policy step 200 not fetched from"}.get(
                attack, "refused policy step 200 from")
    assert warnings[0].startswith(kind), warnings[0]
    assert _partials(cache) == []
    assert sorted(p.name for p in cache.iterdir()) == [
        "accepted.json", "current.json", policy_file(100 if attack == "down" else 300)]


@pytest.mark.parametrize("attack", START_ATTACKS)
def test_without_a_cached_policy_the_device_gives_the_real_reason(
        attack: str, served: Served, key_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    needle = _attack(attack, served, load_key(key_file))
    follower = _follower(served.url, key_file, cache)
    began = time.monotonic()
    with pytest.raises(FollowError) as error:
        follower.start()
    took = time.monotonic() - began
    follower.close()
    message = str(error.value)
    print(attack, "->", message)
    assert needle in message and "\n" not in message
    assert f"the cache {cache} holds no verified policy (nothing cached)" in message
    assert took < DOWNLOAD + TIMEOUT + 1.0, took
    assert _partials(cache) == []


def test_a_tampered_cache_is_not_trusted(served: Served, key_file: Path,
                                         tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _cache_step(served.url, key_file, cache, served, 100)
    _attack("forged", served, load_key(key_file))
    (cache / policy_file(100)).write_bytes(policy_bytes(999))  # replaced in the cache
    with pytest.raises(FollowError, match=r"no usable policy in .*signature does not match.*"
                       r"holds no verified policy \(policy-000000000100.onnx does not match"):
        _follower(served.url, key_file, cache).start()


def test_a_restart_takes_a_newer_verified_policy_and_never_fetches_the_cached_one_again(
        served: Served, key_file: Path, tmp_path: Path) -> None:
    key, cache = load_key(key_file), tmp_path / "cache"
    _cache_step(served.url, key_file, cache, served, 100)
    follower = _follower(served.url, key_file, cache)
    follower.start()  # latest.json still names step 100: the cached file plays
    follower.close()
    assert follower.summary()["policies_played"] == [100]
    assert len(served.requests(policy_file(100))) == 1
    newer = policy_bytes(200)
    served.offer(entry_for(200, newer, key), newer)
    follower = _follower(served.url, key_file, cache)
    follower.start()
    follower.close()
    assert follower.step == 200
    assert sorted(p.name for p in cache.iterdir()) == ["accepted.json", "current.json",
                                                       policy_file(200)]


# -- Ed25519: the device holds the public key only -------------------------------------------

# attack -> a needle of the reason a device holding fleet.pub gives
ED25519_ATTACKS = ("an attacker's own key", "another key under the trusted key's id",
                   "a shared HMAC key", "a field changed after signing")


def _ed25519_attack(attack: str, fleet: KeyPair, attacker: KeyPair, data: bytes,
                    step: int) -> tuple[dict, str]:
    """An entry for `data` at `step` made as `attack` says, and a needle of the reason a
    device that trusts fleet.pub refuses it."""
    if attack == "an attacker's own key":
        return entry_for(step, data, attacker.signer), \
            f"entry signed by key {attacker.key_id}, which this device does not trust " \
            f"(it trusts Ed25519 key {fleet.key_id})"
    if attack == "another key under the trusted key's id":
        # Whoever holds the public key has nothing to sign with: any other key's signature,
        # named as the trusted key's, does not verify.
        forged = entry_for(step, data, attacker.signer)
        forged["signature"] = forged["signature"].replace(attacker.key_id, fleet.key_id)
        return forged, f"entry signature does not match the key {fleet.key_id}"
    if attack == "a shared HMAC key":
        return entry_for(step, data, secrets.token_hex(32).encode()), \
            "entry is signed with a shared HMAC key, which this device does not trust"
    assert attack == "a field changed after signing"
    return {**entry_for(step, data, fleet.signer), "mean_return": 1e9}, \
        "entry signature does not match the key"


def test_a_device_with_the_public_key_plays_only_what_the_private_key_signed(
        served: Served, fleet: KeyPair, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runtime.follow")
    attacker, cache = make_key_pair(tmp_path, "attacker"), tmp_path / "cache"
    first = policy_bytes(100)
    served.offer(entry_for(100, first, fleet.signer), first)
    follower = _follower(served.url, fleet.public, cache)
    try:
        follower.start()
        assert follower.step == 100 and isinstance(follower.act(np.zeros(4, np.float32)), int)
        data = policy_bytes(200)
        for attack in ED25519_ATTACKS:
            entry, needle = _ed25519_attack(attack, fleet, attacker, data, 200)
            served.offer(entry, data)
            assert follower.check() is None, attack
            print(attack, "->", follower.refused[-1]["reason"])
            assert needle in follower.refused[-1]["reason"], attack
        assert served.requests(policy_file(200)) == []  # all refused before downloading
        genuine = policy_bytes(300)
        served.offer(entry_for(300, genuine, fleet.signer), genuine)
        follower._ready = follower.check()
        assert follower.reload() and follower.step == 300
    finally:
        follower.close()
    assert [r["step"] for r in follower.refused] == [200] * len(ED25519_ATTACKS)
    assert f"playing policy step 300 (policy-000000000300.onnx, signed by key " \
           f"{fleet.key_id}, was step 100)" in [r.getMessage() for r in caplog.records]


def test_a_key_rotation_keeps_devices_playing_and_then_drops_the_old_key(
        served: Served, tmp_path: Path) -> None:
    """Devices trust OLD.pub and NEW.pub while the learner moves to NEW.key: entries of
    either play. A device that then drops OLD.pub refuses what OLD.key signs."""
    old, new = make_key_pair(tmp_path, "old"), make_key_pair(tmp_path, "new")
    cache = tmp_path / "cache"
    both = _follower(served.url, [old.public, new.public], cache)
    try:
        for step, signer in ((100, old.signer), (200, new.signer), (300, old.signer),
                             (400, new.signer)):
            data = policy_bytes(step)
            served.offer(entry_for(step, data, signer), data)
            if step == 100:
                both.start()
            else:
                both._ready = both.check()
                assert both.reload(), both.refused
            assert both.step == step
    finally:
        both.close()
    only_new = _follower(served.url, [new.public], cache)
    try:
        only_new.start()  # the cached policy of step 400, signed by NEW
        assert only_new.step == 400 and only_new.refused == []
        data = policy_bytes(500)
        served.offer(entry_for(500, data, old.signer), data)
        assert only_new.check() is None
        assert only_new.refused[-1]["reason"] == (
            f"entry signed by key {old.key_id}, which this device does not trust (it trusts "
            f"Ed25519 key {new.key_id})")
    finally:
        only_new.close()


def test_the_player_trusts_each_key_given_and_warns_of_a_public_key_others_may_write(
        served: Served, tmp_path: Path) -> None:
    old, new = make_key_pair(tmp_path, "old"), make_key_pair(tmp_path, "new")
    new.public.chmod(0o666)
    data = policy_bytes(100)
    served.offer(entry_for(100, data, new.signer), data)
    done = subprocess.run(
        [sys.executable, "-m", "runtime.infer", "--follow", served.url, "--key",
         str(old.public), "--key", str(new.public), "--games", "2", "--cache",
         str(tmp_path / "cache")], cwd=ROOT, env=_env(), text=True, capture_output=True,
        timeout=120)
    print(done.stderr)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["policies_played"] == [100]
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        f"public key file {new.public} may be written by group or others (mode 666): whoever "
        f"replaces it chooses which policies this device trusts; chmod 644 {new.public}")
    assert f"playing policy step 100 (policy-000000000100.onnx, signed by key {new.key_id})" \
        in done.stderr


# -- while playing -----------------------------------------------------------------------------


def test_forged_corrupt_and_oversized_policies_while_playing(
        served: Served, key_file: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Each is one line; the current policy plays on; a genuine newer one is then taken."""
    key, cache = load_key(key_file), tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="runtime.follow")
    data = policy_bytes(100)
    served.offer(entry_for(100, data, key), data)
    follower = _follower(served.url, key_file, cache, interval=0.1)
    try:
        follower.start()
        # Each attack at a step of its own: a genuine file written under the name of an
        # earlier attack's genuine entry would be a genuine policy, rightly taken.
        attacks = ("forged", "corrupt", "oversized entry", "oversized file")
        for step, attack in enumerate(attacks, start=200):
            mark = len(_warnings(caplog))
            needle = _attack(attack, served, key, step)
            _wait_for(lambda n=needle, m=mark: any(n in w for w in _warnings(caplog)[m:]),
                      10, attack)
            time.sleep(0.5)  # a few more looks: nothing more is said
            new = _warnings(caplog)[mark:]
            print(attack, "->", new)
            assert len(new) == 1, new
            assert not follower.reload() and follower.step == 100
            assert isinstance(follower.act(np.zeros(4, np.float32)), int)
            # a corrupt file is fetched again at each look (it may have been caught half
            # written), so a download can be in flight; none may stay
            _wait_for(lambda: _partials(cache) == [], 2, "no partial download left")
        genuine = policy_bytes(300)
        served.offer(entry_for(300, genuine, key), genuine)
        _wait_for(follower.reload, 10, "the genuine policy of step 300")
        assert follower.step == 300
    finally:
        follower.close()
    assert [r["step"] for r in follower.summary()["refused"]] == [200, 201, 202]
    assert sorted(p.name for p in cache.iterdir()) == ["accepted.json", "current.json",
                                                       policy_file(300)]


# -- bounded in time ---------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["latest.json", "latest.json headers", "policy file"])
def test_a_slow_drip_is_given_up_by_its_deadline_and_the_watcher_keeps_looking(
        what: str, served: Served, key_file: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    key, cache = load_key(key_file), tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="runtime.follow")
    data = policy_bytes(100)
    served.offer(entry_for(100, data, key), data)
    follower = _follower(served.url, key_file, cache, interval=0.1)
    try:
        follower.start()
        if what == "policy file":
            name, deadline, line = policy_file(200), DOWNLOAD, "policy step 200 not fetched"
            slow = policy_bytes(200)
            served.offer(entry_for(200, slow, key), slow, mode="drip")
        else:  # latest.json (still naming step 100) drips
            name, deadline, line = "latest.json", TIMEOUT, "source problem"
            served.modes["latest.json"] = "drip" if what == "latest.json" else "drip-headers"

        def slow_requests() -> list:
            return [r for r in served.requests(name) if r[1] is not None]

        record = _wait_for(lambda: [r for r in caplog.records if line in r.getMessage()],
                           10, line)[0]
        took = record.created - slow_requests()[0][2]
        print(what, "->", record.getMessage(), f"({took:.2f} s after the request)")
        assert deadline - 0.5 < took < deadline + 1.0, took
        assert "timed out: not received within" in record.getMessage()
        # The watcher goes on looking (and failing) without saying it again.
        _wait_for(lambda: len(slow_requests()) >= 3, 10, "more looks")
        assert len([w for w in _warnings(caplog) if line in w]) == 1, _warnings(caplog)
        assert follower.step == 100 and not follower.reload()
        # The server behaves again and a genuine newer policy is taken.
        served.modes.clear()
        genuine = policy_bytes(300)
        served.offer(entry_for(300, genuine, key), genuine)
        _wait_for(follower.reload, 10, "the genuine policy of step 300")
        assert follower.step == 300
        assert any(("answers again" if name == "latest.json" else "problem is over")
                   in r.getMessage() for r in caplog.records)
    finally:
        follower.close()
    assert len(_warnings(caplog)) == 1, _warnings(caplog)
    assert _partials(cache) == []
    assert sorted(p.name for p in cache.iterdir()) == ["accepted.json", "current.json",
                                                       policy_file(300)]


def test_close_ends_a_slow_download_at_once_and_leaves_no_partial_file(
        served: Served, key_file: Path, tmp_path: Path) -> None:
    key, cache = load_key(key_file), tmp_path / "cache"
    data, slow = policy_bytes(100), policy_bytes(200)
    served.offer(entry_for(100, data, key), data)
    follower = _follower(served.url, key_file, cache, interval=0.1, download_seconds=300)
    follower.start()
    served.offer(entry_for(200, slow, key), slow, mode="drip")
    _wait_for(lambda: _partials(cache), 10, "a download in progress")
    time.sleep(0.5)
    began = time.monotonic()
    follower.close()
    assert time.monotonic() - began < 1.5
    assert not follower._thread.is_alive()
    assert _partials(cache) == []


def test_an_oversized_file_is_refused_before_or_while_downloading(
        served: Served, key_file: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    key, cache = load_key(key_file), tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="runtime.follow")
    data = policy_bytes(100)
    served.offer(entry_for(100, data, key), data)
    follower = _follower(served.url, key_file, cache, max_policy_bytes=1 << 20)
    try:
        follower.start()
        big = policy_bytes(200)
        # The entry says more than the device takes: refused before anything is fetched.
        served.offer(entry_for(200, big, key, size=(1 << 20) + 1), big)
        assert follower.check() is None and "above the limit" in follower.refused[-1]["reason"]
        assert served.requests(policy_file(200)) == []
        # The server announces more than the entry says: nothing is written.
        served.offer(entry_for(201, policy_bytes(201), key), policy_bytes(201), "announce")
        assert follower.check() is None and "announces 10737418240 bytes" in \
            follower.problem[2]
        # The server sends more than the entry says, unannounced: cut at size + 1 bytes.
        served.offer(entry_for(202, policy_bytes(202), key), policy_bytes(202), "extra")
        assert follower.check() is None and "more than" in follower.problem[2]
        # A latest.json of 2 MB: cut at 1 MB.
        served.write_latest(" " * (2 << 20))
        served.modes["latest.json"] = "extra"
        with pytest.raises(SourceError, match="more than 1048576 bytes"):
            follower.check()
        assert follower.step == 100 and _partials(cache) == []
    finally:
        follower.close()
    print("\n".join(_warnings(caplog)))
    assert len(_warnings(caplog)) == 4


# -- signals -----------------------------------------------------------------------------------


class _Lines:
    """A process's stderr, line by line, as it comes."""

    def __init__(self, stream) -> None:  # noqa: ANN001
        self.lines: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:  # noqa: ANN001
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def find(self, pattern: str) -> str | None:
        return next((line for line in self.lines if re.search(pattern, line)), None)


@pytest.mark.parametrize(("sig", "when"), [
    pytest.param(signal.SIGINT, "playing", id="SIGINT-while-playing"),
    pytest.param(signal.SIGTERM, "starting", id="SIGTERM-before-the-first-policy")])
def test_a_signal_ends_a_player_within_seconds_during_a_slow_download(
        sig: signal.Signals, when: str, served: Served, key_file: Path,
        tmp_path: Path) -> None:
    key, cache = load_key(key_file), tmp_path / "cache"
    first, slow = policy_bytes(100), policy_bytes(200)
    if when == "playing":
        served.offer(entry_for(100, first, key), first)
    else:  # no cache, the only policy drips: the player is still starting
        served.offer(entry_for(200, slow, key), slow, mode="drip")
    player = subprocess.Popen(
        [sys.executable, "-m", "runtime.infer", "--follow", served.url, "--key", str(key_file),
         "--cache", str(cache), "--interval", "0.2", "--timeout", "5"],
        cwd=ROOT, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = _Lines(player.stderr)
    try:
        if when == "playing":
            _wait_for(lambda: lines.find(r"playing policy step 100"), 60, "the first policy")
            served.offer(entry_for(200, slow, key), slow, mode="drip")
        _wait_for(lambda: served.requests(policy_file(200)), 60, "the slow download")
        _wait_for(lambda: _partials(cache), 10, "a partial file")
        time.sleep(0.5)
        assert player.poll() is None, "\n".join(lines.lines)
        player.send_signal(sig)
        began = time.monotonic()
        out, _ = player.communicate(timeout=30)
        took = time.monotonic() - began
    finally:
        if player.poll() is None:
            player.kill()
            player.communicate()
    stderr = "\n".join(lines.lines)
    print(f"{sig.name} while {when}: exit {player.returncode} after {took:.2f} s\n{stderr}\n{out}")
    assert player.returncode == 0, stderr
    assert took < 3.0, took
    assert "Traceback" not in stderr
    summary = json.loads(out)
    assert summary["games"] >= 0 and summary["source"] == served.url
    if when == "playing":
        assert summary["policies_played"] == [100] and summary["steps"] > 0
    else:
        assert summary["policies_played"] == [] and summary["stopped_before_play"]
    assert _partials(cache) == []


# -- never backwards: genuine entries served again ----------------------------------------------

RUN_A = {"id": "a1" * 8, "started": 1_700_000_000.0}
RUN_B = {"id": "b2" * 8, "started": 1_700_100_000.0}  # a --fresh start after A
RUN_OLD = {"id": "c3" * 8, "started": 1_600_000_000.0}  # a run before A that the device never saw


def run_entry(run: dict, step: int, key: bytes | None, sequence: int | None = None,
              **changes: object) -> tuple[dict, bytes]:
    """(the entry a daemon with run identity publishes at `step`, the policy's bytes)."""
    data = policy_bytes(step)
    fields = run_fields(run, sequence if sequence is not None else step // 1000 + 1)
    return entry_for(step, data, key, **fields, **changes), data


def _accepted(cache: Path) -> list[dict]:
    return json.loads((cache / "accepted.json").read_text())["runs"]


def test_a_restarted_device_refuses_an_older_genuine_entry_of_its_run(
        served: Served, key_file: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The cached step 32000 plays; the genuine step 2000 of the same run, now latest.json,
    is refused in one line, and stays refused without the cached policy too."""
    key, cache = load_key(key_file), tmp_path / "cache"
    served.offer(*run_entry(RUN_A, 32000, key))
    first = _follower(served.url, key_file, cache)
    first.start()
    first.close()
    assert _accepted(cache) == [{"run": RUN_A["id"], "started": RUN_A["started"],
                                 "step": 32000, "sequence": 33, "rollback": None}]
    served.offer(*run_entry(RUN_A, 2000, key))
    caplog.set_level(logging.INFO, logger="runtime.follow")
    again = _follower(served.url, key_file, cache)
    try:
        again.start()
        assert again.step == 32000 and isinstance(again.act(np.zeros(4, np.float32)), int)
        assert again.check() is None and again.check() is None  # the watcher: said once
    finally:
        again.close()
    warnings = _warnings(caplog)
    print("\n".join(warnings))
    assert warnings == [f"refused policy step 2000 from {served.url}: not newer than step "
                        f"32000 of its run {RUN_A['id']}, which this device already played; "
                        f"playing the cached policy of step 32000"]
    assert again.summary()["refused"][0]["step"] == 2000
    assert len(served.requests(policy_file(2000))) == 0  # refused before any download
    assert (cache / "current.json").read_text().count('"step": 32000') == 1
    # Without its cached policy the device still does not go back: it says why, both ways.
    (cache / policy_file(32000)).unlink()
    with pytest.raises(FollowError) as error:
        _follower(served.url, key_file, cache).start()
    print(error.value)
    assert "not newer than step 32000" in str(error.value)
    assert "holds no verified policy" in str(error.value)


def test_a_new_signed_run_is_followed_and_a_run_left_never_comes_back(
        served: Served, key_file: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    key, cache = load_key(key_file), tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="runtime.follow")
    served.offer(*run_entry(RUN_A, 32000, key))
    follower = _follower(served.url, key_file, cache)
    try:
        follower.start()
        served.offer(*run_entry(RUN_B, 2000, key, sequence=1))  # the learner's --fresh
        follower._ready = follower.check()
        assert follower.reload() and follower.step == 2000  # no cache clearing
        refusals = {  # genuine entries, served again
            "was left for": run_entry(RUN_A, 33000, key),  # a newer step of the run left
            "an older run": run_entry(RUN_OLD, 90000, key),  # a run before A, never seen
            "names no run": (entry_for(95000, policy_bytes(95000), key), policy_bytes(95000)),
        }
        for needle, (entry, data) in refusals.items():
            served.offer(entry, data)
            assert follower.check() is None and needle in follower.refused[-1]["reason"], \
                follower.refused
        assert follower.step == 2000
        served.offer(*run_entry(RUN_B, 3000, key, sequence=2))
        follower._ready = follower.check()
        assert follower.reload() and follower.step == 3000
    finally:
        follower.close()
    assert [(r["run"], r["step"]) for r in _accepted(cache)] == [(RUN_A["id"], 32000),
                                                                (RUN_B["id"], 3000)]
    # A restart: the run left stays left, whatever the source says.
    served.offer(*run_entry(RUN_A, 34000, key))
    again = _follower(served.url, key_file, cache)
    again.start()
    again.close()
    assert again.step == 3000
    lines = [m for m in (r.getMessage() for r in caplog.records) if "run" in m]
    print("\n".join(lines))
    assert f"playing policy step 2000 of run {RUN_B['id']} (policy-000000002000.onnx, a new " \
           f"run, was step 32000 of run {RUN_A['id']})" in lines
    assert lines[-2] == (f"refused policy step 34000 from {served.url}: run {RUN_A['id']} was "
                         f"left for run {RUN_B['id']}: this device never goes back to a run "
                         f"it left; playing the cached policy of step 3000")
    assert sorted(p.name for p in cache.iterdir()) == ["accepted.json", "current.json",
                                                       policy_file(3000)]


def test_without_a_key_only_steps_count_as_before_run_identities(
        served: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Unsigned old-format entries are followed as before; a new run waits for its steps,
    and a rollback is not followed without a key."""
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="runtime.follow")
    for step in (100, 200):
        served.offer(entry_for(step, policy_bytes(step), None), policy_bytes(step))
        follower = _follower(served.url, None, cache)  # a restart for each
        follower.start()
        follower.close()
        assert follower.step == step
    assert _accepted(cache) == [{"run": None, "started": None, "step": 200, "sequence": None,
                                 "rollback": None}]
    follower = _follower(served.url, None, cache)
    try:
        follower.start()
        served.offer(*run_entry(RUN_B, 150, None, sequence=1))
        assert follower.check() is None
        assert follower.refused[-1]["reason"] == ("not newer than step 200, which this "
                                                  "device already played")
        served.offer(*run_entry(RUN_A, 120, None, sequence=9,
                                replaces={"run": RUN_A["id"], "step": 200, "sequence": 8}))
        assert follower.check() is None
        assert "(a rollback is followed only with a key)" in follower.refused[-1]["reason"]
        served.offer(*run_entry(RUN_B, 300, None, sequence=2))
        follower._ready = follower.check()
        assert follower.reload() and follower.step == 300
        served.offer(entry_for(400, policy_bytes(400), None), policy_bytes(400))
        follower._ready = follower.check()  # steps only: the unnamed run's next step plays
        assert follower.reload() and follower.step == 400
    finally:
        follower.close()
    assert follower.summary()["policies_played"] == [200, 300, 400]
    print("\n".join(_warnings(caplog)))


def test_a_cache_from_before_run_identities_starts_from_its_policy(
        served: Served, key_file: Path, tmp_path: Path) -> None:
    """A cache with no accepted.json (a device updated from before run identities): its
    cached policy is the step it never goes below; the learner's first named run is taken."""
    key, cache = load_key(key_file), tmp_path / "cache"
    _cache_step(served.url, key_file, cache, served, 32000)  # an entry without a run
    (cache / "accepted.json").unlink()
    served.offer(entry_for(2000, policy_bytes(2000), key), policy_bytes(2000))
    follower = _follower(served.url, key_file, cache)
    follower.start()
    try:
        assert follower.step == 32000
        assert follower.refused[-1]["reason"] == ("not newer than step 32000, which this "
                                                  "device already played")
        assert _accepted(cache) == [{"run": None, "started": None, "step": 32000,
                                     "sequence": None, "rollback": None}]
        served.offer(*run_entry(RUN_A, 1000, key, sequence=1))  # the learner, updated
        follower._ready = follower.check()
        assert follower.reload() and follower.step == 1000
    finally:
        follower.close()
    (cache / "accepted.json").write_text("{not json")  # unreadable: the cache's run counts
    served.offer(*run_entry(RUN_A, 500, key, sequence=2))
    again = _follower(served.url, key_file, cache)
    again.start()
    again.close()
    assert again.step == 1000 and "not newer than step 1000" in again.refused[-1]["reason"]


# -- the whole attack on a device installed from the wheel --------------------------------------


class _Device:
    """`python -m runtime.infer --follow` from the torch-free wheel's venv, outside the
    repository, with the fleet's public key and its own cache: started, stopped, restarted."""

    def __init__(self, venv: dict, url: str, public_key: Path, home: Path) -> None:
        self.metrics_port = free_port()
        self.command = [str(venv["python"]), "-m", "runtime.infer", "--follow", url,
                        "--key", str(public_key), "--cache", str(home / "cache"),
                        "--interval", "0.2", "--timeout", "1", "--max-policy-mb", "1",
                        "--metrics-port", str(self.metrics_port)]
        self.home = home
        home.mkdir()
        self.process: subprocess.Popen[str] | None = None
        self.lines = _Lines(iter(()))

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, cwd=self.home, env=_device_env(),
                                        text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        self.lines = _Lines(self.process.stderr)

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        line = _wait_for(lambda: self.lines.find(pattern), timeout,
                         f"{pattern!r} in:\n" + "\n".join(self.lines.lines))
        print("device:", line)
        return str(line)

    def scrape(self, path: str) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.metrics_port}{path}")

    def stop(self) -> dict:
        """SIGTERM; the summary, after a clean exit within seconds."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            out, _ = self.process.communicate(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        stderr = "\n".join(self.lines.lines)
        assert self.process.returncode == 0 and "Traceback" not in stderr, stderr
        return json.loads(out)


def test_a_wheel_device_holds_against_the_served_directory_across_restarts(
        device_venv: dict, served: Served, tmp_path: Path) -> None:
    """Whoever can write the served directory, holding no key: a forged latest.json at start
    and while playing, an oversized entry, latest.json dripping, a genuine older entry
    across a restart; then the learner's --fresh run is followed and its old run refused."""
    fleet, attacker = make_key_pair(tmp_path, "fleet"), make_key_pair(tmp_path, "attacker")
    key = fleet.signer
    device = _Device(device_venv, served.url, fleet.public, tmp_path / "device")

    served.offer(*run_entry(RUN_A, 1000, key))
    device.start()
    device.wait_for(r"playing policy step 1000 ")
    assert device.stop()["policies_played"] == [1000]

    forged = policy_bytes(3000)
    served.offer(entry_for(3000, forged, attacker.signer, **run_fields(RUN_A, 4)), forged)
    device.start()  # a forged latest.json at start: the cached policy plays
    device.wait_for(rf"refused policy step 3000 from {served.url}: entry signed by key "
                    rf"{attacker.key_id}, which this device does not trust .*; playing the "
                    rf"cached policy of step 1000")
    served.offer(*run_entry(RUN_A, 2000, key))
    device.wait_for(r"playing policy step 2000 ")
    forged = policy_bytes(4000)
    served.offer(entry_for(4000, forged, attacker.signer, **run_fields(RUN_A, 5)), forged)
    device.wait_for(rf"refused policy step 4000: entry signed by key {attacker.key_id}")
    entry, data = run_entry(RUN_A, 5000, key, size=2 << 20)  # above --max-policy-mb 1
    served.offer(entry, data)
    device.wait_for(r"refused policy step 5000: entry size 2097152 bytes is above the limit")
    served.modes["latest.json"] = "drip"
    served.offer(*run_entry(RUN_A, 6000, key))
    served.modes["latest.json"] = "drip"
    device.wait_for(r"source problem, the current policy keeps playing")
    served.modes.pop("latest.json")
    device.wait_for(r"answers again")
    device.wait_for(r"playing policy step 6000 ")
    status, metrics = device.scrape("/metrics")
    for line in ("stream_agent_player_policy_step 6000.0",
                 'stream_agent_player_refused_total{kind="signature"} 2.0',
                 'stream_agent_player_refused_total{kind="size"} 1.0'):
        assert line in metrics.splitlines(), metrics
    status, health = device.scrape("/healthz")
    assert status == 200 and health.startswith("playing policy step 6000"), health
    summary = device.stop()
    assert summary["policies_played"] == [1000, 2000, 6000]
    assert [r["step"] for r in summary["refused"]] == [3000, 4000, 5000]
    assert summary["source_errors"] >= 1

    served.offer(*run_entry(RUN_A, 1000, key))  # a genuine older entry, across a restart
    device.start()
    device.wait_for(rf"refused policy step 1000 from {served.url}: not newer than step 6000 "
                    rf"of its run {RUN_A['id']}, which this device already played; playing "
                    rf"the cached policy of step 6000")
    served.offer(*run_entry(RUN_B, 500, key, sequence=1))  # the learner's --fresh run
    device.wait_for(rf"playing policy step 500 of run {RUN_B['id']}")
    served.offer(*run_entry(RUN_A, 7000, key))
    device.wait_for(rf"refused policy step 7000: run {RUN_A['id']} was left for run "
                    rf"{RUN_B['id']}")
    summary = device.stop()
    assert summary["policies_played"] == [6000, 500]
    assert [r["step"] for r in summary["refused"]] == [1000, 7000]
    assert sorted(p.name for p in (device.home / "cache").iterdir()) == [
        "accepted.json", "current.json", policy_file(500)]
