"""log.video_every_games: the daemon films the game after every Nth finished one."""

from __future__ import annotations

import logging
from pathlib import Path

from runtime.daemon.history import VIDEO_NAME
from runtime.daemon.loop import ActingLoop
from runtime.video import GameRecorder, VideoError

log = logging.getLogger("runtime.daemon")


class GameFilming:
    """Starts a recorder on the loop when a game is due and finishes it when that game
    ends. A video is never worth stopping the agent for: failures are logged."""

    def __init__(self, directory: Path, every_games: int) -> None:
        self.directory = directory
        self.every_games = every_games

    def after_game(self, loop: ActingLoop, game: int, step: int) -> None:
        """Game number `game` ended at all-time step `step`."""
        if loop.recorder is not None:
            loop.recorder.finish()
            log.info("video %s", loop.recorder.paths[-1])
            loop.recorder = None
        if not self.every_games or game % self.every_games:
            return
        try:
            recorder = GameRecorder(self.directory)
            recorder.start(VIDEO_NAME.format(game=game + 1, step=step).removesuffix(".mp4"))
            loop.recorder = recorder
        except VideoError as exc:
            log.warning("cannot record video: %s", exc)
