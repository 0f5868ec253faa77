"""The keys that sign published policies: the learner signs with a `Signer`, a device checks
with `TrustedKeys`.

Two kinds of key file:

- Ed25519 (recommended): the learner holds the private key (PEM PKCS8,
  ``-----BEGIN PRIVATE KEY-----``), devices hold only its public key (PEM
  SubjectPublicKeyInfo, ``-----BEGIN PUBLIC KEY-----``), so neither a device nor whoever
  takes one can sign. A signature is ``ed25519:<key id>:<base64>``; the key id (the first
  16 hex digits of the SHA-256 of the raw 32-byte public key) lets a device that trusts
  several keys (during a rotation) pick the one named, and lets a log line say which key
  signed.
- HMAC-SHA256 (any other file: a shared secret of at least 32 characters): the standard
  library alone, but every device holds what signs. ``hmac-sha256:<hex>``.

Ed25519 uses PyCA `cryptography`: well kept and audited, with binary wheels for x86_64 and
aarch64 (manylinux included), so a small device installs it without a compiler. It is
imported only when an Ed25519 key file is read: HMAC works with the standard library alone.

Files that sign (a private key, a shared secret) are refused when group or others may read
them; a public key may be read by anyone, but one that group or others may write gets a
warning (whoever replaces it chooses what the device trusts). Every problem is one line
naming the file (KeyFileError); a signature that does not verify is a SignatureError.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HMAC_PREFIX = "hmac-sha256:"
ED25519_PREFIX = "ed25519:"
MIN_SECRET_CHARS = 32  # `python -c 'import secrets; print(secrets.token_hex(32))'` gives 64
MAX_KEY_FILE_BYTES = 1 << 16  # a PEM key is a few hundred bytes: never read more
PRIVATE, PUBLIC, SECRET = "private", "public", "secret"  # what a key file holds
KIND_NAMES = {PRIVATE: "Ed25519 private key", PUBLIC: "Ed25519 public key",
              SECRET: "HMAC-SHA256 shared secret"}
MAKE_KEYS = "python -m runtime.keys new NAME"
_PEM_BEGIN = b"-----BEGIN "
_PEM_LABELS = {b"PRIVATE KEY": PRIVATE, b"PUBLIC KEY": PUBLIC}
_KEY_ID = re.compile(r"[0-9a-f]{16}")

log = logging.getLogger("runtime.keys")


class KeyFileError(ValueError):
    """A key file that cannot be used (unreadable, too open, corrupt, the wrong kind for its
    holder); one line naming the file."""


class SignatureError(ValueError):
    """A signature that does not verify with any trusted key; one line."""


# -- reading key files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFile:
    """A key file's bytes, what they hold (PRIVATE, PUBLIC or SECRET), and its mode bits
    (None where the platform has none)."""

    name: str
    kind: str
    data: bytes
    mode: int | None


def read_key_file(path: str | Path) -> KeyFile:
    """Read (bounded) and classify a key file by its PEM label; KeyFileError for a file that
    cannot be read or is a PEM of another kind (an OpenSSH key, a certificate, ...)."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path} ({exc.strerror or exc})") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes: "
                           f"not a key")
    return KeyFile(str(path), _kind(data, path), data,
                   stat.S_IMODE(mode) if os.name == "posix" else None)


def _kind(data: bytes, path: str | Path) -> str:
    text = data.lstrip()
    if not text.startswith(_PEM_BEGIN):
        return SECRET
    label = text[len(_PEM_BEGIN):].split(b"-----", 1)[0]
    if label in _PEM_LABELS:
        return _PEM_LABELS[label]
    shown = label[:40].decode("ascii", "replace")
    raise KeyFileError(f"key file {path} is a PEM {shown!r}, not an Ed25519 'PRIVATE KEY' "
                       f"or 'PUBLIC KEY' (make a key pair with: {MAKE_KEYS})")


def _refuse_if_readable(key: KeyFile) -> None:
    """Whoever reads a private key or a shared secret can sign policies every device takes."""
    if key.mode is not None and key.mode & 0o077:
        raise KeyFileError(f"key file {key.name} may be read by group or others (mode "
                           f"{key.mode:o}): anyone who reads it can sign policies; "
                           f"chmod 600 {key.name}")


def _warn_if_writable(key: KeyFile) -> None:
    """A public key may be read by anyone; whoever may replace it chooses what is trusted."""
    if key.mode is not None and key.mode & 0o022:
        log.warning("public key file %s may be written by group or others (mode %o): whoever "
                    "replaces it chooses which policies this device trusts; chmod 644 %s",
                    key.name, key.mode, key.name)


def _secret(key: KeyFile) -> bytes:
    """The shared secret: the file's text, surrounding whitespace stripped."""
    _refuse_if_readable(key)
    secret = key.data.strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise KeyFileError(f"key file {key.name} holds {len(secret)} characters, fewer than "
                           f"{MIN_SECRET_CHARS} (make a key pair with: {MAKE_KEYS}; or a "
                           f"shared secret with: python -c 'import secrets; "
                           f"print(secrets.token_hex(32))' > {key.name})")
    return secret


