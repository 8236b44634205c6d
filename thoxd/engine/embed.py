"""Embeddings on a model's engine thread, one chunk at a time between generation steps.

A second llama.cpp context over the same weights (made on first use) decodes a chunk of the
current input per call (`EMBED_BATCH` tokens, `EMBED_SHARED` while generations run); their
per-token embeddings are summed as they come, and the mean, normalised, is the input's vector
(what llama.cpp's mean pooling computes). Chunking keeps memory flat whatever the input's length
(llama.cpp computes logits for every token of a ubatch), lets running streams go on between
chunks, and lets a request that was cancelled stop after the chunk in hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from thoxd.engine.llama import Batch, ContextConfig, LlamaContext, LlamaModel
from thoxd.engine.request import Embedding
from thoxd.errors import EngineFailure

logger = logging.getLogger("thoxd.engine")

# Tokens per embedding decode: memory follows this, not the input's length.
EMBED_BATCH = 64
# Tokens per decode while generations run beside it: a chunk holds their next token back for as
# long as it takes (~4 ms a token for Gemma 3 on 2 cores, most of it the output layer llama.cpp
# computes for every token), so a smaller one keeps streams smooth.
EMBED_SHARED = 16


class Embedder:
    def __init__(self, model: LlamaModel, *, n_ctx: int, threads: int) -> None:
        self._model = model
        self._n_ctx = n_ctx
        self._threads = threads
        self._ctx: LlamaContext | None = None
        self._batch: Batch | None = None

    def step(self, job: Embedding, *, shared: bool = False) -> bool:
        """Embed the next chunk of `job`'s current input (a small one when generations are
        `shared` the thread); True once every input has its vector. A failed decode raises
        EngineFailure and leaves the context empty for the next job."""
        ctx, batch = self._context()
        tokens = job.inputs[len(job.vectors)]
        if job.position == 0:  # a new input: its positions start at 0 in an empty cache
            ctx.clear()
            job.total = np.zeros(self._model.n_embd, dtype=np.float64)
        size = min(EMBED_SHARED, EMBED_BATCH) if shared else EMBED_BATCH
        chunk = tokens[job.position : job.position + size]
        batch.clear()
        for k, token in enumerate(chunk):
            batch.add(token, job.position + k, 0, logits=True)
        if ctx.decode(batch) != 0:
            ctx.clear()
            raise EngineFailure("The model failed to embed this input.")
        job.total += ctx.token_embeddings_sum(len(chunk))
        job.position += len(chunk)
        if job.position == len(tokens):
            norm = float(np.linalg.norm(job.total)) or 1.0
            job.vectors.append([float(v) for v in job.total / norm])
            job.position, job.total = 0, None
        return len(job.vectors) == len(job.inputs)

    def chunk(self, job: Embedding, *, shared: bool, fault: Callable[[int], None]) -> bool:
        """`step`, with a failure contained: it ends `job` only (this context is separate from
        the generations'), the next job starting from an empty cache. True once `job` has ended
        (its vectors, or its error, handed back). `fault` is the engine's fault seam, given
        the current input's length."""
        try:
            fault(len(job.inputs[len(job.vectors)]))
            done = self.step(job, shared=shared)
        except Exception as exc:
            logger.error("an embedding failed: %r", exc)
            self.reset()
            job.fail(EngineFailure("The model failed to embed this input."))
            return True
        if done:
            job.finish()
        return done

    def reset(self) -> None:
        """After a failure: the next chunk starts from an empty cache."""
        if self._ctx is not None:
            self._ctx.clear()

    def _context(self) -> tuple[LlamaContext, Batch]:
        if self._ctx is None or self._batch is None:
            self._ctx = LlamaContext(
                self._model,
                ContextConfig(
                    n_ctx=self._n_ctx,
                    n_seq_max=1,
                    n_batch=EMBED_BATCH,
                    n_threads=self._threads,
                    embeddings=True,
                ),
            )
            self._batch = Batch(EMBED_BATCH)
        return self._ctx, self._batch

    def close(self) -> None:
        if self._batch is not None:
            self._batch.close()
        if self._ctx is not None:
            self._ctx.close()
