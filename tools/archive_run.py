"""Keep a learning run in the repository, small, and make a run directory of it again.

The archive is docs/runs/<name>/seed-<n>/; a restored run directory goes on with the run.

    python tools/archive_run.py RUN_DIR docs/runs/NAME/seed-N [--with-checkpoint]
    python tools/archive_run.py --restore docs/runs/NAME/seed-N RUN_DIR

Archiving copies what the figures are computed from -- metrics.jsonl compressed to
metrics.jsonl.gz, status.json, bench.json and the resolved config.yaml -- and, with
--with-checkpoint, the newest verified checkpoint (about 3 MB for the default network) in
place of any older one the archive held. Archiving a run again (it went on) overwrites
the archive with the longer log.

Every file is written atomically (runtime.files.write_atomic), so an archive or a run
directory interrupted half-way holds whole files only, and the same command run again
finishes it.

--restore writes RUN_DIR back from the archive (metrics.jsonl uncompressed, the
checkpoint, config.yaml), so that the run goes on where it was archived, its stream state
included: `python -m runtime.daemon --config RUN_DIR/config.yaml --run-dir RUN_DIR
--max-steps N`. The archived figures are read back by the same tools as live runs:
`python tools/research/sweep.py --summarize-only --out-dir docs/runs/NAME`,
`python tools/research/plot_metrics.py --group docs/runs/NAME --out curve.png`.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import yaml

from runtime.daemon.checkpoints import CheckpointError, CheckpointStore, read_checkpoint
from runtime.daemon.config import from_dict, to_dict
from runtime.files import write_atomic

COPIED = ("status.json", "bench.json", "config.yaml")


def archive(run_dir: Path, dest: Path, with_checkpoint: bool) -> list[Path]:
    """Write the archive; returns the files written. Raises FileNotFoundError when the run
    has no metrics.jsonl, CheckpointError when a checkpoint was asked for and none verifies."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"{metrics} does not exist")
    dest.mkdir(parents=True, exist_ok=True)
    packed = dest / "metrics.jsonl.gz"
    # mtime=0: the same log always compresses to the same bytes (no churn in git)
    write_atomic(packed, gzip.compress(metrics.read_bytes(), mtime=0))
    written = [packed]
    for name in COPIED:
        written += _copy(run_dir / name, dest / name)
    if with_checkpoint:
        newest = _newest_good_checkpoint(run_dir / "checkpoints")
        kept = dest / "checkpoints"
        kept.mkdir(exist_ok=True)
        written += _copy(newest, kept / newest.name)
        for older in kept.glob("ckpt-*.pt"):  # one checkpoint per run in the repository
            if older.name != newest.name:
                older.unlink()
    return written


def restore(archived: Path, run_dir: Path) -> list[Path]:
    """Make `run_dir` a run directory the daemon resumes from; returns the files written.
    Raises FileNotFoundError when the archive has no log or no checkpoint, and
    FileExistsError rather than mix the archive into a run directory that has a log or a
    checkpoint (the daemon would resume from whichever checkpoint is newest) -- unless
    that checkpoint is the archive's own, left by a restore that was interrupted."""
    packed = archived / "metrics.jsonl.gz"
    if not packed.exists():
        raise FileNotFoundError(f"{packed} does not exist")
    newest = _newest_good_checkpoint(archived / "checkpoints")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        raise FileExistsError(f"{run_dir} already holds a run (metrics.jsonl)")
    checkpoints = run_dir / "checkpoints"
    present = sorted(checkpoints.glob("ckpt-*.pt"))
    restored_before = [p.name for p in present] == [newest.name] \
        and present[0].read_bytes() == newest.read_bytes()
    if present and not restored_before:
        raise FileExistsError(f"{run_dir} already holds a run (checkpoints/)")
    checkpoints.mkdir(parents=True, exist_ok=True)
    # the log last: a run directory with a log is a restored one (see above)
    written = _copy(newest, checkpoints / newest.name)
    for name in COPIED:
        written += _copy(archived / name, run_dir / name)
    _config_of_today(run_dir / "config.yaml")
    with gzip.open(packed, "rb") as log:
        write_atomic(metrics, log.read())
    return [*written, metrics]


def _config_of_today(path: Path) -> None:
    """The run's resolved config as today's daemon reads it: keys renamed or removed since
    the run began are migrated the way a checkpoint's stored config is (from_dict)."""
    if path.exists():
        config = from_dict(yaml.safe_load(path.read_text()))
        write_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False).encode())


def _copy(source: Path, dest: Path) -> list[Path]:
    """Copy atomically where `source` exists; returns [dest] or []."""
    if not source.exists():
        return []
    write_atomic(dest, source.read_bytes())
    return [dest]


def _newest_good_checkpoint(directory: Path) -> Path:
    """Read-only (unlike CheckpointStore.load_latest, which tidies the directory): safe
    beside a daemon that is still writing."""
    for path in CheckpointStore(directory, keep=1).paths():
        try:
            read_checkpoint(path)
        except CheckpointError:
            continue
        return path
    raise CheckpointError(f"{directory}: no checkpoint that verifies")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path,
                        help="the run directory; with --restore, the archive")
    parser.add_argument("dest", type=Path,
                        help="the archive; with --restore, the run directory to write")
    parser.add_argument("--with-checkpoint", action="store_true")
    parser.add_argument("--restore", action="store_true",
                        help="write a run directory back from an archive, to go on with it")
    args = parser.parse_args(argv)
    try:
        written = restore(args.source, args.dest) if args.restore \
            else archive(args.source, args.dest, args.with_checkpoint)
    except (FileNotFoundError, FileExistsError, CheckpointError) as exc:
        print(f"archive_run: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
