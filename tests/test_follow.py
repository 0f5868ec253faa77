"""A device following published policies: entry checks, signatures, sources, the Follower."""

from __future__ import annotations

import http.server
import json
import logging
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.learner import A2CLearner
from runtime.daemon.config import load_config
from runtime.daemon.export import policy_weights, stream_spec
from runtime.daemon.publish import PolicyWriter
from runtime.device.follow import Follower, FollowError
from runtime.device.manifest import (
    Accepted,
    KeyFileError,
    ManifestError,
    canonical,
    load_key,
    parse_entry,
    policy_file,
    sha256_file,
    sign,
)
from runtime.device.monitoring import PlayerTally, player_health, player_metrics
from runtime.device.sources import Source, SourceError
from runtime.monitoring import MetricsServer
from tests.conftest import ROOT, http_get

MAX = 10 << 20
RUN = "0123456789abcdef"
named = {"run": RUN, "run_started": 1.5, "sequence": 3}  # an entry with a run identity


def _writer(base: Path, env_id: str, key: bytes) -> tuple[PolicyWriter, A2CLearner]:
    config = load_config(ROOT / "config.yaml", [f"env.id={env_id}", f"run.dir={base}"])
    spec = stream_spec(config)
    learner = A2CLearner(config.agent, spec.observation_shape, spec.num_actions)
    as_dict = {"network": learner.network_name, "num_actions": spec.num_actions,
               "observation_shape": list(spec.observation_shape),
               "observation_dtype": spec.observation_dtype}
    return PolicyWriter(config, as_dict, base / "policies", key, keep=10), learner


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Signed CartPole policies at steps 100, 200, 300 and an Acrobot one at 250."""
    base = tmp_path_factory.mktemp("published")
    key_file = base / "policy.key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    key_file.chmod(0o600)
    key = load_key(key_file)
    writer, learner = _writer(base / "cartpole", "CartPole-v1", key)
    entries = {}
    for step in (100, 200, 300):
        entries[step] = writer.publish({"step": step, "weights": policy_weights(
            learner.net.policy()), "recent_returns": [], "created_at": time.time()})
    other, acro = _writer(base / "acrobot", "Acrobot-v1", key)
    acrobot = other.publish({"step": 250, "weights": policy_weights(acro.net.policy()),
                             "recent_returns": [], "created_at": time.time()})
    return {"key_file": key_file, "key": key, "entries": entries, "acrobot": acrobot,
            "files": {**{s: writer.directory / e["file"] for s, e in entries.items()},
                      "acrobot": other.directory / acrobot["file"]}}


def _offer(source: Path, entry: dict, data: bytes | None) -> None:
    """Publish `entry` as latest.json in `source`, with `data` as its file (None: no file)."""
    source.mkdir(exist_ok=True)
    if data is not None:
        (source / entry["file"]).write_bytes(data)
    (source / "latest.json").write_text(json.dumps(entry))


def _resign(entry: dict, key: bytes | None, **changes: object) -> dict:
    fields = {k: v for k, v in entry.items() if k != "signature"}
    fields.update(changes)
    return sign(fields, key) if key is not None else fields


# -- entries and keys --------------------------------------------------------------------------


def test_entries_are_checked_before_anything_is_downloaded(published: dict) -> None:
    key, good = published["key"], published["entries"][100]
    assert parse_entry(good, key, MAX).file == "policy-000000000100.onnx"
    assert canonical(good) == canonical({**good, "signature": "anything"})
    cases = {
        "not an object": (["a"], key),
        "format": (_resign(good, key, format=2), key),
        "not 'policy-000000000100.onnx'": (_resign(good, key, file="../../etc/passwd"), key),
        "is not 'policy-000000000007.onnx'": (_resign(good, key, step=7), key),
        "sha256": (_resign(good, key, sha256="ABC"), key),
        "above the limit": (_resign(good, key, size=MAX + 1), key),
        "not an integer": (_resign(good, key, size="big"), key),
        "not signed": (_resign(good, None), key),
        "does not match the key": ({**good, "step": 100, "mean_return": 1e9}, key),
        "entry run 'Run-1' is not 8 to 64": (_resign(good, key, run="Run-1"), key),
        "entry has 'sequence' but no run": (_resign(good, key, sequence=3), key),
        "run_started 'yesterday' is not a time": (_resign(good, key, run=RUN, sequence=1,
                                                          run_started="yesterday"), key),
        "'sequence' is 0, not an integer >= 1": (_resign(good, key, run=RUN, sequence=0,
                                                         run_started=1.5), key),
        'replaces {"step": "x"} is not': (_resign(good, key, **named, replaces={"step": "x"}),
                                          key),
    }
    for needle, (entry, with_key) in cases.items():
        with pytest.raises(ManifestError, match=needle.replace("(", r"\(")):
            parse_entry(entry, with_key, MAX)
    with pytest.raises(ManifestError, match="does not match the key"):
        parse_entry(good, b"k" * 64, MAX)
    assert parse_entry(_resign(good, None), None, MAX).step == 100  # no key, no signature
    rollback = parse_entry(_resign(good, key, **named, replaces={"run": RUN, "step": 300,
                                                                 "sequence": 2}), key, MAX)
    assert (rollback.run, rollback.run_started, rollback.sequence, rollback.replaces) == (
        RUN, 1.5, 3, {"run": RUN, "step": 300, "sequence": 2})
    assert parse_entry(good, key, MAX).run is None  # published before run identities


def test_what_a_device_accepted_is_read_back_or_refused_in_one_line(published: dict) -> None:
    key = published["key"]
    older = parse_entry(published["entries"][100], key, MAX)
    newer = parse_entry(_resign(published["entries"][200], key, **named), key, MAX)
    state = Accepted().record(older).record(newer)
    assert Accepted.from_json(state.to_json()).runs == state.runs
    assert [(r.run, r.step, r.sequence) for r in state.runs] == [(None, 100, None),
                                                                 (RUN, 200, 3)]
    assert "was left for run" in state.refuses(older, signed=True)
    assert state.refuses(older, signed=False).startswith("not newer than step 200")
    for raw, needle in ((b"[]", "is not {format: 1"), (b"{", "not JSON"),
                        (b'{"format": 1, "runs": [{"run": "x", "step": 1}]}', "a run that"),
                        (state.to_json().replace(b'"runs": [', b'"runs": [' + json.dumps(
                            {"run": RUN, "step": 1}).encode() + b","), "names a run twice")):
        with pytest.raises(ManifestError, match=re.escape(needle)):
            Accepted.from_json(raw)


def test_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_key(tmp_path / "none")
    (tmp_path / "short").write_text("0123\n")
    (tmp_path / "short").chmod(0o600)
    with pytest.raises(KeyFileError, match="secrets.token_hex"):
        load_key(tmp_path / "short")
    good = tmp_path / "good"
    good.write_text(" " + "ab" * 32 + "\n")
    for mode in (0o644, 0o640, 0o604):  # anyone beside the owner who can read it can sign
        good.chmod(mode)
        with pytest.raises(KeyFileError, match=f"group or others \\(mode {mode:o}\\)"):
            load_key(good)
    good.chmod(0o600)
    assert load_key(good) == b"ab" * 32
    good.chmod(0o400)
    assert load_key(good) == b"ab" * 32


def test_a_directory_source_never_reads_outside_itself(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "secret.onnx").write_bytes(b"x" * 10)
    (tmp_path / "src" / "policy-000000000001.onnx").symlink_to(tmp_path / "secret.onnx")
    source = Source(str(tmp_path / "src"))
    with pytest.raises(SourceError, match="outside"):
        source.download("policy-000000000001.onnx", tmp_path / "out", 10, 5)
    for name in ("../secret.onnx", "/etc/passwd", ".."):
        with pytest.raises(SourceError, match="plain file name"):
            source.download(name, tmp_path / "out", 10, 5)
    with pytest.raises(ValueError, match="http"):
        Source("ftp://example.org/policies")


# -- the Follower on a directory ---------------------------------------------------------------


def test_follower_swaps_between_episodes_and_refuses_bad_policies(published: dict,
                                                                  tmp_path: Path) -> None:
    source, cache = tmp_path / "source", tmp_path / "cache"
    entries, files, key = published["entries"], published["files"], published["key"]
    _offer(source, entries[100], files[100].read_bytes())
    follower = Follower(str(source), key_file=published["key_file"], cache_dir=cache,
                        interval=3600)
    try:
        follower.start()
        assert follower.step == 100 and follower.num_actions == 2
        assert isinstance(follower.act(np.zeros(4, np.float32)), int)
        _offer(source, entries[200], files[200].read_bytes())
        assert follower.check() is not None
        follower._ready = follower.check() or follower._ready
        assert follower.step == 100  # nothing changes until the episode ends
        assert follower.reload() and follower.step == 200 and not follower.reload()

        good300 = files[300].read_bytes()
        corrupt = bytearray(good300)
        corrupt[len(corrupt) // 2] ^= 0xFF
        acro = published["acrobot"]
        lying = _resign(acro, key, env_id="CartPole-v1")  # an Acrobot model as CartPole
        refusals = [
            ("sha256", entries[300], bytes(corrupt)),
            ("made for Acrobot-v1", acro, None),  # refused before any download
            ("the model says step 250 of Acrobot-v1",
             {**lying, "step": 300, "file": policy_file(300)}, None),
            ("does not match the key", _resign(entries[300], b"w" * 64), good300),
            ("not signed", _resign(entries[300], None), good300),
            ("above the limit", _resign(entries[300], key, size=MAX * 10), good300),
            ("is not 'policy-000000000300.onnx'",
             _resign(entries[300], key, file="../escape.onnx"), None),
        ]
        for needle, entry, data in refusals:
            if needle.startswith("the model says"):
                entry = _resign({**entry, "sha256": sha256_file(files["acrobot"]),
                                 "size": files["acrobot"].stat().st_size}, key, step=300,
                                file=policy_file(300))
                data = files["acrobot"].read_bytes()
            _offer(source, entry, data)
            assert follower.check() is None, needle
            assert needle in follower.refused[-1]["reason"], follower.refused[-1]
            assert follower.check() is None and needle in follower.refused[-1]["reason"]
        assert len(follower.refused) == len(refusals)  # each refused once, not every look
        assert {k: n for k, n in follower.refusals.items() if n} == {
            "checksum": 1, "environment": 1, "model": 1, "signature": 2, "size": 1, "entry": 1}
        assert time.time() - follower.last_good_look < 60
        assert not (tmp_path / "escape.onnx").exists()
        assert sorted(p.name for p in cache.iterdir()) == ["accepted.json", "current.json",
                                                           "policy-000000000200.onnx"]

        truncated = dict(entries[300])
        _offer(source, truncated, good300[:1000])
        errors = follower.source_errors
        assert follower.check() is None and follower.source_errors == errors + 1
        assert "truncated" not in json.dumps(follower.refused)  # a transfer problem: retried
        _offer(source, entries[300], good300)
        follower._ready = follower.check()
        assert follower.reload() and follower.step == 300
        summary = follower.summary()
        assert summary["policies_played"] == [100, 200, 300]
        assert [r["step"] for r in summary["refused"]] == [300, 250, 300, 300, 300, 300, 300]
    finally:
        follower.close()


def test_a_players_metrics_and_health_say_what_it_plays_and_refuses(published: dict,
                                                                     tmp_path: Path) -> None:
    source = tmp_path / "source"
    entries, files = published["entries"], published["files"]
    _offer(source, entries[200], files[200].read_bytes())
    follower = Follower(str(source), key_file=published["key_file"],
                        cache_dir=tmp_path / "cache", interval=3600)
    tally = PlayerTally()
    server = MetricsServer("127.0.0.1", 0, lambda: player_metrics(follower, tally),
                           lambda: player_health(follower, tally))
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert http_get(base + "/healthz") == (503, "not playing yet\n")
        assert "stream_agent_player_policy_step NaN" in http_get(base + "/metrics")[1]
        follower.start()
        stepping = tally.stepping(lambda: False)
        assert stepping() is False
        for game_return in (1.0, 2.0, 6.0):
            tally.game(game_return)
        _offer(source, _resign(entries[300], b"w" * 64), files[300].read_bytes())  # forged
        assert follower.check() is None
        _offer(source, entries[100], files[100].read_bytes())  # older
        assert follower.check() is None
        status, metrics = http_get(base + "/metrics")
        assert status == 200
        for line in ("stream_agent_player_policy_step 200.0",
                     "stream_agent_player_games_total 3.0",
                     "stream_agent_player_recent_games 3.0",
                     "stream_agent_player_recent_mean_return 3.0",
                     'stream_agent_player_refused_total{kind="signature"} 1.0',
                     'stream_agent_player_refused_total{kind="older"} 1.0',
                     'stream_agent_player_refused_total{kind="checksum"} 0.0',
                     "stream_agent_player_source_errors_total 0.0"):
            assert line in metrics.splitlines(), line
        look = re.search(r"^stream_agent_player_last_good_look_timestamp_seconds (\S+)$",
                         metrics, re.M)
        assert look and time.time() - float(look.group(1)) < 60
        status, line = http_get(base + "/healthz")
        assert status == 200 and line.startswith("playing policy step 200; the source last "
                                                 "read"), line
        tally.last_step_at = time.monotonic() - 120
        assert http_get(base + "/healthz") == (503, "stalled: no step for 120 s\n")
        tally.stopped = True
        assert http_get(base + "/healthz") == (503, "not playing: stopped\n")
    finally:
        server.close()
        follower.close()


def test_a_restart_with_the_source_down_plays_the_cached_policy(published: dict,
                                                                tmp_path: Path) -> None:
    source, cache = tmp_path / "source", tmp_path / "cache"
    _offer(source, published["entries"][200], published["files"][200].read_bytes())
    first = Follower(str(source), key_file=published["key_file"], cache_dir=cache)
    first.start()
    first.close()
    shutil.rmtree(source)
    again = Follower(str(source), key_file=published["key_file"], cache_dir=cache)
    again.start()
    assert again.step == 200
    again.close()
    (cache / "policy-000000000200.onnx").write_bytes(b"tampered")
    with pytest.raises(FollowError, match="no policy could be obtained"):
        Follower(str(source), key_file=published["key_file"], cache_dir=cache).start()
    with pytest.raises(FollowError, match="no policy could be obtained"):
        Follower(str(source), cache_dir=tmp_path / "empty").start()


# -- over HTTP ---------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    mode = "normal"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.mode == "slow":
            time.sleep(1.5)
        if self.mode == "garbage":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>it works</html>")
            return
        if self.mode == "short" and self.path.endswith(".onnx"):
            self.send_response(200)
            self.send_header("Content-Length", "999999")
            self.end_headers()
            self.wfile.write(b"x" * 100)
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, type[_Handler], Path]]:
    root = tmp_path / "served"
    root.mkdir()
    handler = type("Handler", (_Handler,), {"mode": "normal"})

    def factory(*args: object, **kwargs: object) -> _Handler:
        return handler(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
    httpd.handle_error = lambda *args: None  # a client that gave up on the slow server
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", handler, root
    httpd.shutdown()
    httpd.server_close()


def test_over_http_a_bad_server_is_logged_and_play_goes_on(
        published: dict, server: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url, handler, root = server
    entries, files = published["entries"], published["files"]
    _offer(root, entries[100], files[100].read_bytes())
    follower = Follower(Source(url, timeout=0.5), key_file=published["key_file"],
                        cache_dir=tmp_path / "cache", interval=3600)
    caplog.set_level(logging.INFO, logger="runtime.follow")
    try:
        follower.start()
        _offer(root, entries[200], files[200].read_bytes())
        for mode, needle in (("garbage", "not JSON"), ("slow", "timed out")):
            handler.mode = mode
            for _ in range(2):
                with pytest.raises(SourceError, match=needle):
                    follower.check()
        handler.mode = "short"
        assert follower.check() is None and follower.step == 100 and not follower.refused
        handler.mode = "normal"
        follower._ready = follower.check()
        assert follower.reload() and follower.step == 200
    finally:
        follower.close()
    problems = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([p for p in problems if "not JSON" in p]) == 1  # once per outage, not per look
    assert len([p for p in problems if "timed out" in p]) == 1
    assert any("not fetched" in p and "bytes" in p for p in problems)
    assert any("answers again" in r.getMessage() for r in caplog.records)
