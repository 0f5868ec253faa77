"""`python -m runtime.daemon.rollback --run-dir RUN_DIR --to-step N --key fleet.key`: send
the devices back to a kept policy, signed by the learner.

A device never plays a policy older than one it played, except this: the kept policy of step
N (still in RUN_DIR/policies and its manifest.json) is published again as the newest entry,
with the next `sequence` of the run and `replaces` naming the entry it replaces, signed with
the key the daemon signs with (export.key_file: an Ed25519 private key or an HMAC secret;
runtime.device.manifest.rollback_entry). A device that trusts that key takes it because
the learner signed it with a sequence newer than any it played, not because of its step: an
old entry served again has an older sequence, and an entry changed to look like a rollback
no longer matches its signature.

The daemon must be stopped (the run directory's lock): its next policy would replace the
rollback anyway, and it must not write the manifest at the same time. Devices go on from the
rollback with the daemon's next policy of a higher step. No torch (it starts at once);
`cryptography` only for an Ed25519 key. Exit 0 and one line on stdout; bad input is one
line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.cli import OneLineParser, UsageError
from runtime.daemon.errors import SetupError
from runtime.daemon.process import RunDirLock
from runtime.device.keys import KeyFileError, Signer
from runtime.device.manifest import (
    LATEST,
    MANIFEST,
    ManifestError,
    checked_run,
    index_bytes,
    manifest_bytes,
    new_run,
    next_sequence,
    parse_entry,
    parse_index,
    rollback_entry,
    run_label,
    sha256_file,
    sign,
)
from runtime.files import write_atomic


class RollbackError(Exception):
    """The rollback cannot be done as asked; nothing was written."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m runtime.daemon.rollback",
                           description="Publish a kept policy again as the newest, signed, "
                                       "so that devices play it (the daemon stopped).")
    parser.add_argument("--run-dir", required=True, type=Path, help="the daemon's run.dir")
    parser.add_argument("--to-step", required=True, type=int, metavar="N",
                        help="the step of the kept policy devices go back to")
    parser.add_argument("--key", required=True, type=Path,
                        help="the key the daemon signs with (export.key_file: NAME.key, "
                             "or a shared HMAC key file)")
    return parser.parse_args(argv)


def _manifest(directory: Path) -> list[dict]:
    try:
        data = parse_index((directory / MANIFEST).read_bytes(), MANIFEST)
    except FileNotFoundError:
        raise RollbackError(f"{directory / MANIFEST} does not exist (nothing published "
                            f"there)") from None
    except OSError as exc:
        raise RollbackError(f"cannot read {directory / MANIFEST} ({exc.strerror or exc})") \
            from None
    except ManifestError as exc:
        raise RollbackError(f"{directory}: {exc}") from None
    entries = data.get("policies") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries \
            or not all(isinstance(e, dict) and isinstance(e.get("step"), int) for e in entries):
        raise RollbackError(f"{directory / MANIFEST} holds no entries")
    return entries


def rollback(run_dir: Path, step: int, key: Signer | bytes) -> dict:
    """Publish the kept policy of `step` again as the newest entry; returns the entry.
    RollbackError (one line) when it cannot be done."""
    directory = run_dir / "policies"
    entries = _manifest(directory)
    newest = entries[-1]
    matches = [e for e in entries if e["step"] == step]
    if not matches:
        kept = ", ".join(str(e["step"]) for e in entries)
        raise RollbackError(f"--to-step: no policy of step {step} is kept in "
                            f"{directory / MANIFEST} (kept: {kept})")
    target = matches[-1]
    try:
        checked = parse_entry(target, None, max_size=1 << 62)
    except ManifestError as exc:
        raise RollbackError(f"the entry of step {step} in {directory / MANIFEST}: {exc}") \
            from None
    if checked.file == newest.get("file") and checked.sha256 == newest.get("sha256"):
        raise RollbackError(f"--to-step: the policy of step {step} is the newest one already")
    path = directory / checked.file
    if not path.is_file():
        raise RollbackError(f"{path} is missing: the policy of step {step} cannot be "
                            f"published again")
    if sha256_file(path) != checked.sha256:
        raise RollbackError(f"{path} does not match the sha256 of its entry")
    run = None
    if newest.get("run") is not None:
        run = checked_run({"id": newest.get("run"), "started": newest.get("run_started")})
        if run is None:
            raise RollbackError(f"the newest entry in {directory / MANIFEST} names no valid run")
    latest = []
    try:  # latest.json is the newest entry; a sequence there counts too
        latest = [parse_index((directory / LATEST).read_bytes())]
    except (OSError, ManifestError):
        pass
    known = [e for e in entries + latest if isinstance(e, dict)]
    entry = sign(rollback_entry(target, newest, next_sequence(known), run or new_run()), key)
    write_atomic(directory / MANIFEST, manifest_bytes([*entries, entry]))
    write_atomic(directory / LATEST, index_bytes(entry))
    return entry


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.to_step < 0:
            raise UsageError(f"--to-step: {args.to_step} is not a step (>= 0)")
        try:
            key = Signer.from_file(args.key)
        except KeyFileError as exc:
            raise UsageError(f"--key: {exc}") from None
        if not args.run_dir.is_dir():
            raise UsageError(f"--run-dir: {args.run_dir} is not a directory")
        try:
            lock = RunDirLock(args.run_dir)
        except SetupError as exc:  # "run.dir: RUN_DIR is in use by pid N"
            raise UsageError(f"--run-dir: {str(exc).removeprefix('run.dir: ')}: stop the "
                             f"daemon first (its next policy would replace the rollback)") \
                from None
        except OSError as exc:
            raise UsageError(f"--run-dir: cannot lock {args.run_dir} "
                             f"({exc.strerror or exc})") from None
        try:
            entry = rollback(args.run_dir, args.to_step, key)
        finally:
            lock.release()
    except (UsageError, RollbackError) as exc:
        print(f"rollback: error: {exc}", file=sys.stderr)
        return 2
    replaced = entry["replaces"]
    print(f"rolled back: {args.run_dir / 'policies' / LATEST} names the policy of step "
          f"{entry['step']} again (sequence {entry['sequence']} of run {entry['run']}, "
          f"replacing step {replaced['step']} of {run_label(replaced['run'])}); devices "
          f"following with this key play it from their next game")
    return 0


if __name__ == "__main__":
    sys.exit(main())
