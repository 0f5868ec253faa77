"""log.video_every_games: the daemon films the game after every Nth finished one."""

from __future__ import annotations

import logging
from pathlib import Path

from runtime.daemon.history import VIDEO_NAME
from runtime.daemon.loop import ActingLoop, GameSummary
from runtime.video import GameRecorder, VideoError

log = logging.getLogger("runtime.daemon")


class GameFilming:
    """Starts a recorder on the loop when a game is due and finishes it when that game
    ends. A video is never worth stopping the agent for: failures are logged."""

    def __init__(self, directory: Path, every_games: int, loop: ActingLoop) -> None:
        self.directory = directory
        self.every_games = every_games
        self.loop = loop

    def after_step(self, step: int, now: float, game: GameSummary | None) -> None:
        if game is not None:
            self._after_game(game.game, step)

    def close(self) -> None:
        if self.loop.recorder is not None:
            self.loop.recorder.finish()

    def _after_game(self, game: int, step: int) -> None:
        """Game number `game` ended at all-time step `step`."""
        loop = self.loop
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
