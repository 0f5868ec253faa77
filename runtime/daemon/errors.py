"""The daemon's own bad-input error; its command line turns it into one line and exit 2."""

from __future__ import annotations


class SetupError(Exception):
    """Bad input found while the daemon prepares to learn (its run directory, stream,
    checkpoint or signing key), before the first step: the message names the key or file."""