def load_secret(path: str | Path) -> bytes:
    """The HMAC shared secret of a key file (KeyFileError for an Ed25519 key)."""
    key = read_key_file(path)
    if key.kind != SECRET:
        raise KeyFileError(f"key file {path} is an {KIND_NAMES[key.kind]}, not a shared "
                           f"secret")
    return _secret(key)


def _sibling(name: str, suffix: str) -> str:
    """NAME.key -> NAME.pub and back; otherwise a description of the matching file."""
    path = Path(name)
    if path.suffix in (".key", ".pub"):
        return str(path.with_suffix(suffix))
    return f"the {suffix} file made with it"


# -- Ed25519 through cryptography, imported when first needed ---------------------------------


def _crypto(name: str = "") -> SimpleNamespace:
    """cryptography's Ed25519 and PEM modules; KeyFileError naming the key file `name`
    without them."""
    try:
        from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise KeyFileError(f"key file {name} is an Ed25519 key, which needs the cryptography "
                           f"package (pip install 'cryptography>=42')") from None
    return SimpleNamespace(serialization=serialization, ed25519=ed25519,
                           InvalidSignature=InvalidSignature,
                           UnsupportedAlgorithm=UnsupportedAlgorithm)


def _pem_key(key: KeyFile) -> Any:
    """The Ed25519 key object of a PRIVATE or PUBLIC key file."""
    crypto = _crypto(key.name)
    serialization = crypto.serialization
    try:
        if key.kind == PRIVATE:
            loaded = serialization.load_pem_private_key(key.data, password=None)
            wanted = crypto.ed25519.Ed25519PrivateKey
        else:
            loaded = serialization.load_pem_public_key(key.data)
            wanted = crypto.ed25519.Ed25519PublicKey
    except (ValueError, TypeError, crypto.UnsupportedAlgorithm):
        raise KeyFileError(f"key file {key.name} is not a readable PEM "
                           f"{KIND_NAMES[key.kind]} (corrupt or cut short?)") from None
    if not isinstance(loaded, wanted):
        raise KeyFileError(f"key file {key.name} holds another kind of key "
                           f"({type(loaded).__name__}), not an {KIND_NAMES[key.kind]} (make "
                           f"a key pair with: {MAKE_KEYS})")
    return loaded


def key_id(public_key: Any) -> str:
    """The first 16 hex digits of the SHA-256 of an Ed25519 public key's raw 32 bytes."""
    serialization = _crypto().serialization
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signed_by(signature: Any) -> str | None:
    """The key id an Ed25519 signature names, else None (unchecked: for log lines of
    entries already verified)."""
    if isinstance(signature, str) and signature.startswith(ED25519_PREFIX):
        named = signature[len(ED25519_PREFIX):].split(":", 1)[0]
        return named if _KEY_ID.fullmatch(named) else None
    return None


# -- the learner's side ---------------------------------------------------------------------------


class Signer:
    """What the learner signs entries with: an Ed25519 private key or an HMAC secret.

    A key object does not pickle; `material` (the key file's bytes) and `name` do, and
    Signer.load(material, name) rebuilds the signer in another process."""

    def __init__(self, kind: str, key: Any, material: bytes, name: str) -> None:
        self.kind = kind  # PRIVATE or SECRET
        self._key = key   # an Ed25519PrivateKey, or the secret's bytes
        self.material = material
        self.name = name
        self.key_id = key_id(key.public_key()) if kind == PRIVATE else None

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        """The signer of a private key or shared secret file, readable by its owner only."""
        return cls._of(read_key_file(path))

    @classmethod
    def load(cls, material: bytes, name: str) -> Signer:
        """The signer of a key file's bytes (as `material` keeps them); no mode check."""
        return cls._of(KeyFile(name, _kind(material, name), material, None))

    @classmethod
    def from_secret(cls, secret: bytes) -> Signer:
        """An HMAC signer of a secret already in memory."""
        return cls(SECRET, secret, secret, "(a shared secret)")

    @classmethod
    def _of(cls, key: KeyFile) -> Signer:
        if key.kind == PUBLIC:
            raise KeyFileError(f"key file {key.name} is a public key: the learner signs with "
                               f"the private key ({_sibling(key.name, '.key')})")
        if key.kind == SECRET:
            return cls(SECRET, _secret(key), key.data, key.name)
        private = _pem_key(key)
        _refuse_if_readable(key)
        return cls(PRIVATE, private, key.data, key.name)

    def sign(self, payload: bytes) -> str:
        if self.kind == SECRET:
            return HMAC_PREFIX + hmac.new(self._key, payload, hashlib.sha256).hexdigest()
        signature = base64.b64encode(self._key.sign(payload)).decode()
        return f"{ED25519_PREFIX}{self.key_id}:{signature}"


# -- a device's side ------------------------------------------------------------------------------


