"""Running the app under uvicorn, with thoxd's logging."""

from __future__ import annotations

import logging

import uvicorn

from thoxd.app import create_app
from thoxd.settings import Settings

logger = logging.getLogger("thoxd")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def serve(settings: Settings) -> int:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
        # Explicit, so a fallback implementation cannot drop keepalive: a peer that stops
        # answering pings is closed, which cancels everything it started.
        ws="websockets-sansio",
        ws_max_size=settings.max_body_bytes,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
    )
    server = uvicorn.Server(config)
    everywhere = settings.host in ("0.0.0.0", "::")
    shown = "127.0.0.1" if everywhere else settings.host
    logger.info(
        "thoxd starting: OpenAI API at http://%s:%d/v1%s",
        shown,
        settings.port,
        " (and on every LAN address of this machine)" if everywhere else "",
    )
    server.run()
    return 0 if server.started else 1
