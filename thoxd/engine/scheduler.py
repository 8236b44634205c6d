"""The step loop: one thread owns a model's llama context and decodes for N sequence slots.

Each step builds one batch: one token for every sequence that is generating, then a chunk of one
prompt still being prefilled (plus any with a few tokens left), up to `n_batch` tokens; a single
`llama_decode` runs it, and each sequence whose logits came out samples its next token. Waiting
requests are admitted in FIFO order as slots free up, each into the idle slot whose cached tokens
share the longest prefix with its prompt, so only the rest of the prompt is prefilled.

Idle slots are parked: before a step, an idle slot's cells are copied to host memory and removed
from the (unified) cache, so each step attends only over the running sequences' cells; admitting
a request into a parked slot copies them back (~1 ms per 1000 tokens). What is parked is bounded
by one context's worth of tokens; past it, the least recently used go.

A sequence's next token may come with drafts from prompt lookup (thoxd.engine.drafts), checked
as extra output rows of the same step, as many as the step costs measured at start say pay off.

Nothing here blocks the event loop: requests arrive through a locked deque, events leave through
`Generation.push`. Other work that must own the context (embeddings) runs between steps as jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from thoxd.engine.drafts import (
    Acceptance,
    Lookup,
    StepCosts,
    measure_step_costs,
    propose,
    row_counts,
)
from thoxd.engine.llama import Batch, LlamaContext, LlamaModel
from thoxd.engine.request import Delta, Failed, Finished, Generation, Timings
from thoxd.engine.sampling import Sampler
from thoxd.engine.slots import Running, Slot, advance, park_idle, pick_slot
from thoxd.engine.text import TextAssembler
from thoxd.errors import EngineFailure, QueueFull, ShuttingDown

logger = logging.getLogger("thoxd.engine")

# Prompt tokens left below which a prompt shares a step with another prompt's prefill: about
# where its prefill costs as much as the step it would otherwise wait for (~1 ms a token here).
SHORT_PREFILL = 16


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
        on_finished: Callable[[Finished], None] | None = None,
    ) -> None:
        self._model = model
        # Called on this thread with each finished generation (metrics); must be quick.
        self._on_finished = on_finished
        self._ctx = ctx
        self._n_ctx_seq = n_ctx_seq
        self._queue_size = queue_size
        self._slots = [Slot(seq_id=i) for i in range(n_slots)]
        self._park_cap = n_ctx_seq  # tokens parked in host memory, over all idle slots
        self._batch = Batch(ctx.n_batch)
        self._draft_max = draft_max if model.rewindable else 0
        self._max_outputs = min(max_outputs or n_slots, ctx.n_batch)
        self._costs = StepCosts({})  # measured when the thread starts, if drafts are on
        self._waiting: deque[Generation] = deque()
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"thoxd-engine-{name}", daemon=True)

    # -- the event loop's side ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, gen: Generation) -> None:
        """Queue a generation; raises QueueFull past the bound, never blocks."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("The server is shutting down.")
            idle = sum(1 for s in self._slots if s.run is None)
            if len(self._waiting) >= self._queue_size + idle:
                raise QueueFull(len(self._waiting))
            gen._wake = self._wake
            self._waiting.append(gen)
            self._cond.notify()

    def run_job(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the engine thread between two steps."""
        future: Future[Any] = Future()
        with self._cond:
            if self._stopping:
                raise ShuttingDown("The server is shutting down.")
            self._jobs.append((fn, future))
            self._cond.notify()
        return future

    def stats(self) -> SchedulerStats:
        running = sum(1 for s in self._slots if s.run is not None)
        parked = sum(1 for s in self._slots if s.parked is not None)
        return SchedulerStats(len(self._slots), running, len(self._waiting), parked)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover - a decode that never returns
            logger.error("engine thread did not stop within %.0f s", timeout)
            return
        self._batch.close()

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
        except Exception:  # pragma: no cover - a bug; fail loudly but tell every client
            logger.exception("engine thread failed")
        finally:
            self._abandon_all()

    def _next_round(self) -> bool:
        with self._cond:
            while not (self._stopping or self._waiting or self._jobs or self._busy()):
                self._cond.wait()
            if self._stopping:
                return False
            admitted = self._take_admissible(admit=not self._first_token_due())
            job = self._jobs.popleft() if self._jobs else None
        alone = len(admitted) == 1 and not self._busy()
        for gen in admitted:
            self._admit(gen, alone)
        if job is not None:
            self._run_job(*job)
        self._reap_cancelled()
        if self._busy():
            self._step()
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

    def _take_admissible(self, admit: bool) -> list[Generation]:
        # A cancelled request leaves the queue at once, even while every slot is busy.
        for gen in [g for g in self._waiting if g.cancelled]:
            self._waiting.remove(gen)
            gen.push(Finished("cancelled", len(gen.prompt), 0, Timings()))
        idle = sum(1 for s in self._slots if s.run is None) if admit else 0
        taken: list[Generation] = []
        while self._waiting and len(taken) < idle:
            taken.append(self._waiting.popleft())
        return taken

    def _admit(self, gen: Generation, alone: bool) -> None:
        now = time.monotonic()
        slot, shared = pick_slot(self._slots, gen.prompt)
        # The prompt's last token is always computed anew (see _Running.pending).
        keep = min(shared, len(gen.prompt) - 1)
        if slot.parked is not None:
            if keep == 0 or not self._ctx.seq_restore(slot.seq_id, slot.parked):
                self._ctx.seq_rm(slot.seq_id, -1)
                keep = 0
            slot.parked = None
        if keep < len(slot.cached) and not self._ctx.seq_rm(slot.seq_id, keep):
            self._ctx.seq_rm(slot.seq_id, -1)
            keep = 0
        del slot.cached[keep:]
        slot.run = Running(
            gen=gen,
            sampler=Sampler(gen.params),
            text=TextAssembler(gen.stops),
            pending=gen.prompt[keep:-1] if alone else gen.prompt[keep:],
            last_token=gen.prompt[-1],
            cache_n=keep,
            fused=not alone,
            admitted_at=now,
            lookup=Lookup(gen.prompt if self._draft_max else ()),
            # A fresh record: what a lone request drafts (and so which kernels its logits come
            # from) never depends on the requests before it.
            acceptance=Acceptance(self._draft_max + 1),
        )

    def _run_job(self, fn: Callable[[], Any], future: Future[Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    def _reap_cancelled(self) -> None:
        for slot in self._slots:
            if slot.run is not None and slot.run.gen.cancelled:
                self._finish(slot, "cancelled")

    def _step(self) -> None:
        park_idle(self._slots, self._ctx, self._park_cap)
        batch = self._batch
        batch.clear()
        # Each output: its slot, its rows in the batch, and the drafts its rows after the first
        # decode (guesses at the tokens the rows before them sample).
        outputs: list[tuple[Slot, list[int], list[int]]] = []
        running = [s for s in self._slots if s.run is not None]
        decoding = [s for s in running if s.run is not None and not s.run.pending]
        prefill = len(decoding) < len(running)
        for slot, (guesses, n) in zip(decoding, self._guesses(decoding, prefill), strict=True):
            run = slot.run
            assert run is not None
            start = len(slot.cached)
            tokens = [run.last_token, *guesses[:n]]
            rows = [batch.add(t, start + k, slot.seq_id, logits=True) for k, t in enumerate(tokens)]
            outputs.append((slot, rows, guesses[:n]))
            slot.cached.extend(tokens)
        # Prefill in admission order, in chunks that fit what the batch has left, so a long
        # prompt shares steps with the streams already running instead of stalling them. One
        # prompt per step: on a CPU prefill costs the same per token however prompts are packed,
        # so packing several only holds all their first tokens back until the last is done.
        # A prompt with few tokens left (a prefix-cache hit) still joins: it saves a whole step.
        prefilling = False
        for slot in sorted(running, key=lambda s: s.run.admitted_at if s.run else 0.0):
            run = slot.run
            if run is None or not run.pending or batch.room == 0:
                continue
            if prefilling and len(run.pending) > SHORT_PREFILL:
                continue
            prefilling = True
            chunk, run.pending = run.pending[: batch.room], run.pending[batch.room :]
            if run.fused and not run.pending:  # the prompt ends here: its last token samples
                batch.add_sequence(chunk[:-1], len(slot.cached), slot.seq_id)
                index = batch.add(
                    chunk[-1], len(slot.cached) + len(chunk) - 1, slot.seq_id, logits=True
                )
                outputs.append((slot, [index], []))
            else:
                batch.add_sequence(chunk, len(slot.cached), slot.seq_id)
            slot.cached.extend(chunk)
        rc = self._ctx.decode(batch)
        if rc != 0:
            self._fail_batch(running, rc)
            return
        for slot, rows, drafts in outputs:
            reason = advance(slot, self._ctx, self._model, rows, drafts, self._n_ctx_seq)
            if reason is not None:
                self._finish(slot, reason)

    def _guesses(self, decoding: list[Slot], prefill: bool) -> list[tuple[list[int], int]]:
        """Each decoding sequence's guesses at its next tokens and how many to check as drafts
        (none in a step with prefill: its cost is the prefill's, not the measured one)."""
        if not self._draft_max:
            return [([], 0)] * len(decoding)
        sequences = []
        for slot in decoding:
            run = slot.run
            assert run is not None
            # The step's own token comes first; drafts must fit max_tokens and the context.
            room = min(self._draft_max, run.gen.max_tokens - run.generated - 1)
            room = min(room, self._n_ctx_seq - len(slot.cached) - 1)
            sequences.append((run.lookup, run.acceptance, room))
        return propose(None if prefill else self._costs, sequences)

    def _finish(self, slot: Slot, reason: str) -> None:
        run = slot.run
        assert run is not None
        now = time.monotonic()
        if reason != "cancelled" and not run.text.stopped:
            rest = run.text.flush()
            if rest:
                run.gen.push(Delta(rest))
        first = run.first_token_at or now
        timings = Timings(
            cache_n=run.cache_n,
            prompt_n=len(run.gen.prompt) - run.cache_n,
            prompt_ms=(first - run.admitted_at) * 1000.0,
            predicted_n=run.generated,
            predicted_ms=(now - first) * 1000.0,
            queue_ms=(run.admitted_at - run.gen.submitted_at) * 1000.0,
            draft_n=run.draft_n,
            draft_n_accepted=run.draft_accepted,
        )
        run.sampler.close()
        slot.run = None
        slot.last_used = now
        finished = Finished(reason, len(run.gen.prompt), run.generated, timings)
        if self._on_finished is not None:
            try:
                self._on_finished(finished)
            except Exception:  # an observer's bug must not stop the engine
                logger.exception("on_finished observer failed")
        # Last: whoever reads Finished sees the slot already free.
        run.gen.push(finished)

    def _fail_batch(self, running: list[Slot], rc: int) -> None:
        logger.error("llama_decode failed (rc=%d) for %d sequences", rc, len(running))
        error = EngineFailure("The model failed to decode this request.")
        for slot in running:
            run = slot.run
            assert run is not None
            run.sampler.close()
            slot.run = None
            self._ctx.seq_rm(slot.seq_id, -1)
            slot.cached.clear()
            run.gen.push(Failed(error))

    def _abandon_all(self) -> None:
        error = ShuttingDown("The server is shutting down.")
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            jobs, self._jobs = list(self._jobs), deque()
        for gen in waiting:
            gen.push(Failed(error))
        for _fn, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        for slot in self._slots:
            if slot.run is not None:
                slot.run.gen.push(Failed(error))
                slot.run.sampler.close()
                slot.run = None
