"""Running the app under uvicorn: thoxd's logging, systemd's notify protocol, graceful shutdown.

start     the open file limit goes up to the hard limit, and connections are capped below it
          (thoxd.guards.connections); uvicorn runs the lifespan (the default model starts
          loading, mDNS starts probing), then binds the socket; once mDNS has registered,
          systemd gets READY=1, and the WATCHDOG=1 pings (from the event loop) and STATUS=
          updates begin
SIGTERM   STOPPING=1; the listening socket closes; running requests get up to
          `shutdown_grace_seconds` to finish, new ones get 503 (thoxd.guards.shutdown); then what
          still streams is ended; uvicorn closes the connections and ends the lifespan (mDNS
          goodbyes, the engine); the process exits 0
SIGHUP    models.toml is read again (systemctl reload thoxd): new entries serve at once, changed
          or removed ones once their model is idle; an invalid file is logged and ignored
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from thoxd.app import create_app, reload_catalog
from thoxd.device.discovery import Discovery
from thoxd.device.systemd import Systemd
from thoxd.engine import Engine
from thoxd.guards.connections import (
    BACKLOG,
    ConnectionLimit,
    ConnectionLimitProtocol,
    connection_cap,
    raise_fd_limit,
)
from thoxd.guards.shutdown import Shutdown
from thoxd.guards.timeouts import HeaderTimeoutProtocol
from thoxd.settings import Settings

logger = logging.getLogger("thoxd")

END_SECONDS = 5  # past the grace period: for streams to end and connections to close
MDNS_WAIT_SECONDS = 10.0  # READY=1 waits this long at most for mDNS registration
STATUS_POLL_SECONDS = 0.5


class Server(uvicorn.Server):
    """uvicorn's Server, plus systemd's notify protocol and thoxd's graceful shutdown."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        systemd: Systemd,
        graceful: Shutdown,
        grace: float,
        status: Callable[[], str],
        before_ready: Callable[[], Awaitable[object]] | None = None,
        on_reload: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(config)
        self.on_reload = on_reload
        self.systemd = systemd
        self.graceful = graceful
        self.grace = grace
        self.status = status
        self.before_ready = before_ready
        self._watchdog: asyncio.Task[None] | None = None
        self._status_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.systemd.notify(STATUS="starting")
        # uvicorn runs the lifespan first, then binds: READY=1 only after both.
        await super().startup(sockets=sockets)
        if not self.started:
            return
        if self.before_ready is not None:
            await self.before_ready()  # mDNS registered (or given up on, and logged)
        if self.on_reload is not None:  # SIGHUP (systemctl reload): re-read models.toml
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.on_reload)
        self.systemd.notify(READY=1, STATUS=self.status())
        self._watchdog = asyncio.create_task(self.systemd.watchdog())
        self._status_task = asyncio.create_task(self._report_status())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.systemd.notify(STOPPING=1, STATUS="stopping")
        if self._status_task is not None:
            self._status_task.cancel()
        for server in self.servers:
            server.close()  # stop accepting now; the connections stay open
        if self.graceful.active:
            logger.info(
                "shutting down: %d requests running, %.0f s to finish",
                self.graceful.active,
                self.grace,
            )
        if not await self.graceful.drain(self.grace, give_up=lambda: self.force_exit):
            logger.info("grace period over: ending %d requests", self.graceful.active)
        await self.graceful.end(END_SECONDS)
        # uvicorn's own shutdown: close the connections, wait for them, end the lifespan.
        await super().shutdown(sockets=sockets)
        if self._watchdog is not None:  # pinged until the end: the stop may take a while
            self._watchdog.cancel()
        self.systemd.close()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            # uvicorn raises a caught signal again after its shutdown, so the process would end
            # "killed by SIGTERM"; a stop that was asked for and went well exits 0 instead.
            # (Ctrl+C still ends as KeyboardInterrupt: exit 130.)
            self._captured_signals.remove(sig)

    async def _report_status(self) -> None:
        sent = self.status()
        while True:
            await asyncio.sleep(STATUS_POLL_SECONDS)
            status = self.status()
            if status != sent:
                self.systemd.notify(STATUS=status)
                sent = status


def model_status(engine: Engine, default_model: str, port: int) -> Callable[[], str]:
    """The STATUS= line systemctl shows: loading, serving, or failed."""
    model_id = engine.catalog.get(default_model).id

    def status() -> str:
        state = engine.state(model_id)
        if state == "loaded":
            return f"serving {model_id} on :{port}"
        if state == "error":
            return f"{model_id} failed to load; /health answers 503"
        return f"loading {model_id}"

    return status


def http_protocol(header_timeout: float, limit: ConnectionLimit) -> type[H11Protocol]:
    """uvicorn's h11 protocol with thoxd's connection guards (thoxd/guards/): the cap on open
    connections first, then the deadline for request headers. uvicorn has neither."""

    class Protocol(ConnectionLimitProtocol, HeaderTimeoutProtocol):
        pass

    Protocol.header_timeout = header_timeout
    Protocol.connection_limit = limit
    return Protocol


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def serve(settings: Settings) -> int:
    # Every connection is a file descriptor: raise the limit, then cap connections below it.
    fd_limit = raise_fd_limit()
    limit = ConnectionLimit(connection_cap(settings.max_connections, fd_limit))
    logger.info("at most %d connections at once (open file limit %d)", limit.cap, fd_limit)
    graceful = Shutdown()
    app = create_app(settings, shutdown=graceful)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        # h11 with a cap on connections and a deadline for request headers (thoxd/guards/).
        http=http_protocol(settings.header_timeout_seconds, limit),
        backlog=BACKLOG,  # bounds the descriptors a flood holds while being refused
        # The grace period for running requests is thoxd's (Server.shutdown); this is the
        # time after it for connections to close before their tasks are cancelled.
        timeout_graceful_shutdown=END_SECONDS,
        # Explicit, so a fallback implementation cannot drop keepalive: a peer that stops
        # answering pings is closed, which cancels everything it started.
        ws="websockets-sansio",
        ws_max_size=settings.max_body_bytes,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
    )
    discovery: Discovery = app.state.discovery
    server = Server(
        config,
        systemd=Systemd(os.environ),
        graceful=graceful,
        grace=settings.shutdown_grace_seconds,
        status=model_status(app.state.engine, settings.default_model, settings.port),
        before_ready=lambda: discovery.wait_ready(MDNS_WAIT_SECONDS),
        on_reload=lambda: reload_catalog(app.state.engine, settings),
    )
    everywhere = settings.host in ("0.0.0.0", "::")
    shown = "127.0.0.1" if everywhere else settings.host
    logger.info(
        "thoxd starting: OpenAI API at http://%s:%d/v1%s",
        shown,
        settings.port,
        " (and on every LAN address of this machine)" if everywhere else "",
    )
    server.run()
    code = 0 if server.started else 1
    if app.state.engine.stuck:
        # A decode outlived the shutdown, so its model was never freed; the interpreter's own
        # exit (atexit hooks, llama.cpp's static destructors) could still tear down what that
        # thread uses and crash. End here instead, deliberately, with the code we would have.
        logger.warning("an engine thread was still inside llama.cpp: exiting without teardown")
        logging.shutdown()
        os._exit(code)
    return code
