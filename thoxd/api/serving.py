"""What every HTTP generation surface shares once a request has started: the events of its
choices as they come, an answer that is dropped (and its work cancelled) when the client leaves,
and the SSE framing. Chat and text completions (`thoxd.api.openai`) and the Responses API
(`thoxd.api.responses`) both serve through these.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.types import Receive

from thoxd.api.start import Started
from thoxd.engine import Delta, Failed, Finished
from thoxd.guards.shutdown import Shutdown

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def merged_events(started: Started) -> AsyncIterator[tuple[int, Delta | Finished | Failed]]:
    """Events of every choice as they come, tagged with the choice index."""
    if len(started.generations) == 1:
        async for event in started.generations[0].events():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Delta | Finished | Failed]] = asyncio.Queue()

    async def pump(index: int) -> None:
        async for event in started.generations[index].events():
            await queue.put((index, event))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(started.generations))]
    try:
        open_choices = len(tasks)
        while open_choices:
            index, event = await queue.get()
            if not isinstance(event, Delta):
                open_choices -= 1
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


async def until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_gone(
    request: Request,
    work: Awaitable[T],
    cancel: Callable[[], None],
    shutdown: Shutdown,
) -> T | None:
    """`work`'s result, or None if the client left first: then `cancel` frees what it held
    (slots, an embedding in progress) now, since nobody will read the answer. Past the
    shutdown's grace period `cancel` runs too, and the answer is a 503."""
    done = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_disconnect(request.receive))
    forget = shutdown.at_end(cancel)
    await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    forget()
    gone.cancel()
    if not done.done():
        cancel()
        done.cancel()
        return None
    return done.result()


def sse_data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def sse_event(name: str, obj: dict[str, Any]) -> str:
    """A named event (`event:` line, then its data), as the Responses API streams them."""
    return f"event: {name}\n{sse_data(obj)}"
