"""A rollback the learner signs (runtime.daemon.rollback) and the devices that follow it.

Torch-free and fast: a run directory's policies are the tiny ONNX graphs of
tests/test_follow_attacks.py, published as a daemon with a run identity publishes them.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from runtime.daemon.process import RunDirLock
from runtime.daemon.rollback import main
from runtime.device.follow import Follower
from runtime.device.keys import Signer, TrustedKeys
from runtime.device.manifest import (
    index_bytes,
    load_key,
    manifest_bytes,
    parse_entry,
    policy_file,
    run_fields,
    sign,
)
from runtime.files import write_atomic
from tests.conftest import cli, make_key_pair
from tests.test_follow_attacks import RUN_A, entry_for, policy_bytes

STEPS = (1000, 2000, 3000, 4000)


def publish(run_dir: Path, key: Signer | bytes | None, step: int, run: dict | None = RUN_A) -> dict:
    """What the daemon's publisher does for `step`: the file, the entry (the next sequence
    of the run, signed), manifest.json and latest.json."""
    policies = run_dir / "policies"
    policies.mkdir(parents=True, exist_ok=True)
    data = policy_bytes(step)
    (policies / policy_file(step)).write_bytes(data)
    entries = _manifest(run_dir) if (policies / "manifest.json").exists() else []
    fields = run_fields(run, 1 + max((e.get("sequence", 0) for e in entries), default=0)) \
        if run is not None else {}
    entry = entry_for(step, data, key, **fields)
    write_atomic(policies / "manifest.json", manifest_bytes([*entries, entry]))
    write_atomic(policies / "latest.json", index_bytes(entry))
    return entry


def _manifest(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "policies" / "manifest.json").read_text())["policies"]


def _latest(run_dir: Path) -> dict:
    return json.loads((run_dir / "policies" / "latest.json").read_text())


def _follower(run_dir: Path, key_file: Path | None, cache: Path) -> Follower:
    return Follower(str(run_dir / "policies"), key_file=key_file, cache_dir=cache,
                    interval=3600)


def _take(follower: Follower) -> int | None:
    """One look of the watcher and the swap between games: the step playing then."""
    follower._ready = follower.check() or follower._ready
    follower.reload()
    return follower.step


def _serve_again(run_dir: Path, entry: dict) -> None:
    """Whoever can write the served directory puts `entry` back as latest.json (its file
    is still there, or put back too)."""
    policies = run_dir / "policies"
    (policies / entry["file"]).write_bytes(policy_bytes(entry["step"]))
    write_atomic(policies / "latest.json", json.dumps(entry).encode())


def _rollback(run_dir: Path, step: int, key_file: Path,
              capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["--run-dir", str(run_dir), "--to-step", str(step), "--key", str(key_file)])
    out, err = capsys.readouterr()
    return code, out, err


@dataclass(frozen=True)
class Signing:
    """How the learner signs and what a device trusts: `key` signs entries (as the daemon
    does), `learner_key` is the rollback's --key, `device_key` the Follower's."""

    key: Signer | bytes
    learner_key: Path
    device_key: Path
    trusted: TrustedKeys | bytes
    note: str  # what the device's "playing policy" line says of the signer


@pytest.fixture(params=["hmac", "ed25519"])
def signing(request: pytest.FixtureRequest, key_file: Path, tmp_path: Path) -> Signing:
    if request.param == "hmac":
        return Signing(load_key(key_file), key_file, key_file, load_key(key_file), "")
    pair = make_key_pair(tmp_path)
    return Signing(pair.signer, pair.private, pair.public,
                   TrustedKeys.from_files([pair.public]), f"signed by key {pair.key_id}, ")


def test_a_rollback_is_played_and_holds_across_a_restart(
        signing: Signing, tmp_path: Path, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    key, run_dir, cache = signing.key, tmp_path / "run", tmp_path / "cache"
    key_file = signing.device_key
    entries = {step: publish(run_dir, key, step) for step in STEPS}
    caplog.set_level(logging.INFO, logger="runtime.follow")
    follower = _follower(run_dir, key_file, cache)
    try:
        follower.start()
        assert follower.step == 4000
        code, out, err = _rollback(run_dir, 2000, signing.learner_key, capsys)
        print(out, err)
        assert (code, err) == (0, "") and out.count("\n") == 1
        assert "names the policy of step 2000 again (sequence 5 of run" in out
        latest = _latest(run_dir)
        assert latest == _manifest(run_dir)[-1] and len(_manifest(run_dir)) == 5
        assert latest["replaces"] == {"run": RUN_A["id"], "step": 4000, "sequence": 4}
        assert (latest["step"], latest["sequence"], latest["run"]) == (2000, 5, RUN_A["id"])
        assert {k: v for k, v in latest.items() if k not in (
            "sequence", "replaces", "signature")} == {
            k: v for k, v in entries[2000].items() if k not in ("sequence", "signature")}
        assert parse_entry(latest, signing.trusted, 1 << 20).replaces["step"] == 4000
        assert _take(follower) == 2000  # the learner said so
        assert isinstance(follower.act(np.zeros(4, np.float32)), int)
    finally:
        follower.close()
    # A restart plays the rollback from the cache, and the replaced policy stays refused.
    again = _follower(run_dir, key_file, cache)
    try:
        again.start()
        assert again.step == 2000 and again.refused == []
        _serve_again(run_dir, entries[4000])
        assert _take(again) == 2000
        assert "not newer than step 4000" in again.refused[-1]["reason"]
        publish(run_dir, key, 5000)  # the daemon goes on: devices follow it again
        assert _take(again) == 5000
    finally:
        again.close()
    assert again.summary()["policies_played"] == [2000, 5000]
    lines = [r.getMessage() for r in caplog.records]
    print("\n".join(lines))
    assert f"playing policy step 2000 of run {RUN_A['id']} (policy-000000002000.onnx, " \
           f"{signing.note}a rollback by the learner from step 4000, was step 4000)" in lines


def test_a_replayed_or_relabelled_rollback_is_refused(
        key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    key, run_dir = load_key(key_file), tmp_path / "run"
    entries = {step: publish(run_dir, key, step) for step in STEPS[:3]}
    behind = _follower(run_dir, key_file, tmp_path / "behind")  # it never saw step 4000
    behind.start()
    behind.close()
    entries[4000] = publish(run_dir, key, 4000)
    follower = _follower(run_dir, key_file, tmp_path / "cache")
    caplog.set_level(logging.INFO, logger="runtime.follow")
    try:
        follower.start()
        assert _rollback(run_dir, 2000, key_file, capsys)[0] == 0
        rollback = _latest(run_dir)
        fields = {k: v for k, v in rollback.items() if k != "signature"}
        forgeries = {
            # the genuine rollback without its signature
            "entry is not signed": fields,
            # an old genuine entry made to look like a rollback, not signed again
            "entry signature does not match the key": {
                **entries[1000], **run_fields(RUN_A, 99),
                "replaces": {"run": RUN_A["id"], "step": 4000, "sequence": 4}},
            # the rollback signed by someone else
            "does not match the key": sign(fields, secrets.token_hex(32).encode()),
        }
        for needle, entry in forgeries.items():
            _serve_again(run_dir, entry)
            assert _take(follower) == 4000 and needle in follower.refused[-1]["reason"]
        _serve_again(run_dir, rollback)
        assert _take(follower) == 2000
        publish(run_dir, key, 5000)
        assert _take(follower) == 5000
        _serve_again(run_dir, rollback)  # the genuine rollback, once more: too old now
        assert _take(follower) == 5000
        assert follower.refused[-1]["reason"] == (
            f"a rollback (sequence 5) not newer than sequence 6 of its run {RUN_A['id']}, "
            f"which this device already played")
    finally:
        follower.close()
    # A device that was at step 3000 takes the rollback; the step 4000 it replaced, served
    # again, is newer than anything that device played but older than the rollback.
    behind = _follower(run_dir, key_file, tmp_path / "behind")
    try:
        _serve_again(run_dir, rollback)
        behind.start()
        assert behind.step == 2000
        _serve_again(run_dir, entries[4000])
        assert _take(behind) == 2000
        assert behind.refused[-1]["reason"] == (
            f"published before the rollback (sequence 5) of its run {RUN_A['id']}, which "
            f"this device already played")
    finally:
        behind.close()
    print("\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING))


def test_a_rollback_of_entries_without_a_run_starts_a_named_one(
        key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A daemon from before run identities published the newest entry: the rollback names a
    new run, and a device that followed the unnamed run takes it."""
    key, run_dir = load_key(key_file), tmp_path / "run"
    for step in STEPS[:2]:
        publish(run_dir, key, step, run=None)
    follower = _follower(run_dir, key_file, tmp_path / "cache")
    try:
        follower.start()
        assert follower.step == 2000
        assert _rollback(run_dir, 1000, key_file, capsys)[0] == 0
        latest = _latest(run_dir)
        assert latest["replaces"] == {"run": None, "step": 2000, "sequence": None}
        assert latest["sequence"] == 1 and latest["run"] != RUN_A["id"]
        assert _take(follower) == 1000
    finally:
        follower.close()


