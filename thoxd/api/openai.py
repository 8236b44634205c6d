"""The OpenAI REST surface: chat and text completions (plain and SSE), embeddings, models.

Handlers stay thin: parse the body, start the work through `thoxd.api.start`, shape the answer.
A client that goes away cancels its generations, streaming or not, within one decode step.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from thoxd.access import UsageLedger
from thoxd.api.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationBody,
    parse,
)
from thoxd.api.serving import SSE_HEADERS, merged_events, sse_data, unless_gone
from thoxd.api.shapes import Choice, Envelope
from thoxd.api.start import Started, permit, split_prompts, start_chat, start_completion
from thoxd.api.toolcalls import Output
from thoxd.engine import Delta, Embedding, Engine, Failed, Finished, TokenLogprob
from thoxd.errors import UnsupportedParameter
from thoxd.guards.access import caller_of
from thoxd.guards.shutdown import Shutdown, shutting_down


class OpenAIRoutes:
    def __init__(
        self, engine: Engine, shutdown: Shutdown | None = None, ledger: UsageLedger | None = None
    ) -> None:
        self.engine = engine
        self.shutdown = shutdown or Shutdown()
        self.ledger = ledger  # counts embeddings (generations are counted by the engine hook)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ]

    # -- generation ------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        body = parse(ChatRequest, await request.body())
        started = await start_chat(self.engine, body, caller_of(request))
        return await self._respond(request, body, started, Envelope("chat", body.model, body.n))

    async def completions(self, request: Request) -> Response:
        body = parse(CompletionRequest, await request.body())
        started = await start_completion(self.engine, body, caller_of(request))
        return await self._respond(request, body, started, Envelope("text", body.model, body.n))

    async def _respond(
        self, request: Request, body: GenerationBody, started: Started, envelope: Envelope
    ) -> Response:
        request.state.response_id = envelope.id  # the x-request-id header (request_ids.py)
        if body.stream:
            return StreamingResponse(
                self._sse(started, envelope, body.include_usage),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        answer = await unless_gone(
            request, self._collect(started, envelope), started.cancel, self.shutdown
        )
        return Response(status_code=499) if answer is None else JSONResponse(answer)

    async def _collect(self, started: Started, envelope: Envelope) -> dict[str, Any]:
        n = len(started.generations)
        outputs = started.outputs()
        logprobs: list[list[TokenLogprob] | None] = [
            [] if g.logprobs is not None else None for g in started.generations
        ]
        finished: list[Finished | None] = [None] * n
        async for index, event in merged_events(started):
            if isinstance(event, Delta):
                outputs[index].feed(event.text)
                if (kept := logprobs[index]) is not None:
                    kept.extend(event.logprobs)
            elif isinstance(event, Failed):
                started.cancel()
                raise event.error
            elif event.finish_reason == "cancelled" and self.shutdown.ended:
                raise shutting_down()
            else:
                finished[index] = event
        choices = [
            Choice(out.finish(), fin, lps)
            for out, fin, lps in zip(outputs, finished, logprobs, strict=True)
            if fin is not None
        ]
        return envelope.completion(choices)

    async def _sse(
        self, started: Started, envelope: Envelope, include_usage: bool
    ) -> AsyncIterator[str]:
        finished: list[Finished | None] = [None] * len(started.generations)
        outputs = started.outputs()
        offsets = [0] * len(outputs)  # where each text completion's next piece starts
        # Past the shutdown's grace period: cancelled, and ended with a shutting_down event.
        forget = self.shutdown.at_end(started.cancel)
        try:
            if envelope.chat:
                for index in range(len(started.generations)):
                    yield sse_data(envelope.chunk(index, {"content": ""}, role=True))
            async for index, event in merged_events(started):
                if isinstance(event, Delta):
                    for chunk in self._pieces(envelope, index, event, outputs[index], offsets):
                        yield chunk
                elif isinstance(event, Failed):
                    yield sse_data(event.error.envelope())
                    return
                elif event.finish_reason == "cancelled" and self.shutdown.ended:
                    yield sse_data(shutting_down().envelope())
                    return
                else:
                    for delta in outputs[index].flush():
                        yield sse_data(envelope.chunk(index, delta))
                    finished[index] = event
                    reason = Choice(outputs[index].finish(), event).finish_reason
                    last = envelope.chunk(index, None, reason)
                    last["timings"] = event.timings.as_dict()
                    yield sse_data(last)
            if include_usage:
                yield sse_data(envelope.usage_chunk([f for f in finished if f is not None]))
            yield "data: [DONE]\n\n"
        finally:
            # Runs when the client disconnects too: the slots are freed within one step.
            started.cancel()
            forget()

    @staticmethod
    def _pieces(
        envelope: Envelope, index: int, event: Delta, output: Output, offsets: list[int]
    ) -> Iterator[str]:
        """The SSE events for one engine delta: its text read through the choice's output
        (content, or tool call pieces), its tokens' log probabilities with the first of them."""
        deltas = output.feed(event.text)
        logprobs = list(event.logprobs) if event.logprobs else None
        if logprobs is None and len(deltas) == 1 and set(deltas[0]) == {"content"}:
            yield envelope.delta_event(index, deltas[0]["content"])  # the common, fast case
            offsets[index] += len(deltas[0]["content"])
            return
        if logprobs is not None and not deltas:
            deltas = [{}] if envelope.chat else [{"content": ""}]
        for delta in deltas:
            chunk = envelope.chunk(index, delta, logprobs=logprobs, offset=offsets[index])
            offsets[index] += len(delta.get("content", ""))
            logprobs = None
            yield sse_data(chunk)

    # -- embeddings ------------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        body = parse(EmbeddingRequest, await request.body())
        items = split_prompts(body.input)  # at most 2048 (schemas.py), embedded one by one
        caller = caller_of(request)
        permit(self.engine, caller, body.model)
        async with self.engine.use(body.model, body.keep_alive) as model:
            if body.dimensions not in (None, size := model.llama.n_embd):
                raise UnsupportedParameter(
                    f"The model '{model.spec.id}' makes {size}-dimension vectors only; it was"
                    " not trained to give shortened ones ('dimensions').",
                    param="dimensions",
                )
            inputs = [
                await model.tokenize(item, add_special=True) if isinstance(item, str) else item
                for item in items
            ]
            job = model.embed(inputs)  # holds the model until it ends
        answer = await unless_gone(request, self._embedded(job, body), job.cancel, self.shutdown)
        if answer is None:
            return Response(status_code=499)
        if self.ledger is not None:
            tokens = answer["usage"]["prompt_tokens"]
            self.ledger.record(caller.id, model.spec.id, tokens, 0, 1)
        return JSONResponse(answer)

    async def _embedded(self, job: Embedding, body: EmbeddingRequest) -> dict[str, Any]:
        try:
            vectors = await job.result()
        except asyncio.CancelledError:
            if self.shutdown.ended:  # cancelled past the grace period, not by the client
                raise shutting_down() from None
            raise
        n_tokens = sum(len(tokens) for tokens in job.inputs)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(vector, body)}
                for i, vector in enumerate(vectors)
            ],
            "model": body.model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }


def _encode(vector: list[float], body: EmbeddingRequest) -> list[float] | str:
    if body.encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
