"""What a start does with what the run wrote after the checkpoint it resumes from.

The steps after that checkpoint are played again (exactly, when the stream's state was
saved), so their game records and videos would appear twice. They are moved aside, never
deleted: `metrics.jsonl.orphaned-<time>` and `videos/orphaned-<time>/`. TensorBoard drops
its own events past the checkpoint through the writer's purge_step.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from runtime.metrics import set_aside_records_after

# The daemon names a video after the game it films and the step the game started after.
VIDEO_NAME = "game-{game:06d}-step-{step:09d}.mp4"
_VIDEO = re.compile(r"^game-(\d+)-step-(\d+)\.mp4$")


def _unused(path: Path) -> Path:
    candidate, suffix = path, 1
    while candidate.exists():
        suffix += 1
        candidate = path.with_name(f"{path.name}-{suffix}")
    return candidate


def set_aside_after(run_dir: Path, step: int) -> list[str]:
    """Move metrics records and videos from after all-time step `step` aside; returns one
    line per thing moved, for the log."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    metrics = run_dir / "metrics.jsonl"
    aside = _unused(metrics.with_name(f"{metrics.name}.orphaned-{stamp}"))
    count = set_aside_records_after(metrics, step, aside)
    if count:
        moved.append(f"{count} game records from after step {step} moved to {aside.name}")
    videos = run_dir / "videos"
    later = sorted(p for p in videos.glob("game-*.mp4")
                   if (m := _VIDEO.match(p.name)) and int(m.group(2)) > step) \
        if videos.is_dir() else []
    if later:
        target = _unused(videos / f"orphaned-{stamp}")
        target.mkdir()
        for path in later:
            os.replace(path, target / path.name)
        moved.append(f"{len(later)} videos of games begun after step {step} moved to "
                     f"videos/{target.name}")
    return moved