def test_bad_input_is_one_line_and_exit_2(key_file: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    key, run_dir = load_key(key_file), tmp_path / "run"
    for step in STEPS[:3]:
        publish(run_dir, key, step)
    (tmp_path / "short.key").write_text("0123\n")
    (tmp_path / "short.key").chmod(0o600)
    before = (run_dir / "policies" / "latest.json").read_bytes()
    run, good = ["--run-dir", str(run_dir)], ["--key", str(key_file)]
    cases = {
        "--to-step: no policy of step 1234 is kept in": [*run, "--to-step", "1234", *good],
        "the policy of step 3000 is the newest one already": [*run, "--to-step", "3000",
                                                              *good],
        "the following arguments are required: --key": [*run, "--to-step", "1000"],
        "--key: cannot read key file": [*run, "--to-step", "1000", "--key",
                                        str(tmp_path / "none")],
        "fewer than 32": [*run, "--to-step", "1000", "--key", str(tmp_path / "short.key")],
        "argument --to-step: invalid int value: 'two'": [*run, "--to-step", "two", *good],
        "--to-step: -5 is not a step": [*run, "--to-step", "-5", *good],
        "is not a directory": ["--run-dir", str(tmp_path / "nowhere"), "--to-step", "1000",
                               *good],
    }
    said = []
    for needle, argv in cases.items():
        assert main(argv) == 2, needle
        out, err = capsys.readouterr()
        said.append(err)
        assert out == "" and err.count("\n") == 1 and err.startswith("rollback: error: ")
        assert needle in err, err
    (run_dir / "policies" / policy_file(1000)).unlink()
    code, out, err = _rollback(run_dir, 1000, key_file, capsys)
    said.append(err)
    assert (code, out) == (2, "") and "policy-000000001000.onnx is missing" in err
    lock = RunDirLock(run_dir)  # the daemon runs
    try:
        code, _, err = _rollback(run_dir, 2000, key_file, capsys)
    finally:
        lock.release()
    said.append(err)
    assert code == 2 and "is in use by pid" in err and "stop the daemon first" in err
    print("".join(said), end="")
    assert (run_dir / "policies" / "latest.json").read_bytes() == before  # nothing written
    # The command as an operator runs it.
    done = cli("runtime.daemon.rollback", "--run-dir", str(run_dir), "--to-step", "1234",
               "--key", str(key_file), timeout=60)
    print(done.stderr, end="")
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1
    assert "no policy of step 1234 is kept" in done.stderr
