"""Reading a Generation's events in engine tests."""

from __future__ import annotations

from thoxd.engine.request import Delta, Failed, Finished, Generation


async def collect(gen: Generation) -> tuple[str, Finished]:
    """The generated text and the Finished event; a Failed event raises its error."""
    parts: list[str] = []
    async for event in gen.events():
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Failed):
            raise event.error
        else:
            return "".join(parts), event
    raise AssertionError("no Finished event")
