"""What an operator's monitoring scrapes from a following player (`--metrics-port`):
Prometheus metrics and a health check, served by runtime.monitoring.

- `/metrics`: the policy in play, games and their recent returns, refusals by kind,
  source errors and the last successful look at the source, read at each scrape from the
  follower and the player's tally, so playing pays nothing per step for them.
- `/healthz`: 200 while the player plays and made a step within `STALL_SECONDS`, else 503;
  the body is one line saying which, and how long ago the source last answered (a source
  that is down is no reason to restart a device that plays its verified policy).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client.core import Metric

from runtime.device.follow import Follower
from runtime.monitoring import counter, gauge, labelled_counter

PREFIX = "stream_agent_player_"
STALL_SECONDS = 60.0  # a player without a step for this long is not healthy
RECENT_GAMES = 100


class PlayerTally:
    """The player's own counts: games, the returns of the recent ones, the last step."""

    def __init__(self) -> None:
        self.games = 0
        self.recent: deque[float] = deque(maxlen=RECENT_GAMES)
        self.last_step_at: float | None = None  # time.monotonic()
        self.stopped = False

    def game(self, game_return: float) -> None:
        self.games += 1
        self.recent.append(game_return)

    def stepping(self, should_stop: Callable[[], bool]) -> Callable[[], bool]:
        """`should_stop` for the play loop, which asks it once a step: noting the step."""
        def asked() -> bool:
            self.last_step_at = time.monotonic()
            return should_stop()
        return asked


def player_metrics(follower: Follower, tally: PlayerTally) -> Iterator[Metric]:
    yield gauge(PREFIX + "policy_step", "Training step of the policy in play; NaN before the "
                "first.", follower.step if follower.current is not None else None)
    yield counter(PREFIX + "games", "Whole games played, since the player started.",
                  tally.games)
    yield gauge(PREFIX + "recent_games", f"How many of the last whole games the recent mean "
                f"return covers (at most {RECENT_GAMES}).", len(tally.recent))
    recent = sum(tally.recent) / len(tally.recent) if tally.recent else None
    yield gauge(PREFIX + "recent_mean_return", "Mean return of the recent whole games "
                f"({PREFIX}recent_games of them); NaN before the first.", recent)
    yield labelled_counter(PREFIX + "refused", "Published policies refused, since the "
                           "player started, by kind (entry, size, signature, older, "
                           "environment, checksum, model).", "kind",
                           follower.refusals.items())
    yield counter(PREFIX + "source_errors", "Looks at the source and downloads that failed, "
                  "since the player started.", follower.source_errors)
    yield gauge(PREFIX + "last_good_look_timestamp_seconds", "Unix time the source's "
                "latest.json was last read; NaN before the first.", follower.last_good_look)


def player_health(follower: Follower, tally: PlayerTally) -> tuple[bool, str]:
    if tally.stopped:
        return False, "not playing: stopped"
    if tally.last_step_at is None or follower.current is None:
        return False, "not playing yet"
    idle = time.monotonic() - tally.last_step_at
    if idle > STALL_SECONDS:
        return False, f"stalled: no step for {idle:.0f} s"
    look = follower.last_good_look
    source = "never read" if look is None else f"last read {time.time() - look:.0f} s ago"
    return True, f"playing policy step {follower.step}; the source {source}"