class TrustedKeys:
    """The keys a device takes entries signed by: Ed25519 public keys (by key id) and HMAC
    secrets, any number of each (several during a rotation)."""

    def __init__(self, public: dict[str, Any] | None = None,
                 secrets: Sequence[bytes] = ()) -> None:
        self.public = dict(public or {})
        self.secrets = tuple(secrets)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path]) -> TrustedKeys:
        """Public keys and shared secrets; a private key is refused (a device never holds
        what signs for the whole fleet)."""
        public: dict[str, Any] = {}
        secrets: list[bytes] = []
        for path in paths:
            key = read_key_file(path)
            if key.kind == PRIVATE:
                raise KeyFileError(f"key file {path} is a private key, which only the learner "
                                   f"may hold: give the device the public key "
                                   f"({_sibling(key.name, '.pub')})")
            if key.kind == SECRET:
                secret = _secret(key)
                if secret not in secrets:
                    secrets.append(secret)
                continue
            loaded = _pem_key(key)
            _warn_if_writable(key)
            public[key_id(loaded)] = loaded
        return cls(public, secrets)

    @classmethod
    def from_secret(cls, secret: bytes) -> TrustedKeys:
        return cls(secrets=(secret,))

    def describe(self) -> str:
        """What this device trusts, for a refusal's line."""
        parts = []
        if self.public:
            parts.append(("Ed25519 key " if len(self.public) == 1 else "Ed25519 keys ")
                         + ", ".join(sorted(self.public)))
        if self.secrets:
            parts.append("a shared HMAC key" if len(self.secrets) == 1
                         else f"{len(self.secrets)} shared HMAC keys")
        return " and ".join(parts) or "no key"

    def verify(self, payload: bytes, signature: str) -> None:
        """SignatureError (one line) unless `signature` is a trusted key's over `payload`."""
        if signature.startswith(HMAC_PREFIX):
            if not self.secrets:
                raise SignatureError(f"entry is signed with a shared HMAC key, which this "
                                     f"device does not trust (it trusts {self.describe()})")
            given = signature.encode()
            if not any(hmac.compare_digest(given, Signer.from_secret(s).sign(payload).encode())
                       for s in self.secrets):
                raise SignatureError("entry signature does not match the key")
            return
        if not signature.startswith(ED25519_PREFIX):
            raise SignatureError(f"entry signature {signature[:40]!r} is neither "
                                 f"{HMAC_PREFIX}<hex> nor {ED25519_PREFIX}<key id>:<base64>")
        named, _, encoded = signature[len(ED25519_PREFIX):].partition(":")
        if not _KEY_ID.fullmatch(named):
            raise SignatureError(f"entry signature names no key id ({named[:40]!r} is not "
                                 f"16 lower-case hex digits)")
        public = self.public.get(named)
        if public is None:
            raise SignatureError(f"entry signed by key {named}, which this device does not "
                                 f"trust (it trusts {self.describe()})")
        crypto = _crypto()
        try:
            public.verify(base64.b64decode(encoded, validate=True), payload)
        except (ValueError, crypto.InvalidSignature):  # not base64 (binascii.Error), or forged
            raise SignatureError(f"entry signature does not match the key {named}") from None


def identify(path: str | Path) -> tuple[str, str | None]:
    """(what a key file holds: PRIVATE, PUBLIC or SECRET, its key id: None for a secret),
    with the checks of whoever would hold it."""
    if read_key_file(path).kind == PUBLIC:
        return PUBLIC, next(iter(TrustedKeys.from_files([path]).public))
    signer = Signer.from_file(path)
    return signer.kind, signer.key_id


# -- making keys ----------------------------------------------------------------------------------


def key_pair_paths(name: str | Path) -> tuple[Path, Path]:
    """NAME.key and NAME.pub (a NAME given with either suffix is taken without it)."""
    base = Path(name)
    if base.suffix in (".key", ".pub"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".key"), base.with_name(base.name + ".pub")


def new_key_pair(name: str | Path) -> tuple[Path, Path, str]:
    """Make an Ed25519 key pair: NAME.key (PEM PKCS8, mode 0600 from its creation) and
    NAME.pub (PEM SubjectPublicKeyInfo, mode 0644). Never replaces a file: a key in use
    would be lost. Returns (private path, public path, key id); KeyFileError (one line)."""
    private_path, public_path = key_pair_paths(name)
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise KeyFileError(f"{path} exists: not replaced (a key in use would be lost); "
                               f"choose another NAME")
    crypto = _crypto(str(private_path))
    serialization = crypto.serialization
    private = crypto.ed25519.Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    _create(private_path, private_pem, 0o600)
    try:
        _create(public_path, public_pem, 0o644)
    except KeyFileError:
        private_path.unlink(missing_ok=True)  # made just now: no half pair is left
        raise
    return private_path, public_path, key_id(private.public_key())


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a new file `path` with `mode`, all or nothing: a temporary file made
    with that mode (fchmod: whatever the umask), fsynced, then hard-linked to `path`, which
    fails rather than replace an existing file."""
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise KeyFileError(f"cannot write {path} ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(f"{path} exists: not replaced (a key in use would be lost)") \
            from None
    except OSError as exc:
        raise KeyFileError(f"cannot write {path} ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
