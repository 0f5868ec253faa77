"""The systemd notify protocol (sd_notify), without a dependency: datagrams to $NOTIFY_SOCKET.

READY=1 once learning runs, STATUS=<line> and WATCHDOG=1 from the main loop (so a hung
loop stops the pings and the service manager restarts it), STOPPING=1 on shutdown.
Without NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | None = None
        self._socket: socket.socket | None = None
        if address:
            # A leading '@' names a Linux abstract socket.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        usec = os.environ.get("WATCHDOG_USEC")
        self.watchdog_interval = int(usec) / 2e6 if usec and usec.isdigit() else None
        self._stopping = False

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *fields: str) -> None:
        if self._socket is None or self._address is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:  # the manager went away: keep learning, say it once
            log.warning("sd_notify to %s failed (%s); notifications off", self._address,
                        exc.strerror)
            self.close()

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def alive(self, status: str) -> None:
        self.notify("WATCHDOG=1", f"STATUS={status}")

    def stopping(self) -> None:
        """Once, when the shutdown begins (later calls say nothing more)."""
        if not self._stopping:
            self._stopping = True
            self.notify("STOPPING=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
