"""Keep a finished learning run in the repository, small: docs/runs/<name>/seed-<n>/.

    python tools/archive_run.py RUN_DIR docs/runs/NAME/seed-N [--with-checkpoint]

Copies what the figures are computed from -- metrics.jsonl compressed to metrics.jsonl.gz,
status.json, bench.json and the resolved config.yaml -- and, with --with-checkpoint, the
newest verified checkpoint (about 1 MB for the default network), so a later session can
resume the run (`python -m runtime.daemon --config DEST/config.yaml --run-dir COPY` after
copying DEST/checkpoints/ into COPY). The archived figures are read back by the same
tools as live runs: `python tools/sweep.py --summarize-only --out-dir docs/runs/NAME`,
`python tools/plot_metrics.py --group docs/runs/NAME --out curve.png`.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

from runtime.daemon.checkpoints import CheckpointError, CheckpointStore, read_checkpoint

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
    with open(packed, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        out.write(metrics.read_bytes())
    written = [packed]
    for name in COPIED:
        if (run_dir / name).exists():
            written.append(Path(shutil.copy2(run_dir / name, dest / name)))
    if with_checkpoint:
        newest = _newest_good_checkpoint(run_dir / "checkpoints")
        (dest / "checkpoints").mkdir(exist_ok=True)
        written.append(Path(shutil.copy2(newest, dest / "checkpoints" / newest.name)))
    return written


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
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--with-checkpoint", action="store_true")
    args = parser.parse_args(argv)
    try:
        written = archive(args.run_dir, args.dest, args.with_checkpoint)
    except (FileNotFoundError, CheckpointError) as exc:
        print(f"archive_run: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
