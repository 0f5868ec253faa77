"""Optional per-game scalars for TensorBoard (log.tensorboard: true), through torch's
SummaryWriter, hence on the learner side."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TensorBoardLog:
    """Per-game scalars for TensorBoard, beside metrics.jsonl (which stays the record)."""

    def __init__(self, directory: Path, purge_step: int | None = None) -> None:
        """`purge_step`: readers drop the events of earlier files from this step on (those
        written after the checkpoint a resumed run replays from)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("log.tensorboard: needs the tensorboard package "
                             "(pip install tensorboard)") from None
        self._writer = SummaryWriter(str(directory), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in record.items():
            if key not in ("step", "game", "time") and isinstance(value, (int, float)):
                self._writer.add_scalar(f"game/{key}", value, step)

    def close(self) -> None:
        self._writer.close()
