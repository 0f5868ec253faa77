"""The daemon's stream across faults: opened with a seed that depends on where the run
stands, reopened after a failure with bounded exponential backoff, given up on after
`faults.stream_max_failures` failures in a row."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from runtime.daemon.config import Config
from runtime.daemon.loop import FaultCounts, StreamFault
from runtime.streams import Stream, StreamError, open_stream

log = logging.getLogger("runtime.daemon")


def stream_seed(seed: int, steps: int) -> int:
    """The stream's seed for a start at all-time step `steps`: `seed` for a new run, else
    one derived from both, so that a restart that cannot restore the stream's state does
    not replay the episode starts of the first run."""
    if steps == 0:
        return seed
    return int(np.random.SeedSequence([seed, steps]).generate_state(1)[0])


class StreamSupervisor:
    """Counts consecutive failures (a good step clears them) and reopens the stream."""

    def __init__(self, config: Config, stopping: Callable[[], bool]) -> None:
        """`stopping`: true once a stop was asked for, which cuts a backoff short."""
        self.config = config
        self.stopping = stopping
        self.consecutive = 0

    def open(self, steps: int) -> Stream:
        """A new stream for a start at all-time step `steps`; raises StreamError."""
        return open_stream(self.config.env, stream_seed(self.config.seed, steps))

    def recover(self, fault: Exception, broken: Stream, steps: int, counts: FaultCounts,
                attach: Callable[[Stream], None]) -> bool:
        """Replace `broken` after a backoff and hand the new stream to `attach` (which may
        fail as the stream resets); every failed attempt is a failure in a row. False:
        give up."""
        faults = self.config.faults
        while True:
            self.consecutive += 1
            counts.stream_failures += 1
            if self.consecutive >= faults.stream_max_failures:
                log.error("stream failure %d/%d: %s", self.consecutive,
                          faults.stream_max_failures, fault)
                return False
            wait = min(faults.stream_backoff_seconds * 2 ** (self.consecutive - 1),
                       faults.stream_backoff_max_seconds)
            log.warning("stream failure %d/%d: %s; recreating it in %.1fs", self.consecutive,
                        faults.stream_max_failures, fault, wait)
            deadline = time.monotonic() + wait
            while not self.stopping() and time.monotonic() < deadline:
                time.sleep(min(0.1, wait))  # stay responsive to signals while backing off
            try:
                broken.close()
            except Exception:  # noqa: BLE001, S110 - a broken stream may fail to close too
                pass
            try:
                broken = self.open(steps)
                attach(broken)
                return True
            except (StreamError, StreamFault) as exc:
                fault = exc
