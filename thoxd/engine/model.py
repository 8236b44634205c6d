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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thoxd.catalog.entries import GpuLayers, ModelSpec
from thoxd.engine.devices import Device, gpu_devices
from thoxd.engine.embed import Embedder
from thoxd.engine.faults import Faults
from thoxd.engine.grammar import Grammar, GrammarInvalid
from thoxd.engine.llama import ContextConfig, LlamaContext, LlamaLoadError, LlamaModel
from thoxd.engine.memory import MemoryEstimate
from thoxd.engine.request import Embedding, Finished, Generation
from thoxd.engine.sampling import GrammarSpec
from thoxd.engine.scheduler import Scheduler, SchedulerStats
from thoxd.engine.templates import ChatTemplate, TemplateInvalid
from thoxd.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    UnsupportedCapability,
)

logger = logging.getLogger("thoxd.engine")

# Prompts longer than this are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 4096


COLD_BATCH = 2048
UBATCH = 512
ALL_LAYERS = 999  # n_gpu_layers past any model's count: every layer offloaded


def rpc_layers(spec: ModelSpec) -> int:
    """The layers a model split over RPC servers puts on them: its n_gpu_layers, or all."""
    wanted = spec.n_gpu_layers
    return wanted if isinstance(wanted, int) and wanted != 0 else ALL_LAYERS


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
    faults: Faults = field(default_factory=Faults)  # tests' failure injection (engine/faults.py)
    stop_timeout: float = 10.0  # seconds an engine thread may take to stop before it is left
    client_cap: int = 0  # most slots one client holds while others are served; 0: no cap
    rpc_build: Path | None = None  # scripts/build-rpc's output, for models split over boxes
    rpc_in_process: bool = True  # False: such models are served by a process of their own
    n_gpu_layers: GpuLayers = "auto"  # a model's own in models.toml wins
    gpu_memory_budget: str = "90%"  # of the GPUs' total memory, or bytes
    gpu_devices: Callable[[], Sequence[Device]] = gpu_devices  # tests' GPUs

    # Most prompt tokens in one step while the prompt is the only sequence running; 0: 2048
    # (llama-server's n_batch) for a model offloaded to a GPU, where big batches pay, and
    # `batch_size` on a CPU, where they prefill no faster (bench/RESULTS.md, cold_prefill.py)
    # and only make a request arriving meanwhile wait for the whole step.
    cold_batch: int = 0

    def batches(self, offloaded: bool) -> tuple[int, int]:
        """The context's n_batch (the cold step) and n_ubatch (what one graph computes, at
        most llama-server's default of 512 beyond batch_size) for a model."""
        if self.cold_batch:
            n_batch = max(self.batch_size, self.cold_batch)
        else:
            n_batch = max(self.batch_size, COLD_BATCH) if offloaded else self.batch_size
        return n_batch, min(n_batch, max(self.batch_size, UBATCH))

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
        on_finished: Callable[[str, Generation, Finished], None] | None = None,
        memory: MemoryEstimate | None = None,
        devices: Sequence[int] = (),
    ) -> None:
        self.spec = spec
        self.n_ctx = spec.n_ctx
        self.loaded_at = time.time()
        self.memory = memory or MemoryEstimate(path.stat().st_size, 0, 0)
        self.keep_alive = math.inf  # seconds idle before unloading: the Engine sets it
        self.last_used = time.monotonic()
        self._users = 0
        self._config = config
        layers = rpc_layers(spec) if devices else self.memory.gpu_layers
        self.llama = LlamaModel(path, n_gpu_layers=layers, devices=devices)
        n_batch, n_ubatch = config.batches(offloaded=self.memory.gpu > 0)
        try:
            self._ctx = LlamaContext(
                self.llama,
                ContextConfig(
                    # Unified KV sized so every slot can hold a full context at once: a request
                    # is never cut short because others are using the cache.
                    n_ctx=spec.n_ctx * config.slots,
                    n_seq_max=config.slots,
                    n_batch=n_batch,
                    n_ubatch=n_ubatch,
                    n_threads=config.threads,
                    max_outputs=config.max_outputs,
                    max_outputs_per_seq=config.draft_max + 1,
                ),
            )
        except LlamaLoadError:
            self.llama.close()
            raise
        self._embedder = Embedder(self.llama, n_ctx=spec.n_ctx, threads=config.threads)
        self.scheduler = Scheduler(
            self.llama,
            self._ctx,
            n_slots=config.slots,
            n_ctx_seq=spec.n_ctx,
            queue_size=config.queue_size,
            draft_max=config.draft_max,
            max_outputs=config.max_outputs,
            name=spec.id,
            on_finished=(lambda g, f: on_finished(spec.id, g, f)) if on_finished else None,
            embedder=self._embedder,
            faults=config.faults,
            client_cap=config.client_cap,
            shared_batch=config.batch_size,
        )
        self.template = self._chat_template()
        self.scheduler.start()

    def _chat_template(self) -> ChatTemplate | None:
        source = self.spec.chat_template or self.llama.meta("tokenizer.chat_template")
        if not source:
            return None
        try:
            # The template writes BOS itself (the prompt is tokenized without adding one) when
            # the model wants one; templates that end turns with EOS need its text too.
            bos = self.llama.token_text(self.llama.bos) if self.llama.add_bos else ""
            return ChatTemplate(
                source, bos_token=bos, eos_token=self.llama.token_text(self.llama.eos)
            )
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

    def chat_template(self) -> ChatTemplate:
        if "chat" not in self.spec.capabilities or self.template is None:
            raise UnsupportedCapability(
                f"The model '{self.spec.id}' does not do chat completions.", param="model"
            )
        return self.template

    def render_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> str:
        return self.chat_template().render(messages, tools=tools)

    def check_grammar(self, grammar: GrammarSpec) -> None:
        """Refuse a grammar llama.cpp cannot parse, before it reaches the engine thread (a
        blocking call: parsing a large grammar takes milliseconds)."""
        try:
            Grammar(self.llama, grammar.gbnf, grammar.lazy_patterns).close()
        except GrammarInvalid:
            raise InvalidRequest("The output's grammar could not be parsed.") from None

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

    def submit(self, *gens: Generation) -> None:
        """Queue one request's generations, all or none (QueueFull: none is counted)."""
        self.scheduler.submit(gens)
        for gen in gens:
            self._users += 1
            gen.on_end(self._release)

    def embed(self, inputs: list[list[int]]) -> Embedding:
        """Queue an embeddings request (each input's token ids); await its `result()`."""
        if "embeddings" not in self.spec.capabilities:
            raise UnsupportedCapability(
                f"The model '{self.spec.id}' does not make embeddings.", param="model"
            )
        for tokens in inputs:
            if not tokens:
                raise InvalidRequest("The input is empty.", param="input")
            if len(tokens) > self.n_ctx:
                raise ContextLengthExceeded(len(tokens) - 1, self.n_ctx, param="input")
            self.check_token_ids(tokens, "input")
        job = Embedding(inputs)
        self.scheduler.submit_embedding(job)
        self._users += 1
        job.on_end(self._release)
        return job

    def check_token_ids(self, tokens: Sequence[int], param: str) -> None:
        """Token ids a client sent must name tokens of this model's vocabulary."""
        if any(t < 0 or t >= self.llama.n_vocab for t in tokens):
            raise InvalidRequest(
                f"Token ids must be between 0 and {self.llama.n_vocab - 1} for this model.",
                param=param,
            )

    @property
    def failed(self) -> str | None:
        """Why this model stopped serving (its engine thread gave up), or None."""
        return self.scheduler.failed

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def close(self) -> bool:
        """Free everything; False (and nothing freed) if the engine thread did not stop: it may
        still be inside llama.cpp, using the context and the weights."""
        if not self.scheduler.stop(self._config.stop_timeout):
            return False
        self._embedder.close()
        self._ctx.close()
        self.llama.close()
        return True
