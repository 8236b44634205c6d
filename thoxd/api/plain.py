"""Generations read as plain text, for the seed routes (thoxd/api/locallab.py, rox.py): the
whole text of each, or the first one streamed as SSE. Their dialects only differ in how they
frame the text and the errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import StreamingResponse

from thoxd.api.serving import SSE_HEADERS, merged_events, unless_gone
from thoxd.api.start import Started
from thoxd.engine import Delta, Failed, Finished
from thoxd.errors import ThoxdError
from thoxd.guards.shutdown import Shutdown, shutting_down


@dataclass
class Texts:
    texts: list[str]
    finished: list[Finished]

    def usage(self) -> dict[str, int]:
        prompt = sum(f.prompt_tokens for f in self.finished)
        completion = sum(f.completion_tokens for f in self.finished)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def finish_reason(finished: Finished) -> str:
    # A time limit (max_time) ends a generation as a length limit does.
    return "length" if finished.finish_reason == "cancelled" else finished.finish_reason


def _time_limit(started: Started, seconds: float | None) -> Callable[[], None]:
    """Cancel the generations after `seconds` (a seed route's `max_time`): the answer is what
    was written by then. Returns what stops the clock."""
    if seconds is None:
        return lambda: None
    return asyncio.get_running_loop().call_later(seconds, started.cancel).cancel


async def _collect(started: Started, shutdown: Shutdown) -> Texts:
    n = len(started.generations)
    texts = [""] * n
    finished: list[Finished | None] = [None] * n
    async for index, event in merged_events(started):
        if isinstance(event, Delta):
            texts[index] += event.text
        elif isinstance(event, Failed):
            started.cancel()
            raise event.error
        elif event.finish_reason == "cancelled" and shutdown.ended:
            raise shutting_down()
        else:
            finished[index] = event
    return Texts(texts, [f for f in finished if f is not None])


async def collect(
    request: Request, started: Started, shutdown: Shutdown, max_time: float | None = None
) -> Texts | None:
    """Every generation's whole text (the engine's error is raised), or None when the client
    left first (its slots freed at once)."""
    stop_clock = _time_limit(started, max_time)
    try:
        return await unless_gone(request, _collect(started, shutdown), started.cancel, shutdown)
    finally:
        stop_clock()


def streamed(
    started: Started,
    shutdown: Shutdown,
    max_time: float | None,
    frame: Callable[[str], str],
    frame_error: Callable[[str], str],
) -> StreamingResponse:
    """The first generation's text as SSE: each piece framed by `frame`, then `data: [DONE]`;
    an error after the start (the engine's, or shutting_down past the grace period) framed by
    `frame_error` instead. The generation is cancelled however the stream ends."""

    async def events() -> AsyncIterator[str]:
        forget = shutdown.at_end(started.cancel)
        stop_clock = _time_limit(started, max_time)
        try:
            async for event in started.generations[0].events():
                if isinstance(event, Delta):
                    if event.text:
                        yield frame(event.text)
                elif isinstance(event, Failed):
                    raise event.error
                elif event.finish_reason == "cancelled" and shutdown.ended:
                    raise shutting_down()
            yield "data: [DONE]\n\n"
        except ThoxdError as exc:
            yield frame_error(exc.message)
        finally:
            stop_clock()
            started.cancel()
            forget()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
