"""The step loop: one thread owns a model's llama context and decodes for N sequence slots.

Each step builds one batch: one token for every sequence that is generating, then a chunk of one
prompt still being prefilled, the one with the least left (plus any with a few tokens left), up
to `batch_size` tokens (with GPU offload, up to 2048 for a prompt running alone); a single
`llama_decode` runs it, and each sequence whose logits came out samples its next token. Waiting
requests are admitted in FIFO order as slots free up, each into the idle slot whose cached tokens
share the longest prefix with its prompt, so only the rest of the prompt is prefilled.

Idle slots are parked: before a step, an idle slot's cells are copied to host memory and removed
from the (unified) cache, so each step attends only over the running sequences' cells; admitting
a request into a parked slot copies them back (~1 ms per 1000 tokens). What is parked is bounded
by one context's worth of tokens; past it, the least recently used go.

A sequence's next token may come with drafts from prompt lookup (thoxd.engine.drafts), checked
as extra output rows of the same step, as many as the step costs measured at start say pay off.
Embeddings run between steps, a chunk per round (thoxd.engine.embed).

A request is one entry of the bounded queue however many prompts it has. A step that fails
(llama_decode's error, or any exception) fails the requests it held with `engine_error`, and the
context is made again; after `MAX_FAILURES` failures in a row, or if the context cannot be made,
the model is marked failed with the reason and the thread ends (the Engine reloads it on demand).

Nothing here blocks the event loop: requests arrive through a locked deque, events leave through
`Generation.push`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from thoxd.engine.drafts import (
    Acceptance,
    Lookup,
    StepCosts,
    measure_step_costs,
    row_counts,
)
from thoxd.engine.embed import Embedder
from thoxd.engine.faults import Faults
from thoxd.engine.forks import leader_of, sync_forks
from thoxd.engine.grammar import GrammarInvalid
from thoxd.engine.llama import Batch, LlamaContext, LlamaModel
from thoxd.engine.placement import claim, lay_out, park_idle, pick_slot, save_head
from thoxd.engine.queue import WaitQueue
from thoxd.engine.request import Embedding, Failed, Finished, Generation, Outbox
from thoxd.engine.sampling import Sampler
from thoxd.engine.slots import Running, Slot, add_prefills, advance, draft_plan, release
from thoxd.engine.text import TextAssembler
from thoxd.errors import EngineFailure, InvalidRequest, ShuttingDown, ThoxdError

logger = logging.getLogger("thoxd.engine")

# Prompt tokens left below which a prompt shares a step with another prompt's prefill: about
# where its prefill costs as much as the step it would otherwise wait for (~1 ms a token here).
# Failed steps in a row after which the model is given up on (each one re-creates the context).
MAX_FAILURES = 3


@dataclass(frozen=True)
class SchedulerStats:
    slots: int
    running: int
    waiting: int
    parked: int = 0  # idle slots whose cached prefix waits in host memory


class Scheduler:
    def __init__(
        self,
        model: LlamaModel,
        ctx: LlamaContext,
        *,
        n_slots: int,
        n_ctx_seq: int,
        queue_size: int,
        name: str,
        draft_max: int = 0,
        max_outputs: int = 0,
        on_finished: Callable[[Generation, Finished], None] | None = None,
        embedder: Embedder | None = None,
        faults: Faults | None = None,
        client_cap: int = 0,
        shared_batch: int = 0,
    ) -> None:
        self._name = name
        self._model = model
        # Called on this thread with each finished generation (metrics); must be quick.
        self._on_finished = on_finished
        self._ctx = ctx
        self._n_ctx_seq = n_ctx_seq
        self._slots = [Slot(seq_id=i) for i in range(n_slots)]
        self._park_cap = n_ctx_seq  # tokens parked in host memory, over all idle slots
        self._batch = Batch(ctx.n_batch)
        # Most tokens of a step that streams share: a prompt prefills in chunks of this while
        # others decode, and in the whole batch when nothing else runs (0: the whole batch).
        self._shared_batch = shared_batch or ctx.n_batch
        self._draft_max = draft_max if model.rewindable else 0
        self._max_outputs = min(max_outputs or n_slots, ctx.n_batch)
        # Measured when the thread starts if drafts are on, then learned from the steps.
        self._costs = StepCosts({}, learn=False)
        self._queue = WaitQueue(queue_size, client_cap)
        self._embedder = embedder
        self._faults = faults or Faults()
        self._failures = 0  # failed steps in a row
        self._turn = 0  # which decoding sequence goes first when they outnumber the batch
        self._forks: dict[Generation, Slot] = {}  # choices waiting for their leader's prefill
        self._outbox = Outbox()  # the admitted generations' events, sent once a step
        self.failed: str | None = None  # why the model was given up on
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"thoxd-engine-{name}", daemon=True)

    # -- the event loop's side ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, gens: Sequence[Generation]) -> None:
        """Queue one request's generations (a completion may have several prompts) as one entry;
        raises QueueFull past the bound, never blocks. All of them are queued, or none."""
        with self._cond:
            self._check_open()
            self._queue.add(gens, sum(1 for s in self._slots if s.run is None))
            for gen in gens:
                gen._wake = self._wake
            self._cond.notify()

    def submit_embedding(self, job: Embedding) -> None:
        """Queue an embeddings request; raises QueueFull past the bound."""
        with self._cond:
            self._check_open()
            self._queue.add_embedding(job)
            job._wake = self._wake
            self._cond.notify()

    def _check_open(self) -> None:
        if self.failed is not None:
            raise EngineFailure(f"The model '{self._name}' failed: {self.failed}.")
        if self._stopping:
            raise ShuttingDown("The server is shutting down.")

    def stats(self) -> SchedulerStats:
        running = sum(1 for s in self._slots if s.run is not None)
        parked = sum(1 for s in self._slots if s.parked is not None)
        return SchedulerStats(len(self._slots), running, self._queue.waiting(), parked)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the thread; False if it is still inside llama.cpp after `timeout` (a decode that
        does not return): then nothing it uses may be freed."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error(
                "model %s: the engine thread did not stop within %g s", self._name, timeout
            )
            return False
        self._batch.close()
        return True

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._draft_max:
                sizes = row_counts(len(self._slots), self._max_outputs)
                token = max(self._model.bos, 0)
                self._costs = measure_step_costs(self._ctx, self._batch, sizes, 0, token)
            while self._next_round():
                pass
        except Exception:  # outside a step (a bug): fail loudly, and tell every client
            logger.exception("model %s: the engine thread failed", self._name)
            self.failed = "an internal error"
        finally:
            error: ThoxdError = ShuttingDown("The server is shutting down.")
            if self.failed is not None:
                error = EngineFailure(f"The model '{self._name}' failed: {self.failed}.")
            self._abandon_all(error)

    def _next_round(self) -> bool:
        try:
            return self._round()
        finally:
            self._outbox.flush()

    def _round(self) -> bool:
        with self._cond:
            while not (self._stopping or self._queue or self._busy()):
                self._cond.wait()
            if self._stopping:
                return False
            idle = 0 if self._first_token_due() else sum(1 for s in self._slots if s.run is None)
            running = Counter(s.run.gen.client for s in self._slots if s.run is not None)
            admitted = self._queue.take(idle, running)
            embedding = self._queue.embedding()
        alone = len(admitted) == 1 and not self._busy()
        try:
            while admitted:
                self._admit(admitted[0], alone)
                admitted.pop(0)
            if embedding is not None:
                self._embed_chunk(embedding)
            self._reap_cancelled()
            if self._busy():
                self._step()
                self._failures = 0
        except Exception as exc:
            return self._recover(exc, admitted)
        return True

    def _busy(self) -> bool:
        return any(s.run is not None for s in self._slots)

    def _first_token_due(self) -> bool:
        """A prompt prefilled alone has only its last token left: its own small step comes
        first. Admitted now, newcomers' prefill would share that step and hold the first token
        back for their whole prefill (~220 ms for three 60-token prompts, measured); waiting
        costs them that one small step (~12 ms)."""
        return any(
            s.run is not None and not s.run.fused and not s.run.pending and not s.run.first_token_at
            for s in self._slots
        )

    def _embed_chunk(self, job: Embedding) -> None:
        assert self._embedder is not None
        fault = self._faults.embed
        if self._embedder.chunk(job, shared=self._busy(), fault=lambda n: fault(self._name, n)):
            with self._cond:
                self._queue.embedding_done(job)

    def _admit(self, gen: Generation, alone: bool) -> None:
        now = time.monotonic()
        gen.outbox = self._outbox
        try:
            sampler = Sampler(
                gen.params, model=self._model, grammar=gen.grammar, logprobs=gen.logprobs
            )
        except GrammarInvalid:  # checked before submit; this one request ends, nothing else
            gen.push(Failed(InvalidRequest("The output grammar could not be parsed.")))
            return
        slot, shared = pick_slot(self._slots, gen.prompt)
        lay_out(self._slots, slot, self._ctx, gen.prompt, shared, self._park_cap, alone=alone)
        leader = leader_of(self._slots, gen, shared)
        keep = claim(slot, self._ctx, gen.prompt, 0 if leader else shared)
        if not alone and leader is None:
            keep = save_head(slot, self._ctx, keep)
        if leader is not None:  # it prefills nothing until the leader's cells are copied
            self._forks[gen] = leader
            alone = False
        slot.run = Running(
            gen=gen,
            sampler=sampler,
            text=TextAssembler(gen.stops),
            pending=[] if leader else gen.prompt[keep:-1] if alone else gen.prompt[keep:],
            last_token=gen.prompt[-1],
            cache_n=keep,
            fused=not alone,
            admitted_at=now,
            lookup=Lookup(gen.prompt if self._draft_max else ()),
            # A fresh record: what a lone request drafts (and so which kernels its logits come
            # from) never depends on the requests before it.
            acceptance=Acceptance(self._draft_max + 1),
            follows=leader.run.gen if leader is not None and leader.run is not None else None,
        )

    def _reap_cancelled(self) -> None:
        for slot in self._slots:
            if slot.run is not None and slot.run.gen.cancelled:
                self._finish(slot, "cancelled")

    def _step(self) -> None:
        self._faults.step(self._name)
        sync_forks(self._slots, self._forks, self._ctx)
        park_idle(self._slots, self._ctx, self._park_cap)
        batch = self._batch
        batch.clear()
        # Each output: its slot, its rows in the batch, and the drafts its rows after the first
        # decode (guesses at the tokens the rows before them sample).
        outputs: list[tuple[Slot, list[int], list[int]]] = []
        running = [s for s in self._slots if s.run is not None]
        decoding = [
            s for s in running if s.run and not s.run.pending and s.run.gen not in self._forks
        ]
        prefill = len(decoding) < len(running)
        if len(decoding) > batch.capacity:  # more slots than the batch holds: take turns
            first = self._turn % len(decoding)
            decoding = (decoding[first:] + decoding[:first])[: batch.capacity]
            self._turn += batch.capacity
        guessed = draft_plan(
            decoding, self._draft_max, self._n_ctx_seq, None if prefill else self._costs
        )
        for i, (slot, (guesses, n)) in enumerate(zip(decoding, guessed, strict=True)):
            run = slot.run
            assert run is not None
            start = len(slot.cached)
            n = min(n, batch.room - (len(decoding) - i))  # every sequence keeps its own row
            tokens = [run.last_token, *guesses[:n]]
            rows = [batch.add(t, start + k, slot.seq_id, logits=True) for k, t in enumerate(tokens)]
            outputs.append((slot, rows, guesses[:n]))
            slot.cached.extend(tokens)
        # The whole batch (the cold step, see EngineConfig.cold_batch) only for a prompt
        # running alone; beside others, chunks of batch_size.
        limit = batch.capacity if len(running) == 1 else min(batch.capacity, self._shared_batch)
        outputs += add_prefills(running, batch, limit)
        rc = self._faults.decode(self._name, batch.n_tokens)
        if rc is None:
            self._outbox.flush()  # the last step's tokens, as this thread lets go of the GIL
            started = time.perf_counter()
            rc = self._ctx.decode(batch)
            if not prefill and rc == 0:  # what the plan weighs: a step of output rows only
                self._costs.observe(batch.n_tokens, (time.perf_counter() - started) * 1000.0)
        if rc != 0:
            raise EngineFailure(f"llama_decode returned {rc}")
        for slot, rows, drafts in outputs:
            reason = advance(slot, self._ctx, self._model, rows, drafts, self._n_ctx_seq)
            if reason is not None:
                self._finish(slot, reason)

    def _finish(self, slot: Slot, reason: str) -> None:
        run = slot.run
        assert run is not None
        finished = release(slot, reason)
        if self._on_finished is not None:
            try:
                self._on_finished(run.gen, finished)
            except Exception:  # an observer's bug must not stop the engine
                logger.exception("on_finished observer failed")
        # Last: whoever reads Finished sees the slot already free.
        run.gen.push(finished)

    def _recover(self, exc: Exception, unadmitted: list[Generation]) -> bool:
        """After a failed round: the context is made again and the round's requests get
        engine_error. False (the thread ends) once the model is given up on."""
        self._failures += 1
        logger.error(
            "model %s: a step failed (%d in a row): %s",
            self._name,
            self._failures,
            exc.message if isinstance(exc, ThoxdError) else repr(exc),
            exc_info=None if isinstance(exc, ThoxdError) else exc,
        )
        failed = list(unadmitted)
        for slot in self._slots:
            if slot.run is not None:
                slot.run.sampler.close()
                failed.append(slot.run.gen)
                slot.run = None
            slot.cached.clear()
            slot.parked = slot.head = None
        if self._failures >= MAX_FAILURES:
            self.failed = f"{self._failures} steps in a row failed"
        else:
            try:
                self._ctx.recreate()
                logger.info("model %s: context re-created; serving again", self._name)
            except Exception:
                logger.exception("model %s: the context could not be made again", self._name)
                self.failed = "llama.cpp could not re-create its context"
        # Last: whoever reads the error sees the model as it now is.
        error = EngineFailure("The model failed while generating this request.")
        for gen in failed:
            gen.push(Failed(error))
        return self.failed is None

    def _abandon_all(self, error: ThoxdError) -> None:
        with self._cond:
            self._stopping = True
            waiting, embeds = self._queue.drain()
        for gen in waiting:
            gen.push(Failed(error))
        for job in embeds:
            job.fail(error)
        for slot in self._slots:
            if slot.run is not None:
                slot.run.gen.push(Failed(error))
                slot.run.sampler.close()
                slot.run = None
        self._outbox.flush()
