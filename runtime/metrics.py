"""Observability files of a run: metrics.jsonl (one line per finished game) and status.json.

metrics.jsonl is append-only; a line torn by a kill is cut off when the file is reopened
so the file stays valid JSON lines. status.json is replaced atomically, so a reader never
sees half of it.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any

from runtime.files import write_atomic

log = logging.getLogger(__name__)


def repair_jsonl(path: Path) -> int:
    """Truncate a trailing partial or unparsable line; returns the number of bytes cut."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, max(len(data) - 1, 0)) + 1
        try:
            if data[last_start:].strip():
                json.loads(data[last_start:])
        except ValueError:
            keep = last_start
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
        log.warning("metrics: cut a torn last line (%d bytes) from %s", len(data) - keep, path)
    return len(data) - keep


def last_returns(path: Path, count: int) -> list[float]:
    """The returns of the last `count` game records in a metrics.jsonl, oldest first, read
    from the file's end (a run's log grows for weeks); unparsable lines are skipped."""
    if not path.exists() or count <= 0:
        return []
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        start, tail = end, b""
        while start > 0 and tail.count(b"\n") <= count:
            start = max(0, start - 65536)
            f.seek(start)
            tail = f.read(end - start)
    lines = tail.splitlines()[1:] if start > 0 else tail.splitlines()  # [0] may be cut
    returns = []
    for line in lines:
        try:
            returns.append(float(json.loads(line)["return"]))
        except (ValueError, KeyError, TypeError):
            continue
    return returns[-count:]


class MetricsLog:
    """Appends one JSON object per line; each line is flushed (games are rare events)."""

    def __init__(self, path: Path) -> None:
        repair_jsonl(path)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives with the run

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()



def set_aside_records_after(path: Path, step: int, aside: Path) -> int:
    """Move the records of games that ended after all-time step `step` from `path` to
    `aside` (kept, not deleted) and return how many moved. A run that resumes from the
    checkpoint at `step` replays those steps and writes their games again, so each game
    stays in metrics.jsonl once. A torn or unparsable line goes with them (it was being
    written after the newest checkpoint, or it is not a record)."""
    if not path.exists():
        return 0
    kept, beyond = [], []
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            keep = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        (kept if keep else beyond).append(line)
    if beyond:
        write_atomic(aside, b"".join(beyond))  # first: a kill in between loses nothing
        write_atomic(path, b"".join(kept))
    return len(beyond)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All valid records; an unparsable line (a torn tail) is skipped. A `.gz` path is
    read through gzip (run logs kept in the repository are compressed)."""
    records = []
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    for line in data.decode("utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def metrics_path(run_dir: Path) -> Path:
    """A run's metrics.jsonl, or its compressed copy metrics.jsonl.gz (docs/runs/); the
    plain name when neither exists, for the caller's message."""
    plain = run_dir / "metrics.jsonl"
    packed = plain.with_name("metrics.jsonl.gz")
    return packed if not plain.exists() and packed.exists() else plain


def write_status(path: Path, status: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(status, indent=1) + "\n").encode())
