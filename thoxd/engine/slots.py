"""Sequence slots: the generation each one runs, the tokens it holds in the KV cache, what a
step's output rows give it, which idle slot serves a new prompt best, and parking idle slots'
cells in host memory.

A parked slot's cells are copied out (`llama_state_seq_get_data`) and removed from the unified
cache, so each step attends only over the running sequences; admitting a request into it copies
them back. The scheduler decides when; this module keeps the bookkeeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from thoxd.engine.drafts import Acceptance, Lookup
from thoxd.engine.llama import LlamaContext, LlamaModel
from thoxd.engine.request import Delta, Finished, Generation, Timings
from thoxd.engine.sampling import GrammarExhausted, Sampler, TokenLogprob
from thoxd.engine.text import TextAssembler


@dataclass(eq=False)
class Running:
    gen: Generation
    sampler: Sampler
    text: TextAssembler
    # Prompt tokens still to prefill. Alone on the engine, a prompt's last token is not part of
    # its prefill: it is decoded like a generated token, so its logits come from the same
    # kernels whether or not the rest of the prompt was found in the cache (greedy output does
    # not depend on cache hits). Beside other sequences the batch differs from run to run
    # anyway, so the last token rides in the final prefill chunk (`fused`), saving a step.
    pending: list[int]
    last_token: int
    cache_n: int
    fused: bool
    admitted_at: float
    # Prompt lookup over the prompt and output so far, and how often its guesses came true.
    lookup: Lookup
    acceptance: Acceptance
    first_token_at: float = 0.0
    generated: int = 0
    draft_n: int = 0  # drafted tokens checked
    draft_accepted: int = 0  # of which the request's own sampling picked


@dataclass(eq=False)
class Slot:
    seq_id: int
    # Tokens whose keys and values sit in the cache for this sequence, at positions 0..len-1.
    cached: list[int] = field(default_factory=list)
    run: Running | None = None
    last_used: float = 0.0
    # `cached` copied out of the cache while this slot is idle and others run (see park_idle).
    parked: bytes | None = None


def advance(
    slot: Slot,
    ctx: LlamaContext,
    model: LlamaModel,
    rows: list[int],
    drafts: list[int],
    n_ctx_seq: int,
) -> str | None:
    """After a decode: sample a running slot's output rows in order, each with the request's
    own sampler, while the drafts (the tokens its rows after the first decoded) equal what was
    sampled; take the rejected drafts back out of the cache; hand the text to the request.
    Returns the finish reason if the request is done, else the slot's next token is set."""
    run = slot.run
    assert run is not None
    start = len(slot.cached) - len(rows)  # the position of the first row's token
    texts: list[str] = []
    logprobs: list[TokenLogprob] = []
    reason: str | None = None
    for i, index in enumerate(rows):
        try:
            token = run.sampler.sample(ctx, index)
        except GrammarExhausted:  # nothing may follow: the output ends here
            reason, token = "stop", -1
            break
        run.acceptance.score(token)
        reason = _take(run, model, token, start + i + 1 >= n_ctx_seq, texts)
        if run.sampler.last is not None and not _ends(run, model, token):
            logprobs.append(run.sampler.last)
        if reason is not None or i + 1 == len(rows) or token != drafts[i]:
            break
    used = i + 1
    run.draft_n += len(rows) - 1
    run.draft_accepted += used - 1
    if used < len(rows):
        del slot.cached[start + used :]
        ctx.seq_rm(slot.seq_id, start + used)
    if texts or logprobs:
        run.gen.push(Delta("".join(texts), tuple(logprobs)))
    if reason is None:
        run.last_token = token
    return reason


def release(slot: Slot, reason: str) -> Finished:
    """Free a slot whose request has ended: the text held back for stop strings goes out (unless
    cancelled), and its timings are taken. The caller pushes the Finished."""
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
    return Finished(reason, len(run.gen.prompt), run.generated, timings)


def _ends(run: Running, model: LlamaModel, token: int) -> bool:
    """An end of text or a stop token: it ends the output and is not part of it."""
    return model.is_eog(token) or token in run.gen.stop_tokens


def _take(
    run: Running, model: LlamaModel, token: int, context_full: bool, texts: list[str]
) -> str | None:
    """Give a request its next token; the finish reason if that ends it."""
    if not run.first_token_at:
        run.first_token_at = time.monotonic()
    if _ends(run, model, token):
        return "stop"
    run.generated += 1
    text = run.text.feed(model.piece(token))
    if text:
        texts.append(text)
    if run.text.stopped:
        return "stop"
    if run.generated >= run.gen.max_tokens or context_full:
        return "length"
    run.lookup.append(token)
    return None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pick_slot(slots: list[Slot], prompt: list[int]) -> tuple[Slot, int]:
    """The idle slot whose cache serves `prompt` best, and the prefix they share.

    A cache is worth using when it covers half the prompt or more, or when the prompt
    extends all of it (nothing is lost). Otherwise a short shared start (BOS, a template's
    header) must not cost another prompt its cache: take an empty slot, else the least
    recently used one."""
    idle = [s for s in slots if s.run is None]
    scored = [(common_prefix(s.cached, prompt), s) for s in idle]
    useful = [
        (n, -s.last_used, s.seq_id, s)
        for n, s in scored
        if n > 0 and (2 * n >= len(prompt) or n == len(s.cached))
    ]
    if useful:
        n, _, _, slot = max(useful)
        return slot, n
    *_, slot = min((bool(s.cached), s.last_used, s.seq_id, s) for s in idle)
    return slot, common_prefix(slot.cached, prompt)


def claim(slot: Slot, ctx: LlamaContext, prompt: list[int], shared: int) -> int:
    """Make an idle slot's cache hold the first tokens of `prompt` it shares (copying a parked
    prefix back in); how many it kept. The prompt's last token is always computed anew (see
    Running.pending)."""
    keep = min(shared, len(prompt) - 1)
    if slot.parked is not None:
        if keep == 0 or not ctx.seq_restore(slot.seq_id, slot.parked):
            ctx.seq_rm(slot.seq_id, -1)
            keep = 0
        slot.parked = None
    if keep < len(slot.cached) and not ctx.seq_rm(slot.seq_id, keep):
        ctx.seq_rm(slot.seq_id, -1)
        keep = 0
    del slot.cached[keep:]
    return keep


def park_idle(slots: list[Slot], ctx: LlamaContext, cap: int) -> None:
    """Move idle slots' cells out of the cache into host memory (before a step, so only while a
    sequence runs); keep the parked total under `cap` tokens by dropping the least recently
    used."""
    newly = [s for s in slots if s.run is None and s.cached and s.parked is None]
    if not newly:  # the common case in a step loop: nothing changed
        return
    for slot in newly:
        slot.parked = ctx.seq_save(slot.seq_id)
        ctx.seq_rm(slot.seq_id, -1)
    parked = sorted((s for s in slots if s.parked is not None), key=lambda s: s.last_used)
    total = sum(len(s.cached) for s in parked)
    for slot in parked:
        if total <= cap:
            break
        total -= len(slot.cached)
        slot.parked = None
        slot.cached.clear()
