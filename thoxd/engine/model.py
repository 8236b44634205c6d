"""One catalog model in memory: weights, a generation context and its scheduler thread, plus
what residency needs to know about it (its memory, whether anyone is using it, since when idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thoxd.catalog.entries import ModelSpec
from thoxd.engine.llama import Batch, ContextConfig, LlamaContext, LlamaLoadError, LlamaModel
from thoxd.engine.memory import MemoryEstimate
from thoxd.engine.request import Finished, Generation
from thoxd.engine.scheduler import Scheduler, SchedulerStats
from thoxd.engine.templates import ChatTemplate, TemplateInvalid
from thoxd.errors import (
    ContextLengthExceeded,
    EngineFailure,
    InvalidRequest,
    UnsupportedCapability,
)

logger = logging.getLogger("thoxd.engine")

# Prompts longer than this are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 4096
# Embeddings are decoded this many tokens at a time: llama.cpp computes logits for every token
# of a ubatch, so memory follows this, not the input's length.
EMBED_BATCH = 64


@dataclass(frozen=True)
class EngineConfig:
    models_dir: Path
    threads: int
    slots: int
    queue_size: int
    batch_size: int
    memory_budget: int = 1 << 62  # bytes every loaded model may use together
    keep_alive: float = math.inf  # seconds idle before a model is unloaded
    draft_max: int = 15  # tokens drafted per sequence and step by prompt lookup; 0: none

    @property
    def max_outputs(self) -> int:
        """Output rows one step may have: a row per slot, or one sequence's full draft."""
        return max(self.slots, self.draft_max + 1)


class LoadedModel:
    """A loaded model. Its use count and idle clock are read and written on the event loop."""

    def __init__(
        self,
        spec: ModelSpec,
        path: Path,
        config: EngineConfig,
        on_finished: Callable[[str, Finished], None] | None = None,
        memory: MemoryEstimate | None = None,
    ) -> None:
        self.spec = spec
        self.n_ctx = spec.n_ctx
        self.loaded_at = time.time()
        self.memory = memory or MemoryEstimate(path.stat().st_size, 0, 0)
        self.keep_alive = math.inf  # seconds idle before unloading: the Engine sets it
        self.last_used = time.monotonic()
        self._users = 0
        self._config = config
        self.llama = LlamaModel(path, n_gpu_layers=spec.n_gpu_layers)
        try:
            self._ctx = LlamaContext(
                self.llama,
                ContextConfig(
                    # Unified KV sized so every slot can hold a full context at once: a request
                    # is never cut short because others are using the cache.
                    n_ctx=spec.n_ctx * config.slots,
                    n_seq_max=config.slots,
                    n_batch=config.batch_size,
                    n_threads=config.threads,
                    max_outputs=config.max_outputs,
                    max_outputs_per_seq=config.draft_max + 1,
                ),
            )
        except LlamaLoadError:
            self.llama.close()
            raise
        self.scheduler = Scheduler(
            self.llama,
            self._ctx,
            n_slots=config.slots,
            n_ctx_seq=spec.n_ctx,
            queue_size=config.queue_size,
            draft_max=config.draft_max,
            max_outputs=config.max_outputs,
            name=spec.id,
            on_finished=(lambda f: on_finished(spec.id, f)) if on_finished else None,
        )
        self._embed_ctx: LlamaContext | None = None
        self.template = self._chat_template()
        self.scheduler.start()

    def _chat_template(self) -> ChatTemplate | None:
        source = self.spec.chat_template or self.llama.meta("tokenizer.chat_template")
        if not source:
            return None
        try:
            return ChatTemplate(source, bos_token="<bos>" if self.llama.add_bos else "")
        except TemplateInvalid as exc:
            # The model still serves completions and embeddings; chat answers 400.
            logger.warning("model %s: %s; chat is disabled", self.spec.id, exc)
            return None

    # -- residency ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Someone holds it: a request between lookup and submit, or an unfinished generation."""
        return self._users > 0

    def idle_for(self, now: float) -> float:
        return 0.0 if self.busy else now - self.last_used

    @contextlib.contextmanager
    def lease(self) -> Iterator[LoadedModel]:
        self._users += 1
        try:
            yield self
        finally:
            self._release()

    def _release(self) -> None:
        self._users -= 1
        self.last_used = time.monotonic()

    # -- prompts ---------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[dict[str, Any]]) -> str:
        if "chat" not in self.spec.capabilities or self.template is None:
            raise UnsupportedCapability(
                f"The model '{self.spec.id}' does not do chat completions.", param="model"
            )
        return self.template.render(messages)

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self.llama.tokenize(text, add_special=add_special)
        return await asyncio.to_thread(self.llama.tokenize, text, add_special=add_special)

    def stop_tokens(self, stops: Sequence[str]) -> frozenset[int]:
        """The stop strings that are a single special token, as token ids."""
        ids = set()
        for stop in stops:
            tokens = self.llama.tokenize(stop, add_special=False, parse_special=True)
            if len(tokens) == 1 and not self.llama.piece(tokens[0]):
                ids.add(tokens[0])
        return frozenset(ids)

    def check_fits(self, n_prompt: int, param: str) -> None:
        """A prompt must leave room for at least one generated token."""
        if n_prompt + 1 > self.n_ctx:
            raise ContextLengthExceeded(n_prompt, self.n_ctx, param=param)

    # -- work ------------------------------------------------------------------------------

    def submit(self, gen: Generation) -> None:
        self.scheduler.submit(gen)  # QueueFull: never counted
        self._users += 1
        gen.on_end(self._release)

    async def embed(self, tokens: list[int]) -> list[float]:
        if "embeddings" not in self.spec.capabilities:
            raise UnsupportedCapability(
                f"The model '{self.spec.id}' does not make embeddings.", param="model"
            )
        if not tokens:
            raise InvalidRequest("The input is empty.", param="input")
        if len(tokens) > self.n_ctx:
            raise ContextLengthExceeded(len(tokens) - 1, self.n_ctx, param="input")
        with self.lease():
            future = self.scheduler.run_job(lambda: self._embed_now(tokens))
            result: list[float] = await asyncio.wrap_future(future)
        return result

    def _embed_now(self, tokens: list[int]) -> list[float]:
        """Runs on the scheduler thread: a second context over the same weights. The mean of
        the token embeddings (what llama.cpp's mean pooling computes), normalised."""
        if self._embed_ctx is None:
            self._embed_ctx = LlamaContext(
                self.llama,
                ContextConfig(
                    n_ctx=self.n_ctx,
                    n_seq_max=1,
                    n_batch=EMBED_BATCH,
                    n_threads=self._config.threads,
                    embeddings=True,
                ),
            )
        ctx = self._embed_ctx
        ctx.clear()
        total = np.zeros(self.llama.n_embd, dtype=np.float64)
        batch = Batch(EMBED_BATCH)
        try:
            for start in range(0, len(tokens), EMBED_BATCH):
                batch.clear()
                chunk = tokens[start : start + EMBED_BATCH]
                for k, token in enumerate(chunk):
                    batch.add(token, start + k, 0, logits=True)
                if ctx.decode(batch) != 0:
                    raise EngineFailure("The model failed to embed this input.")
                total += ctx.token_embeddings_sum(len(chunk))
        finally:
            batch.close()
            ctx.clear()
        norm = float(np.linalg.norm(total)) or 1.0
        return [float(v) for v in total / norm]

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def close(self) -> None:
        self.scheduler.stop()
        for ctx in (self._embed_ctx, self._ctx):
            if ctx is not None:
                ctx.close()
        self.llama.close()
