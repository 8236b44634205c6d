"""What crosses between the event loop and an engine thread: a Generation and its events, and
an Embedding and its vectors.

The event loop creates one and submits it; the engine thread hands results back with
`call_soon_threadsafe`; the event loop reads them (`async for` over a Generation's events, `await`
an Embedding's result). Cancelling is a flag the engine thread checks before every step, plus a
wake-up so a waiting request leaves at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from thoxd.engine.sampling import GrammarSpec, SamplingParams, TokenLogprob
from thoxd.errors import ThoxdError


@dataclass
class Timings:
    """llama-server's timing fields, so clients written for it read ours unchanged."""

    cache_n: int = 0
    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    queue_ms: float = 0.0
    draft_n: int = 0  # tokens drafted by prompt lookup and checked (thoxd.engine.drafts)
    draft_n_accepted: int = 0

    def as_dict(self) -> dict[str, Any]:
        drafts = {"draft_n": self.draft_n, "draft_n_accepted": self.draft_n_accepted}
        return {
            "cache_n": self.cache_n,
            "prompt_n": self.prompt_n,
            "prompt_ms": round(self.prompt_ms, 3),
            "prompt_per_second": _rate(self.prompt_n, self.prompt_ms),
            "predicted_n": self.predicted_n,
            "predicted_ms": round(self.predicted_ms, 3),
            "predicted_per_second": _rate(self.predicted_n, self.predicted_ms),
            "queue_ms": round(self.queue_ms, 3),
            **(drafts if self.draft_n else {}),  # as llama-server: only when there were drafts
        }


def _rate(n: int, ms: float) -> float:
    return round(n * 1000.0 / ms, 3) if ms > 0 else 0.0


@dataclass(frozen=True)
class Delta:
    text: str
    # Each token behind this text, when the request asked for log probabilities.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    timings: Timings


@dataclass(frozen=True)
class Failed:
    error: ThoxdError


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Generation:
    """One request for tokens: its prompt, its limits, and the channel its events come back by."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stops: tuple[str, ...] = ()
    # Stop strings that are one special token (e.g. "<start_of_turn>"): control tokens render
    # as no text, so they are matched by id.
    stop_tokens: frozenset[int] = frozenset()
    grammar: GrammarSpec | None = None  # what the output must match (JSON mode, tool calls)
    logprobs: int | None = None  # report each token's log probability and this many others
    # Another choice of the same prompt (n > 1): this one starts from a copy of that one's
    # prefilled cells instead of prefilling the prompt again (thoxd.engine.forks).
    fork_of: Generation | None = None
    client: str = ""  # who asked (an address, or a key): the queue is fair between clients
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    _queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    _wake: Callable[[], None] = lambda: None
    # Run on the event loop with the last event (Finished or Failed): the model's use count.
    _on_end: list[Callable[[], None]] = field(default_factory=list)
    # Set by the engine thread on admission: from then on every event goes through it.
    outbox: Outbox | None = None

    def push(self, event: Event) -> None:
        """Called from the engine thread (or on the event loop before the request is queued)."""
        if self.outbox is not None:
            self.outbox.put(self, event)
            return
        # A closed loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.deliver, event)

    def deliver(self, event: Event) -> None:
        """On the event loop."""
        if isinstance(event, Delta):
            self._queue.put_nowait(event)
        else:
            self._end(event)

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the event loop once this generation has ended, however it ends."""
        self._on_end.append(callback)

    def _end(self, event: Event) -> None:
        self._queue.put_nowait(event)
        callbacks, self._on_end = self._on_end, []
        for callback in callbacks:
            callback()

    def cancel(self) -> None:
        """Called from the event loop; the engine stops this request within one step."""
        if not self.cancelled:
            self.cancelled = True
            self._wake()

    async def events(self) -> AsyncIterator[Event]:
        """Every event of this generation, ending with its Finished or Failed."""
        while True:
            event = await self._queue.get()
            yield event
            if not isinstance(event, Delta):
                return


class Outbox:
    """The events an engine thread produced, held back until `flush`: just before it enters
    llama_decode, and at the end of each round. One wake-up of the event loop per step instead
    of one per token, and the loop's work on them (HTTP, JSON) runs while the engine thread is
    inside llama.cpp without the GIL, not in the Python between two decodes, where each of
    its ctypes calls would hand the GIL to the loop until that work was done."""

    def __init__(self) -> None:
        self._held: list[tuple[Generation, Event]] = []

    def put(self, gen: Generation, event: Event) -> None:
        self._held.append((gen, event))

    def flush(self) -> None:
        if not self._held:
            return
        held, self._held = self._held, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, Event]]] = {}
        for gen, event in held:
            by_loop.setdefault(gen._loop, []).append((gen, event))
        for loop, events in by_loop.items():
            # A closed loop raises RuntimeError: nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver_all, events)


def _deliver_all(events: list[tuple[Generation, Event]]) -> None:
    for gen, event in events:
        gen.deliver(event)


@dataclass(eq=False)
class Embedding:
    """One embeddings request: each input's token ids; a vector per input comes back, or an error.

    The engine thread embeds it a chunk at a time between generation steps, so the progress
    through the current input lives here, written by that thread only."""

    inputs: list[list[int]]
    cancelled: bool = False
    vectors: list[list[float]] = field(default_factory=list)
    position: int = 0  # tokens of the current input embedded so far
    total: Any = None  # their embeddings' sum (a numpy vector), engine thread only
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    _result: asyncio.Future[list[list[float]]] = field(init=False)
    _wake: Callable[[], None] = lambda: None
    _on_end: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._result = self._loop.create_future()

    def finish(self) -> None:
        """Called from the engine thread once every input has its vector."""
        self._settle(lambda: self._result.set_result(self.vectors))

    def fail(self, error: ThoxdError) -> None:
        """Called from the engine thread."""
        self._settle(lambda: self._result.set_exception(error))

    def drop(self) -> None:
        """Called from the engine thread for a cancelled request: nobody waits for its result."""
        self._settle(self._result.cancel)

    def _settle(self, set_result: Callable[[], object]) -> None:
        def settle() -> None:
            if not self._result.done():
                set_result()
            callbacks, self._on_end = self._on_end, []
            for callback in callbacks:
                callback()

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
            self._loop.call_soon_threadsafe(settle)

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the event loop once this request has ended, however it ends."""
        self._on_end.append(callback)

    def cancel(self) -> None:
        """Called from the event loop; the engine drops this request before its next chunk."""
        if not self.cancelled:
            self.cancelled = True
            self._wake()

    async def result(self) -> list[list[float]]:
        # Shielded: a caller that is cancelled (its client left) does not settle it for the
        # engine, which still ends it, and so releases the model.
        return await asyncio.shield(self._result)
