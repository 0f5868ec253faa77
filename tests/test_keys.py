"""Signing keys (runtime.device.keys, python -m runtime.keys): key files for whoever holds
them, signatures only a trusted key makes, and the commands that make and rotate keys."""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from runtime.device.keys import (
    KeyFileError,
    SignatureError,
    Signer,
    TrustedKeys,
    identify,
)
from runtime.device.manifest import ManifestError, canonical, parse_entry, sign
from runtime.keys import main
from tests.conftest import ROOT, KeyPair, _env, make_key_pair

ENTRY = {"format": 1, "step": 100, "file": "policy-000000000100.onnx", "sha256": "ab" * 32,
         "size": 1000, "env_id": "CartPole-v1"}


def _keys(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _flipped(signature: str) -> str:
    """The signature with one bit of it changed."""
    prefix, encoded = signature.rsplit(":", 1)
    raw = bytearray(base64.b64decode(encoded))
    raw[10] ^= 1
    return f"{prefix}:{base64.b64encode(bytes(raw)).decode()}"


def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# -- signatures ---------------------------------------------------------------------------------


def test_only_a_trusted_private_key_signs_what_a_device_takes(fleet: KeyPair,
                                                              tmp_path: Path) -> None:
    trusted = TrustedKeys.from_files([fleet.public])
    signed = sign(ENTRY, fleet.signer)
    assert signed["signature"].startswith(f"ed25519:{fleet.key_id}:")
    assert parse_entry(signed, trusted, 1 << 20).step == 100
    attacker = make_key_pair(tmp_path, "attacker")
    own = sign(ENTRY, attacker.signer)["signature"]
    forged = f"ed25519:{fleet.key_id}:{own.rsplit(':', 1)[1]}"  # claims the trusted key
    cases = {
        # an attacker's own key: named, and not trusted
        f"entry signed by key {attacker.key_id}, which this device does not trust (it "
        f"trusts Ed25519 key {fleet.key_id})": own,
        # whoever holds the public key has nothing to sign with: a signature by any other
        # key under the trusted key's id does not verify
        f"entry signature does not match the key {fleet.key_id}": forged,
        "entry is signed with a shared HMAC key, which this device does not trust":
            sign(ENTRY, b"s" * 64)["signature"],
        "entry signature does not match the key": _flipped(signed["signature"]),
        "is not 16 lower-case hex digits": "ed25519:NOTHEX:" + own.rsplit(":", 1)[1],
        "is neither hmac-sha256:<hex> nor ed25519:<key id>:<base64>": "rsa:1234",
    }
    for needle, signature in cases.items():
        with pytest.raises(SignatureError) as error:
            trusted.verify(canonical(ENTRY), signature)
        _one_line(error, needle)
    tampered = {**signed, "size": 999}  # a field changed after signing
    with pytest.raises(ManifestError, match="entry signature does not match the key"):
        parse_entry(tampered, trusted, 1 << 20)
    with pytest.raises(ManifestError, match="not signed"):
        parse_entry(ENTRY, trusted, 1 << 20)


def test_a_device_may_trust_several_keys_and_shared_secrets(fleet: KeyPair, tmp_path: Path,
                                                             key_file: Path) -> None:
    new = make_key_pair(tmp_path, "new")
    both = TrustedKeys.from_files([fleet.public, new.public, key_file, fleet.public])
    assert sorted(both.public) == sorted([fleet.key_id, new.key_id]) and len(both.secrets) == 1
    for signer in (fleet.signer, new.signer, Signer.from_file(key_file)):
        both.verify(canonical(ENTRY), signer.sign(canonical(ENTRY)))
    only_new = TrustedKeys.from_files([new.public])
    with pytest.raises(SignatureError, match=f"signed by key {fleet.key_id}, which this "
                                             f"device does not trust"):
        only_new.verify(canonical(ENTRY), fleet.signer.sign(canonical(ENTRY)))


def test_hmac_needs_only_the_standard_library(fleet: KeyPair, key_file: Path) -> None:
    """cryptography is imported when an Ed25519 key is read, never for HMAC; without it an
    Ed25519 key file is one line saying what to install."""
    probe = (
        "import sys\n"
        "sys.modules['cryptography'] = None  # not installed\n"
        "from runtime.device.keys import KeyFileError, Signer, TrustedKeys\n"
        "from runtime.device.manifest import parse_entry, sign\n"
        f"entry = sign({ENTRY!r}, Signer.from_file({str(key_file)!r}))\n"
        f"parse_entry(entry, TrustedKeys.from_files([{str(key_file)!r}]), 1 << 20)\n"
        "print(entry['signature'][:12])\n"
        "try:\n"
        f"    TrustedKeys.from_files([{str(fleet.public)!r}])\n"
        "except KeyFileError as exc:\n"
        "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=_env(), text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "hmac-sha256:", f"key file {fleet.public} is an Ed25519 key, which needs the "
                        f"cryptography package (pip install 'cryptography>=42')"]


# -- key files ----------------------------------------------------------------------------------


def test_each_key_file_is_checked_for_whoever_holds_it(
        fleet: KeyPair, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The learner's private key: refused when group or others may read it.
    fleet.private.chmod(0o644)
    with pytest.raises(KeyFileError) as error:
        Signer.from_file(fleet.private)
    _one_line(error, f"key file {fleet.private} may be read by group or others (mode 644)",
              f"chmod 600 {fleet.private}")
    fleet.private.chmod(0o400)
    assert Signer.from_file(fleet.private).key_id == fleet.key_id
    # ... and never taken by a device, which is told to hold the public key.
    with pytest.raises(KeyFileError) as error:
        TrustedKeys.from_files([fleet.private])
    _one_line(error, f"key file {fleet.private} is a private key, which only the learner may "
                     f"hold: give the device the public key ({fleet.public})")
    # A public key: anyone may read it; one that others may write works, with a warning.
    with pytest.raises(KeyFileError, match=f"{fleet.public} is a public key: the learner "
                                           f"signs with the private key"):
        Signer.from_file(fleet.public)
    caplog.set_level(logging.WARNING, logger="runtime.keys")
    fleet.public.chmod(0o644)
    TrustedKeys.from_files([fleet.public])
    assert caplog.records == []
    fleet.public.chmod(0o666)
    assert list(TrustedKeys.from_files([fleet.public]).public) == [fleet.key_id]
    assert [r.getMessage() for r in caplog.records] == [
        f"public key file {fleet.public} may be written by group or others (mode 666): "
        f"whoever replaces it chooses which policies this device trusts; "
        f"chmod 644 {fleet.public}"]


def test_a_key_file_that_is_not_a_key_is_one_line_naming_it(fleet: KeyPair,
                                                            tmp_path: Path) -> None:
    pem = fleet.public.read_bytes()
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    files = {
        "is not a readable PEM Ed25519 public key": b"-----BEGIN PUBLIC KEY-----\ngarbage\n"
                                                    b"-----END PUBLIC KEY-----\n",
        "is not a readable PEM Ed25519 public key (corrupt or cut short?)":
            pem[:len(pem) // 2],
        "is not a readable PEM Ed25519 private key": fleet.private.read_bytes()[:60],
        "holds another kind of key (": other,  # an ECDSA key
        "is a PEM 'OPENSSH PRIVATE KEY', not an Ed25519 'PRIVATE KEY' or 'PUBLIC KEY'":
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n",
        "holds 0 characters, fewer than 32": b"",
        "is larger than 65536 bytes: not a key": b"-----BEGIN PUBLIC KEY-----\n" + b"A" * 70000,
    }
    for number, (needle, data) in enumerate(files.items()):
        path = tmp_path / f"bad-{number}.key"
        path.write_bytes(data)
        path.chmod(0o600)
        with pytest.raises(KeyFileError) as error:
            identify(path)
        _one_line(error, f"key file {path}", needle)


# -- the commands -------------------------------------------------------------------------------


def test_new_makes_a_pair_and_never_replaces_a_key(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    old_umask = os.umask(0)  # the private key is 0600 whatever the umask
    try:
        code, out, err = _keys(["new", str(tmp_path / "fleet")], capsys)
    finally:
        os.umask(old_umask)
    assert (code, err) == (0, "")
    private, public = tmp_path / "fleet.key", tmp_path / "fleet.pub"
    assert (private.stat().st_mode & 0o777, public.stat().st_mode & 0o777) == (0o600, 0o644)
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    key_id = out.splitlines()[-1].split()[-1]
    assert out.splitlines() == [
        f"private key: {private} (mode 600; the learner's: export.key_file)",
        f"public key:  {public} (the devices': --key {public})", f"key id:      {key_id}"]
    # `id` prints the id the signatures carry
    code, out, _ = _keys(["id", str(private), str(public)], capsys)
    assert code == 0 and out.splitlines() == [
        f"{private}: Ed25519 private key, key id {key_id} (the learner's: export.key_file)",
        f"{public}: Ed25519 public key, key id {key_id} (a device's: --key)"]
    assert sign(ENTRY, Signer.from_file(private))["signature"].split(":")[1] == key_id
    # never over an existing key, nor half a pair
    before = private.read_bytes()
    code, out, err = _keys(["new", str(tmp_path / "fleet.key")], capsys)
    assert (code, out) == (2, "") and err == (
        f"keys: error: {private} exists: not replaced (a key in use would be lost); choose "
        f"another NAME\n")
    assert private.read_bytes() == before
    (tmp_path / "other.pub").write_text("mine\n")
    assert _keys(["new", str(tmp_path / "other")], capsys)[0] == 2
    assert not (tmp_path / "other.key").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.key", "fleet.pub",
                                                          "other.pub"]


def test_rotate_makes_the_new_pair_and_says_how_to_move(fleet: KeyPair, tmp_path: Path,
                                                        key_file: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    code, out, err = _keys(["rotate", str(tmp_path / "fleet"), str(tmp_path / "next")], capsys)
    assert (code, err) == (0, ""), err
    new_private, new_public = tmp_path / "next.key", tmp_path / "next.pub"
    new_id = identify(new_public)[1]
    print(out)
    for line in (f"--follow SOURCE --key {fleet.public} --key {new_public}",
                 f"--set export.key_file={new_private}", f"'signed by key {new_id}'",
                 f"--follow SOURCE --key {new_public}\n", f"delete {fleet.private} on the "
                                                          f"learner"):
        assert line in out
    assert f"in use: key id {fleet.key_id}" in out
    # From a shared secret to Ed25519: devices trust both the secret and the new key.
    code, out, _ = _keys(["rotate", str(key_file), str(tmp_path / "from-hmac")], capsys)
    assert code == 0 and f"--key {key_file} --key {tmp_path / 'from-hmac.pub'}" in out
    assert f"delete {key_file} everywhere" in out
    for argv, needle in (
            (["rotate", str(tmp_path / "none"), str(tmp_path / "x")], "neither"),
            (["rotate", str(tmp_path / "fleet"), str(tmp_path / "next")], "exists"),
            (["id"], "the following arguments are required: FILE"),
            (["sign"], "invalid choice: 'sign'")):
        code, out, err = _keys(argv, capsys)
        assert (code, out) == (2, "") and err.count("\n") == 1 and needle in err, err
        assert err.startswith("keys: error: ")
    assert not (tmp_path / "x.key").exists()
