"""Published policies: the manifest entry, its signature, and the checks a device makes on
an entry before it downloads anything. Standard library only (the keys that sign,
runtime.device.keys, bring `cryptography` for Ed25519): the daemon's publisher
(runtime.daemon.publish) writes entries with it, the device's follower
(runtime.device.follow) reads them with it.

A policies directory holds ``policy-<step>.onnx`` files, ``manifest.json`` (every kept
entry, oldest published first) and ``latest.json`` (the newest entry alone, what a device polls).
An entry names its file, its SHA-256 and size, the stream it plays and how it was verified;
with a key configured it carries ``signature`` over all its other fields (canonical JSON):
``"ed25519:<key id>:<base64>"`` made with the learner's private key, or
``"hmac-sha256:<hex>"`` with a shared secret (runtime.device.keys), so only the learner can
publish a policy a device accepts.

Entries of daemons with run identities also carry ``run`` (16 hex digits, made when a run
directory starts fresh and kept in its checkpoints), ``run_started`` (when that run began,
Unix seconds) and ``sequence`` (1, 2, ... in the order the policies directory published
them, whatever their steps). A rollback (runtime.daemon.rollback) re-publishes a kept
policy as the newest entry with ``replaces: {"run", "step", "sequence"}`` naming the entry
it replaces. A device keeps what it accepted in its cache (``accepted.json``, `Accepted`):
per run the highest step and sequence, runs in the order it followed them. With a key it
takes a policy only if it is newer in the run it follows (a higher step, and not published
before a rollback it played; a rollback: a higher sequence), or the first policy of a run
that began later; never one of a run it left. Without a key only steps count. Entries
without ``run`` (older daemons) are one unnamed run.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runtime.device.keys import KeyFileError as KeyFileError  # the error of every key file
from runtime.device.keys import SignatureError, Signer, TrustedKeys, load_secret

FORMAT = 1
LATEST = "latest.json"
MANIFEST = "manifest.json"
MAX_INDEX_BYTES = 1 << 20  # latest.json and manifest.json are small: never read more
ACCEPTED = "accepted.json"  # a device's cache: the runs and steps it accepted
MAX_RUNS = 1000  # runs an accepted.json remembers (one per --fresh: plenty)
_FILE = re.compile(r"policy-(\d{1,18})\.onnx")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RUN = re.compile(r"[0-9a-f]{8,64}")


class ManifestError(ValueError):
    """An entry that cannot be used (malformed, unsigned, wrongly signed, too big); one line.
    `kind` sorts it for the player's metrics: "entry", "size" or "signature"."""

    def __init__(self, message: str, kind: str = "entry") -> None:
        super().__init__(message)
        self.kind = kind


def policy_file(step: int) -> str:
    """The file name of the policy published at `step` (sorts by step)."""
    return f"policy-{step:012d}.onnx"


# A key file's HMAC secret, by the name the callers of this module know.
load_key = load_secret


def canonical(entry: dict[str, Any]) -> bytes:
    """The signed bytes: every field but the signature, as sorted compact JSON."""
    fields = {k: v for k, v in entry.items() if k != "signature"}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def sign(entry: dict[str, Any], key: Signer | bytes) -> dict[str, Any]:
    """`entry` with its signature; `key` a Signer, or the bytes of an HMAC secret."""
    signer = key if isinstance(key, Signer) else Signer.from_secret(key)
    return {**entry, "signature": signer.sign(canonical(entry))}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- run identity -------------------------------------------------------------------------------


def new_run() -> dict[str, Any]:
    """The identity of a run that starts fresh: a random id and when it began. The daemon
    keeps it in its checkpoints; every entry it publishes names it."""
    return {"id": secrets.token_hex(8), "started": round(time.time(), 3)}


def checked_run(value: Any) -> dict[str, Any] | None:
    """A run identity as kept in a checkpoint, or None when it is not one."""
    if isinstance(value, dict) and isinstance(value.get("id"), str) \
            and _RUN.fullmatch(value["id"]) and _is_time(value.get("started")):
        return {"id": value["id"], "started": value["started"]}
    return None


def run_fields(run: dict[str, Any], sequence: int) -> dict[str, Any]:
    """The fields an entry of `run` carries, `sequence` its place in the publishing order."""
    return {"run": run["id"], "run_started": run["started"], "sequence": sequence}


def next_sequence(entries: list[dict[str, Any]]) -> int:
    """The sequence of the next entry published after `entries` (1 for the first)."""
    return 1 + max((e["sequence"] for e in entries if _is_int(e.get("sequence"))), default=0)


