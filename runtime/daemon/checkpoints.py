"""Crash-safe checkpoint files: checksummed, written atomically, loaded with weights_only.

A file is `MAGIC` + 64 hex digits of the SHA-256 of the payload + `\n` + the payload
(a torch.save of plain tensors and containers). A torn write, a flipped bit, an empty or a
foreign file fails the checksum or the magic and is skipped for the previous good one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from runtime.files import write_atomic

# The payload layout of a checkpoint (not the exported policy's: runtime.contract).
CHECKPOINT_FORMAT_VERSION = 1
MAGIC = b"STREAMAGENT-CKPT-1 "
_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")
log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; str() names the file and the reason."""


def encode(payload: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format_version": CHECKPOINT_FORMAT_VERSION, **payload}, buffer)
    body = buffer.getvalue()
    return MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def decode(data: bytes, name: str) -> dict[str, Any]:
    """Verify and load one checkpoint's bytes; raises CheckpointError naming `name`."""
    header_len = len(MAGIC) + 65
    if len(data) == 0:
        raise CheckpointError(f"{name}: empty file")
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{name}: not a checkpoint of this format (bad magic)")
    digest, body = data[len(MAGIC):header_len - 1], data[header_len:]
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise CheckpointError(f"{name}: checksum mismatch (truncated or corrupted)")
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means unusable
        raise CheckpointError(f"{name}: cannot be loaded ({type(exc).__name__})") from None
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{name}: format version {version!r}, "
                              f"expected {CHECKPOINT_FORMAT_VERSION}")
    return payload


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None
    return decode(data, str(path))


class CheckpointStore:
    """The checkpoints of one run: `ckpt-<step>.pt` files in one directory."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = directory
        self.keep = keep

    def paths(self) -> list[Path]:
        """Published checkpoints, newest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, payload: dict[str, Any], step: int) -> Path:
        """Publish a checkpoint for `step`, then prune beyond `keep`. Raises OSError."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"ckpt-{step:012d}.pt"
        write_atomic(path, encode(payload))
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that verifies; corrupt ones are logged and skipped.
        None when there are none at all; CheckpointError when all are bad."""
        self._remove_stale_temp_files()
        paths = self.paths()
        for path in paths:
            try:
                return read_checkpoint(path), path
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s", exc)
        if paths:
            raise CheckpointError(f"no usable checkpoint in {self.directory} "
                                  f"({len(paths)} corrupt); start over with --fresh")
        return None

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writes cut off by a kill are never published; clear them."""
        if self.directory.is_dir():
            for tmp in self.directory.glob(".ckpt-*.pt.tmp-*"):
                log.info("removing an unfinished checkpoint write %s", tmp.name)
                tmp.unlink(missing_ok=True)

    def move_aside(self) -> Path | None:
        """--fresh: keep old checkpoints, but out of the way, under a timestamped name."""
        if not self.paths():
            return None
        target = self.directory.with_name(f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}")
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.with_name(f"{target.name.split('~')[0]}~{suffix}")
        os.replace(self.directory, target)
        return target
