"""MP4 recording of played games, shared by the daemon and the inference runtime.

imageio with its bundled ffmpeg (imageio-ffmpeg) does the encoding: no system ffmpeg, no
hand-written encoder. Imported lazily, so nothing pays for it unless a video is recorded.
Torch-free, like the streams.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import first_line


class VideoError(RuntimeError):
    """Recording is impossible (missing package, unwritable directory, no frames)."""


class GameRecorder:
    """Writes one MP4 per game: start(name), frame(render) per step, finish()."""

    def __init__(self, directory: Path, fps: int = 30) -> None:
        try:
            import imageio.v2 as imageio
        except ImportError:
            raise VideoError("recording needs the imageio and imageio-ffmpeg packages") from None
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VideoError(f"cannot create {directory} ({exc.strerror})") from None
        self._imageio = imageio
        self.directory = directory
        self.fps = fps
        self._writer: Any = None
        self.paths: list[str] = []

    @property
    def recording(self) -> bool:
        return self._writer is not None

    def start(self, name: str) -> Path:
        path = self.directory / f"{name}.mp4"
        # macro_block_size=1: Atari's 210x160 screen is written as is, not rescaled.
        self._writer = self._imageio.get_writer(path, fps=self.fps, codec="libx264",
                                                macro_block_size=1)
        self.paths.append(str(path))
        return path

    def frame(self, render: Callable[[], np.ndarray | None]) -> None:
        """Append the stream's current RGB frame (`render()`) to the open video."""
        if self._writer is None:
            return
        try:
            rgb = render()
            if rgb is not None:
                self._writer.append_data(np.ascontiguousarray(rgb))
        except Exception as exc:  # noqa: BLE001 - renderer or encoder: cannot record
            raise VideoError(f"cannot capture frames ({first_line(exc)})") from None

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
