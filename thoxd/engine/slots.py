"""Sequence slots: the generation each one runs, the tokens it holds in the KV cache, what a
step's output rows give it, and what a step prefills and drafts. Where an idle slot's cells
live, and what a new request keeps of them, is thoxd.engine.placement's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from thoxd.engine.drafts import Acceptance, Lookup, StepCosts, propose
from thoxd.engine.llama import Batch, LlamaContext, LlamaModel
from thoxd.engine.request import Delta, Finished, Generation, Timings
from thoxd.engine.sampling import GrammarExhausted, Sampler, TokenLogprob
from thoxd.engine.text import TextAssembler

# A prompt with this many tokens or fewer left to prefill joins a step beside another's chunk.
SHORT_PREFILL = 16


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
    # The request whose prefilled cells this one copies (thoxd.engine.forks), if any.
    follows: Generation | None = None
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
    # On a sliding-window model, also its first `head[0]` tokens, the prefix it shares with
    # another slot (a system prompt), saved apart: see park_idle and save_head. Kept while
    # `cached` starts with them.
    head: tuple[int, bytes] | None = None
    # Its cells, while not parked, lie in cells 0.. in position order with no other sequence's
    # in the cache: set by `lay_out` alone, cleared when a request is admitted beside others.
    alone: bool = False


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


def add_prefills(
    running: list[Slot], batch: Batch, limit: int
) -> list[tuple[Slot, list[int], list[int]]]:
    """Fill the step's batch, up to `limit` tokens, with prompt chunks; the output rows of
    prompts that end here (fused: their last token samples in this step).

    In chunks, so a long prompt shares steps with the streams already running instead of
    stalling them. One prompt per step, the one with the least left to prefill (then the
    oldest): on a CPU prefill costs the same per token however prompts are packed, so packing
    several only holds all their first tokens back until the last is done, and least-left-first
    gives the lowest mean time to first token: a chat message that arrives while a 4000-token
    prompt prefills is answered after its own few tokens, not after the other's prefill.
    Prompts with SHORT_PREFILL tokens or fewer left (a prefix-cache hit) join that step too:
    each saves a whole step."""
    outputs: list[tuple[Slot, list[int], list[int]]] = []
    long_taken = False
    for slot in sorted(running, key=_prefill_order):
        run = slot.run
        room = limit - batch.n_tokens
        if run is None or not run.pending or room <= 0:
            continue
        if len(run.pending) > SHORT_PREFILL:
            if long_taken:
                continue
            long_taken = True
        chunk, run.pending = run.pending[:room], run.pending[room:]
        if run.fused and not run.pending:  # the prompt ends here: its last token samples
            batch.add_sequence(chunk[:-1], len(slot.cached), slot.seq_id)
            index = batch.add(
                chunk[-1], len(slot.cached) + len(chunk) - 1, slot.seq_id, logits=True
            )
            outputs.append((slot, [index], []))
        else:
            batch.add_sequence(chunk, len(slot.cached), slot.seq_id)
        slot.cached.extend(chunk)
    return outputs


def _prefill_order(slot: Slot) -> tuple[int, float]:
    run = slot.run
    return (len(run.pending), run.admitted_at) if run is not None else (0, 0.0)


def draft_plan(
    decoding: list[Slot], draft_max: int, n_ctx_seq: int, costs: StepCosts | None
) -> list[tuple[list[int], int]]:
    """Each decoding slot's guesses at its next tokens and how many to check as drafts (none
    without measured `costs`: a step with prefill costs what the prefill costs)."""
    if not draft_max:
        return [([], 0)] * len(decoding)
    sequences = []
    for slot in decoding:
        run = slot.run
        assert run is not None
        # The step's own token comes first; drafts must fit max_tokens and the context.
        room = min(draft_max, run.gen.max_tokens - run.generated - 1)
        room = min(room, n_ctx_seq - len(slot.cached) - 1)
        sequences.append((run.lookup, run.acceptance, room))
    return propose(costs, sequences)
