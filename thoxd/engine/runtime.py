"""The engine as the rest of thoxd sees it: catalog models, loaded on demand, each with its own
scheduler thread; tokenizing, chat templates, generation and embeddings for a loaded model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thoxd.catalog import Catalog, ModelSpec
from thoxd.engine.llama import (
    ContextConfig,
    LlamaContext,
    LlamaLoadError,
    LlamaModel,
    backend_init,
    route_llama_logs,
)
from thoxd.engine.request import Finished, Generation
from thoxd.engine.scheduler import Scheduler, SchedulerStats
from thoxd.engine.templates import ChatTemplate, TemplateInvalid
from thoxd.errors import (
    ContextLengthExceeded,
    EngineFailure,
    ModelNotReady,
    ThoxdError,
    UnsupportedCapability,
)
from thoxd.gguf import GGUFRejected, check_gguf
from thoxd.modelfiles import ModelFileError, ensure_model_file

logger = logging.getLogger("thoxd.engine")

# Prompts longer than this are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 4096


@dataclass(frozen=True)
class EngineConfig:
    models_dir: Path
    threads: int
    slots: int
    queue_size: int
    batch_size: int


class LoadedModel:
    """One catalog model in memory: weights, a generation context and its scheduler."""

    def __init__(
        self,
        spec: ModelSpec,
        path: Path,
        config: EngineConfig,
        on_finished: Callable[[str, Finished], None] | None = None,
    ) -> None:
        self.spec = spec
        self.n_ctx = spec.n_ctx
        self.loaded_at = time.time()
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
        self.scheduler.submit(gen)

    async def embed(self, tokens: list[int]) -> list[float]:
        if "embeddings" not in self.spec.capabilities:
            raise UnsupportedCapability(
                f"The model '{self.spec.id}' does not make embeddings.", param="model"
            )
        self.check_fits(len(tokens) - 1, "input")
        future = self.scheduler.run_job(lambda: self._embed_now(tokens))
        result: list[float] = await asyncio.wrap_future(future)
        return result

    def _embed_now(self, tokens: list[int]) -> list[float]:
        """Runs on the scheduler thread: a second context over the same weights."""
        from thoxd.engine.llama import Batch

        if self._embed_ctx is None:
            self._embed_ctx = LlamaContext(
                self.llama,
                ContextConfig(
                    n_ctx=self.n_ctx,
                    n_seq_max=1,
                    n_batch=self.n_ctx,
                    n_threads=self._config.threads,
                    embeddings=True,
                ),
            )
        ctx = self._embed_ctx
        ctx.clear()
        batch = Batch(max(len(tokens), 1))
        try:
            for pos, token in enumerate(tokens):
                batch.add(token, pos, 0, logits=True)
            if ctx.decode(batch) != 0:
                raise EngineFailure("The model failed to embed this input.")
            return ctx.sequence_embedding(0)
        finally:
            batch.close()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def close(self) -> None:
        self.scheduler.stop()
        for ctx in (self._embed_ctx, self._ctx):
            if ctx is not None:
                ctx.close()
        self.llama.close()


class Engine:
    """Owns every loaded model. Loads run in a worker thread; one load per model at a time."""

    def __init__(self, catalog: Catalog, config: EngineConfig) -> None:
        self.catalog = catalog
        self.config = config
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._errors: dict[str, str] = {}
        self._started = False
        # Called on a model's engine thread with (model id, Finished) for every finished
        # generation: the one place tokens and latencies are counted (thoxd.metrics). Quick only.
        self.on_finished: Callable[[str, Finished], None] | None = None

    def _start_backend(self) -> None:
        if not self._started:
            route_llama_logs()
            backend_init()
            self._started = True

    def state(self, model_id: str) -> str:
        if model_id in self._loaded:
            return "loaded"
        if model_id in self._loading:
            return "loading"
        return "error" if model_id in self._errors else "unloaded"

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def get(self, name: str) -> LoadedModel:
        """The loaded model behind `name`; 404 if the catalog has no such name, 503 while it is
        still loading or failed to load."""
        spec = self.catalog.get(name)
        model = self._loaded.get(spec.id)
        if model is not None:
            return model
        if spec.id in self._errors:
            raise ModelNotReady(f"The model '{name}' failed to load: {self._errors[spec.id]}")
        raise ModelNotReady(f"The model '{name}' is loading. Retry shortly.", param="model")

    async def load(self, name: str) -> LoadedModel:
        spec = self.catalog.get(name)
        if spec.id in self._loaded:
            return self._loaded[spec.id]
        task = self._loading.get(spec.id)
        if task is None:
            task = asyncio.create_task(self._load(spec))
            self._loading[spec.id] = task
        return await asyncio.shield(task)

    async def _load(self, spec: ModelSpec) -> LoadedModel:
        started = time.monotonic()
        try:
            self._start_backend()
            path = await asyncio.to_thread(ensure_model_file, spec, self.config.models_dir)
            # Our own bounded header check before llama.cpp's C++ parser sees the file.
            await asyncio.to_thread(check_gguf, path, root=self.config.models_dir)
            model = await asyncio.to_thread(LoadedModel, spec, path, self.config, self._finished)
        except (ModelFileError, GGUFRejected, LlamaLoadError) as exc:
            self._errors[spec.id] = str(exc)
            logger.error("model %s failed to load: %s", spec.id, exc)
            raise EngineFailure(f"The model '{spec.id}' failed to load.") from None
        except ThoxdError:
            raise
        finally:
            self._loading.pop(spec.id, None)
        self._errors.pop(spec.id, None)
        self._loaded[spec.id] = model
        logger.info(
            "model %s loaded in %.1f s (n_ctx %d, %d slots, %d threads)",
            spec.id,
            time.monotonic() - started,
            spec.n_ctx,
            self.config.slots,
            self.config.threads,
        )
        return model

    def _finished(self, model_id: str, finished: Finished) -> None:
        if self.on_finished is not None:
            self.on_finished(model_id, finished)

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        models, self._loaded = list(self._loaded.values()), {}
        for model in models:
            await asyncio.to_thread(model.close)
