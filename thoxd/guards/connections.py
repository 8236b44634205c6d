"""How many connections at once. Each one holds a file descriptor; past the process's limit
(1024 unless raised) accept() fails, asyncio logs a traceback for every failed attempt (~10 000 a
second, measured), and nothing new gets in: not /health, not a model file. So:

    raise_fd_limit()          at start, the soft RLIMIT_NOFILE goes up to the hard limit
    connection_cap()          `max_connections`, lowered if need be to leave descriptors free
                              for model files, mDNS, logs and connections being accepted
    ConnectionLimitProtocol   uvicorn's h11 protocol: a connection past the cap gets a 503
                              too_many_connections at once and is closed, before it can send
                              anything. WebSockets count: uvicorn keeps them in the same set.
    ConnectionLimit           the cap, and the refusals: the first of a flood is logged at
                              once, the rest counted and logged once a minute, never one by one
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from thoxd.errors import TooManyConnections
from thoxd.guards.timeouts import raw_response

logger = logging.getLogger("thoxd.security")

# uvicorn's listen backlog (its default is 2048). asyncio accepts up to this many connections in
# one go and closes a refused one a few loop turns later, so a flood holds about 4 x BACKLOG
# descriptors in flight besides the connections admitted.
BACKLOG = 128
FD_RESERVE = 256  # model files, mDNS and notify sockets, logs, /proc reads, worker threads
MIN_CONNECTIONS = 8
NOFILE_CEILING = 1 << 20  # when the hard limit is "unlimited": the kernel's usual fs.nr_open


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open file limit from %d to %d: %s", soft, target, exc)
    return soft


def connection_cap(max_connections: int, fd_limit: int) -> int:
    """`max_connections`, or fewer if the file descriptor limit cannot hold them."""
    room = fd_limit - FD_RESERVE - 4 * BACKLOG
    if max_connections <= room:
        return max_connections
    cap = max(room, MIN_CONNECTIONS)
    logger.warning(
        "max_connections lowered from %d to %d: the open file limit is %d "
        "(LimitNOFILE= in the systemd unit, or ulimit -n)",
        max_connections,
        cap,
        fd_limit,
    )
    return cap


class ConnectionLimit:
    """The cap on open connections, and the refusal log.

    The first refusal is logged at once; later ones are counted and summed up in one line per
    `every` seconds while they go on, so a flood of connections cannot flood the log too.
    """

    def __init__(self, cap: int, *, every: float = 60.0) -> None:
        self.cap = cap
        self.every = every
        self.refused = 0  # since the process started
        self.response = raw_response(TooManyConnections(cap))
        self._unreported = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def flooding(self) -> bool:
        """Whether refusals are being counted for the next summary line rather than logged."""
        return self._timer is not None

    def refuse(self, transport: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop) -> None:
        transport.write(self.response)
        transport.close()
        self.refused += 1
        self._unreported += 1
        if self._timer is None:
            logger.warning(
                "refused a connection: %d are open, the limit (max_connections); "
                "further refusals are counted and logged once a minute",
                self.cap,
            )
            self._unreported = 0
            self._timer = loop.call_later(self.every, self._report, loop)

    def _report(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._unreported == 0:
            return  # the flood is over: the next refusal is logged at once again
        logger.warning(
            "refused %d more connections in the last %g s: %d are open, the limit "
            "(max_connections)",
            self._unreported,
            self.every,
            self.cap,
        )
        self._unreported = 0
        self._timer = loop.call_later(self.every, self._report, loop)


class ConnectionLimitProtocol(H11Protocol):
    """uvicorn's h11 protocol, refusing connections past `connection_limit.cap`.

    uvicorn's set of connections holds every open HTTP connection and WebSocket (an upgraded
    connection moves from one protocol to the other within the set). A refused connection
    leaves the set at once, so a flood of refusals does not hold out the next client.
    """

    connection_limit: ClassVar[ConnectionLimit]  # set by thoxd.server

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.connection_limit.cap:
            self.connections.discard(self)
            self.connection_limit.refuse(transport, self.loop)
