"""systemd's notify protocol, without libsystemd: READY, STATUS, WATCHDOG, STOPPING.

A `Type=notify` service tells systemd how it is doing by sending datagrams of `KEY=value` lines to
the AF_UNIX socket systemd names in `NOTIFY_SOCKET` (a path, or `@name` for the abstract
namespace). With `WatchdogSec=` set, systemd also passes `WATCHDOG_USEC` (and `WATCHDOG_PID`) and
kills and restarts the service when no `WATCHDOG=1` arrives within that time. See sd_notify(3) and
sd_watchdog_enabled(3).

    systemd = Systemd(os.environ)
    systemd.notify(READY=1, STATUS="serving gemma-3-270m on :8080")
    asyncio.create_task(systemd.watchdog())     # WATCHDOG=1 every WATCHDOG_USEC / 2
    systemd.notify(STOPPING=1)

Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op, so the daemon runs the same anywhere.
The watchdog pings come from a task on the event loop, not from a thread: a loop that stops
running stops the pings, and systemd restarts the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from collections.abc import Mapping

logger = logging.getLogger("thoxd.systemd")

SEND_TIMEOUT = 1.0  # seconds; a stalled systemd must not hold the event loop for long
_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")


class Systemd:
    """The service manager as seen from the environment it started us with."""

    def __init__(self, environ: Mapping[str, str], *, pid: int | None = None) -> None:
        self.address = _address(environ.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(environ, os.getpid() if pid is None else pid)
        self._socket: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        """Whether systemd listens: NOTIFY_SOCKET names a socket we can use."""
        return self.address is not None

    def notify(self, **fields: str | int | bool) -> bool:
        """Send one datagram of `KEY=value` lines, e.g. `notify(READY=1, STATUS="loading")`.

        True when it was sent; False without NOTIFY_SOCKET or when sending failed (logged, never
        raised: the daemon works on without systemd's bookkeeping).
        """
        if self.address is None or not fields:
            return False
        data = "".join(f"{_key(k)}={_value(v)}\n" for k, v in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.settimeout(SEND_TIMEOUT)
            self._socket.sendto(data, self.address)
        except OSError as exc:
            # Warn once; a systemd that went away would otherwise fill the log every ping.
            level = logging.DEBUG if self._failed else logging.WARNING
            logger.log(level, "could not notify systemd (%s): %s", ", ".join(fields), exc)
            self._failed = True
            return False
        return True

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings, half of WATCHDOG_USEC (as sd_watchdog_enabled(3)
        advises); None when systemd asks for no watchdog, or asks another process for it."""
        if self.address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    async def watchdog(self) -> None:
        """Ping systemd every `watchdog_interval()` seconds, from the event loop, until cancelled.
        Returns at once when no watchdog is asked for."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self.notify(WATCHDOG=1)
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _address(value: str) -> str | None:
    if value.startswith("@"):  # the abstract namespace: a name that starts with a NUL byte
        return "\0" + value[1:] if len(value) > 1 else None
    if value.startswith("/"):
        return value
    if value:
        logger.warning("NOTIFY_SOCKET is neither a path nor @name; not notifying systemd")
    return None


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid is not None:
        try:
            if int(watchdog_pid) != pid:
                return None  # the watchdog is meant for another process
        except ValueError:
            return None
    return usec


def _key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"not a notify field name: {key!r}")
    return key


def _value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    # One field is one line: a newline would start another field.
    return " ".join(str(value).splitlines())