def rollback_entry(target: dict[str, Any], newest: dict[str, Any], sequence: int,
                   run: dict[str, Any]) -> dict[str, Any]:
    """`target`, a kept entry, published again as the newest (`sequence`) of `run`, naming
    `newest`, the entry it replaces. Unsigned: the caller signs it."""
    fields = {k: v for k, v in target.items()
              if k not in ("signature", "run", "run_started", "sequence", "replaces")}
    return {**fields, **run_fields(run, sequence),
            "replaces": {"run": newest.get("run"), "step": newest["step"],
                         "sequence": newest.get("sequence")}}


def run_label(run: str | None) -> str:
    return f"run {run}" if run is not None else "the unnamed run (entries before run ids)"


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _utc(seconds: float | None) -> str:
    if seconds is None:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


# -- entries --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A checked entry (`fields` is the whole JSON object as published). `run` is None for
    an entry of a daemon before run identities (then `run_started` and `sequence` are too);
    `replaces` is set on a rollback."""

    step: int
    file: str
    sha256: str
    size: int
    env_id: str
    fields: dict[str, Any]
    run: str | None = None
    run_started: float | None = None
    sequence: int | None = None
    replaces: dict[str, Any] | None = None


def _int(data: dict[str, Any], key: str, low: int) -> int:
    value = data.get(key)
    if not _is_int(value, low):
        raise ManifestError(f"entry field {key!r} is {value!r}, not an integer >= {low}")
    return value


def _run_of(data: dict[str, Any]) -> tuple[str | None, float | None, int | None,
                                           dict[str, Any] | None]:
    """(run, run_started, sequence, replaces) of an entry; all None without `run`."""
    run = data.get("run")
    if run is None:
        for key in ("run_started", "sequence", "replaces"):
            if key in data:
                raise ManifestError(f"entry has {key!r} but no run")
        return None, None, None, None
    if not isinstance(run, str) or not _RUN.fullmatch(run):
        raise ManifestError(f"entry run {str(run)[:80]!r} is not 8 to 64 lower-case hex digits")
    started = data.get("run_started")
    if not _is_time(started):
        raise ManifestError(f"entry run_started {str(started)[:80]!r} is not a time")
    sequence = _int(data, "sequence", 1)
    replaces = data.get("replaces")
    if replaces is not None:
        ok = isinstance(replaces, dict) and _is_int(replaces.get("step")) \
            and (replaces.get("run") is None or (isinstance(replaces["run"], str)
                                                 and _RUN.fullmatch(replaces["run"]))) \
            and (replaces.get("sequence") is None or _is_int(replaces["sequence"], 1))
        if not ok:
            raise ManifestError(f"entry replaces {json.dumps(replaces)[:120]} is not "
                                f"{{run, step, sequence}}")
    return run, started, sequence, replaces


def parse_entry(data: Any, key: TrustedKeys | bytes | None, max_size: int) -> Entry:
    """Check an entry before anything is downloaded: its format, a file name that is a
    plain `policy-<step>.onnx` (never a path), a SHA-256, a size within `max_size`, and,
    with keys (TrustedKeys, or the bytes of an HMAC secret), its signature. Raises
    ManifestError (one line)."""
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
        raise ManifestError(f"entry size {size} bytes is above the limit of {max_size}",
                            "size")
    env_id = data.get("env_id")
    if not isinstance(env_id, str) or not env_id:
        raise ManifestError("entry has no env_id")
    run, started, sequence, replaces = _run_of(data)
    if key is not None:
        signature = data.get("signature")
        if not isinstance(signature, str):
            raise ManifestError("entry is not signed (a key is configured)", "signature")
        trusted = key if isinstance(key, TrustedKeys) else TrustedKeys.from_secret(key)
        try:
            trusted.verify(canonical(data), signature)
        except SignatureError as exc:
            raise ManifestError(str(exc), "signature") from None
    return Entry(step, name, digest, size, env_id, data, run, started, sequence, replaces)


def parse_index(raw: bytes, what: str = LATEST) -> Any:
    """JSON of latest.json / manifest.json, bounded; ManifestError if not JSON."""
    if len(raw) > MAX_INDEX_BYTES:
        raise ManifestError(f"{what} is larger than {MAX_INDEX_BYTES} bytes")
    try:
        return json.loads(raw)
    except ValueError:
        raise ManifestError(f"{what} is not JSON") from None


def read_manifest(directory: Path) -> list[dict[str, Any]]:
    """The kept entries of a policies directory, oldest published first, those whose file
    is there ([] when there is no readable manifest.json)."""
    try:
        data = parse_index((directory / MANIFEST).read_bytes(), MANIFEST)
    except (OSError, ManifestError):
        return []
    entries = data.get("policies") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("step"), int)
            and isinstance(e.get("file"), str) and _FILE.fullmatch(e["file"])
            and (directory / e["file"]).is_file()]


def index_bytes(data: Any) -> bytes:
    """manifest.json / latest.json as the publisher writes them."""
    return (json.dumps(data, indent=1) + "\n").encode()


def manifest_bytes(entries: list[dict[str, Any]]) -> bytes:
    return index_bytes({"format": FORMAT, "policies": entries})


# -- what a device accepted -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunSeen:
    """One run as a device knows it: the highest step and sequence it accepted of it, and
    the sequence of the newest rollback it accepted (None: none)."""

    run: str | None
    started: float | None
    step: int
    sequence: int | None
    rollback: int | None = None


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


class Accepted:
    """What a device has accepted (its cache's accepted.json): the runs it followed, in the
    order it took them; the last is the run it follows now, the others it left."""

    def __init__(self, runs: tuple[RunSeen, ...] = ()) -> None:
        self.runs = runs

    @property
    def following(self) -> RunSeen | None:
        return self.runs[-1] if self.runs else None

    def refuses(self, entry: Entry, signed: bool) -> str | None:
        """Why `entry` (checked: signed when `signed`) must not be played, or None."""
        last = self.following
        if last is None:
            return None
        if not signed:  # no key, no trust in run names: steps only, as before run ids
            if entry.step <= last.step:
                why = f"not newer than step {last.step}, which this device already played"
                return why + (" (a rollback is followed only with a key)"
                              if entry.replaces is not None else "")
            return None
        if entry.run == last.run:
            of_run = f" of its run {last.run}" if last.run is not None else ""
            if entry.replaces is not None:
                if last.sequence is not None and entry.sequence <= last.sequence:
                    return (f"a rollback (sequence {entry.sequence}) not newer than sequence "
                            f"{last.sequence}{of_run}, which this device already played")
                return None
            if entry.step <= last.step:
                return (f"not newer than step {last.step}{of_run}, which this device "
                        f"already played")
            if last.rollback is not None and entry.sequence is not None \
                    and entry.sequence < last.rollback:
                return (f"published before the rollback (sequence {last.rollback}){of_run}, "
                        f"which this device already played")
            return None
        if any(seen.run == entry.run for seen in self.runs):
            return (f"{run_label(entry.run)} was left for {run_label(last.run)}: this device "
                    f"never goes back to a run it left")
        if entry.run is None:
            return (f"the entry names no run and this device follows {run_label(last.run)} "
                    f"(only signed entries that name their run start a new run)")
        if last.started is not None and entry.run_started <= last.started:
            return (f"{run_label(entry.run)} began at {_utc(entry.run_started)}, not after "
                    f"{run_label(last.run)} (began at {_utc(last.started)}) which this "
                    f"device follows: an older run")
        return None

    def record(self, entry: Entry) -> Accepted:
        """This state with `entry` played: its run is the one followed now."""
        prior = next((seen for seen in self.runs if seen.run == entry.run), None)
        rollback = entry.sequence if entry.replaces is not None else None
        if prior is None:
            seen = RunSeen(entry.run, entry.run_started, entry.step, entry.sequence, rollback)
        else:
            seen = replace(prior, started=_max(prior.started, entry.run_started),
                           step=max(prior.step, entry.step),
                           sequence=_max(prior.sequence, entry.sequence),
                           rollback=_max(prior.rollback, rollback))
        others = tuple(r for r in self.runs if r.run != entry.run)
        return Accepted((*others, seen)[-MAX_RUNS:])

    def same_run(self, entry: Entry) -> bool:
        return self.following is not None and self.following.run == entry.run

    def to_json(self) -> bytes:
        runs = [{"run": r.run, "started": r.started, "step": r.step, "sequence": r.sequence,
                 "rollback": r.rollback} for r in self.runs]
        return index_bytes({"format": FORMAT, "runs": runs})

    @classmethod
    def from_json(cls, raw: bytes) -> Accepted:
        """Raises ManifestError (one line) for anything but what to_json writes."""
        data = parse_index(raw, ACCEPTED)
        runs = data.get("runs") if isinstance(data, dict) and data.get("format") == FORMAT \
            else None
        if not isinstance(runs, list):
            raise ManifestError(f"{ACCEPTED} is not {{format: {FORMAT}, runs: [...]}}")
        seen = []
        for run in runs[-MAX_RUNS:]:
            ok = isinstance(run, dict) and (run.get("run") is None or (
                isinstance(run["run"], str) and _RUN.fullmatch(run["run"]))) \
                and (run.get("started") is None or _is_time(run["started"])) \
                and _is_int(run.get("step")) \
                and all(run.get(k) is None or _is_int(run[k], 1)
                        for k in ("sequence", "rollback"))
            if not ok:
                raise ManifestError(f"{ACCEPTED}: a run that is not {{run, started, step, "
                                    f"sequence, rollback}}: {str(run)[:120]}")
            seen.append(RunSeen(run.get("run"), run.get("started"), run["step"],
                                run.get("sequence"), run.get("rollback")))
        if len({r.run for r in seen}) != len(seen):
            raise ManifestError(f"{ACCEPTED} names a run twice")
        return cls(tuple(seen))
