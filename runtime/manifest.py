"""Published policies: the manifest entry, its signature, and the checks a device makes on
an entry before it downloads anything. Standard library only: the daemon's publisher
writes entries with it, the device's follower (runtime.follow) reads them with it.

A policies directory holds ``policy-<step>.onnx`` files, ``manifest.json`` (every kept
entry, oldest first) and ``latest.json`` (the newest entry alone, what a device polls).
An entry names its file, its SHA-256 and size, the stream it plays and how it was verified;
with a key configured it carries ``signature: "hmac-sha256:<hex>"`` over all its other
fields (canonical JSON), so only a holder of the key can publish a policy a device accepts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = 1
LATEST = "latest.json"
MANIFEST = "manifest.json"
SIGNATURE_PREFIX = "hmac-sha256:"
MIN_KEY_CHARS = 32  # `python -c 'import secrets; print(secrets.token_hex(32))'` gives 64
MAX_INDEX_BYTES = 1 << 20  # latest.json and manifest.json are small: never read more
_FILE = re.compile(r"policy-(\d{1,18})\.onnx")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """An entry that cannot be used (malformed, unsigned, wrongly signed, too big); one line."""


class KeyFileError(ValueError):
    """A key file that cannot be read or is too short; one line naming the file."""


def policy_file(step: int) -> str:
    """The file name of the policy published at `step` (sorts by step)."""
    return f"policy-{step:012d}.onnx"


def load_key(path: str | Path) -> bytes:
    """The shared secret: the key file's text, surrounding whitespace stripped."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path} ({exc.strerror or exc})") from None
    if len(key) < MIN_KEY_CHARS:
        raise KeyFileError(f"key file {path} holds {len(key)} characters, fewer than "
                           f"{MIN_KEY_CHARS} (make one with: python -c 'import secrets; "
                           f"print(secrets.token_hex(32))' > {path})")
    return key


def canonical(entry: dict[str, Any]) -> bytes:
    """The signed bytes: every field but the signature, as sorted compact JSON."""
    fields = {k: v for k, v in entry.items() if k != "signature"}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def sign(entry: dict[str, Any], key: bytes) -> dict[str, Any]:
    digest = hmac.new(key, canonical(entry), hashlib.sha256).hexdigest()
    return {**entry, "signature": SIGNATURE_PREFIX + digest}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    """A checked entry (`fields` is the whole JSON object as published)."""

    step: int
    file: str
    sha256: str
    size: int
    env_id: str
    fields: dict[str, Any]


def _int(data: dict[str, Any], key: str, low: int) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ManifestError(f"entry field {key!r} is {value!r}, not an integer >= {low}")
    return value


def parse_entry(data: Any, key: bytes | None, max_size: int) -> Entry:
    """Check an entry before anything is downloaded: its format, a file name that is a
    plain `policy-<step>.onnx` (never a path), a SHA-256, a size within `max_size`, and,
    with a key, its signature. Raises ManifestError (one line)."""
    if not isinstance(data, dict):
        raise ManifestError(f"entry is a JSON {type(data).__name__}, not an object")
    if data.get("format") != FORMAT:
        raise ManifestError(f"entry format {data.get('format')!r} is not {FORMAT}")
    step = _int(data, "step", 0)
    name = data.get("file")
    match = _FILE.fullmatch(name) if isinstance(name, str) else None
    if match is None or int(match.group(1)) != step:
        raise ManifestError(f"entry file {str(name)[:80]!r} is not {policy_file(step)!r}")
    digest = data.get("sha256")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ManifestError("entry sha256 is not 64 lower-case hex digits")
    size = _int(data, "size", 1)
    if size > max_size:
        raise ManifestError(f"entry size {size} bytes is above the limit of {max_size}")
    env_id = data.get("env_id")
    if not isinstance(env_id, str) or not env_id:
        raise ManifestError("entry has no env_id")
    if key is not None:
        signature = data.get("signature")
        if not isinstance(signature, str):
            raise ManifestError("entry is not signed (a key is configured)")
        expected = sign(data, key)["signature"]
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise ManifestError("entry signature does not match the key")
    return Entry(step, name, digest, size, env_id, data)


def parse_index(raw: bytes, what: str = LATEST) -> Any:
    """JSON of latest.json / manifest.json, bounded; ManifestError if not JSON."""
    if len(raw) > MAX_INDEX_BYTES:
        raise ManifestError(f"{what} is larger than {MAX_INDEX_BYTES} bytes")
    try:
        return json.loads(raw)
    except ValueError:
        raise ManifestError(f"{what} is not JSON") from None
