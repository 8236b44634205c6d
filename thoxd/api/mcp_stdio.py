"""`thoxd mcp-stdio`: MCP over stdin/stdout, relayed to a running daemon's /mcp.

For IDEs whose MCP client only starts local processes (Claude Desktop, some others): the IDE runs
`thoxd mcp-stdio --url http://thox.local:8080/mcp` and talks to it on stdin/stdout; each message
goes on to the box over streamable HTTP, and each answer, notification and progress report
comes back. Both ends are the official SDK's transports; this only relays. It ends when stdin
closes (the IDE stops it) or the box closes the session.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import anyio
from mcp.client.streamable_http import streamable_http_client
from mcp.server.stdio import stdio_server

logger = logging.getLogger("thoxd.mcp")

DEFAULT_URL = "http://127.0.0.1:8080/mcp"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bridge = commands.add_parser(
        "mcp-stdio",
        help="relay MCP between stdin/stdout and a running daemon's /mcp (for IDEs)",
        description="Relay MCP messages between stdin/stdout and a thoxd daemon's /mcp endpoint.",
    )
    bridge.add_argument("--url", default=DEFAULT_URL, help=f"the daemon's MCP URL ({DEFAULT_URL})")


def run(args: argparse.Namespace) -> int:
    # Logs go to stderr: stdout carries the protocol.
    logging.basicConfig(level=logging.WARNING, format="thoxd mcp-stdio: %(message)s")
    try:
        anyio.run(relay, args.url)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a box that cannot be reached: one line, not a traceback
        logger.error("%s: %s", args.url, exc)
        return 1
    return 0


async def relay(url: str) -> None:
    async with (
        stdio_server() as (from_ide, to_ide),
        streamable_http_client(url) as (from_box, to_box),
        anyio.create_task_group() as tasks,
    ):
        # The SDK types its streams with private protocols: Any here.
        async def pump(source: Any, sink: Any) -> None:
            async for message in source:
                if isinstance(message, Exception):
                    logger.warning("dropped a message that could not be read: %s", message)
                    continue
                await sink.send(message)
            tasks.cancel_scope.cancel()  # one side closed: the relay is over

        tasks.start_soon(pump, from_ide, to_box)
        tasks.start_soon(pump, from_box, to_ide)
