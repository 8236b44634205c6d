"""Prefill shared with a running sequence: the choices of one prompt (n > 1), and prompts that
start alike (a system prompt several clients send at once).

The first choice (the leader) is admitted as any request. Each other choice (a fork) takes a slot
of its own but prefills nothing: it waits until the leader's prompt is in the cache, then gets a
copy of those cells (`llama_memory_seq_cp`: in a unified cache the cells are shared, not
duplicated) and decodes the prompt's last token itself, so from there on it runs like any
sequence with its own sampler. If the leader's cells are gone by then (it failed, or ended and
its slot was taken), a fork copies what is left of them and prefills the rest.

A request whose prompt shares at least MIN_SHARED tokens with a running request's prompt (more
than any idle slot's cache holds for it) follows that request the same way: it waits until the
shared part is prefilled, copies those cells and prefills only the rest, instead of prefilling
the same system prompt again one step after the other (llama-server prefills each).
"""

from __future__ import annotations

from thoxd.engine.llama import LlamaContext
from thoxd.engine.placement import common_prefix
from thoxd.engine.request import Generation
from thoxd.engine.slots import Slot

MIN_SHARED = 64  # tokens of a running prompt worth waiting for and copying


def leader_of(slots: list[Slot], gen: Generation, shared: int) -> Slot | None:
    """The slot whose cells `gen` should copy instead of prefilling them: the one running the
    choice it forks from, or the running prompt it shares the most with (at least MIN_SHARED
    tokens more than the `shared` tokens of it the slot `gen` got holds already)."""
    n = len(gen.prompt) - 1
    if shared >= n:
        return None
    if gen.fork_of is not None:
        return next((s for s in slots if s.run is not None and s.run.gen is gen.fork_of), None)
    best, most = None, shared + MIN_SHARED - 1
    for s in slots:
        if s.run is None or (s.run.follows is not None and not s.cached):
            continue  # idle, or itself waiting for cells
        k = min(common_prefix(s.run.gen.prompt, gen.prompt), n)
        if k > most:
            best, most = s, k
    return best


def sync_forks(slots: list[Slot], waiting: dict[Generation, Slot], ctx: LlamaContext) -> None:
    """Before a step (and before idle slots are parked): each waiting fork whose leader has
    prefilled its prompt gets the leader's cells and joins the step. Forks that ended while
    waiting (cancelled) are forgotten."""
    running = {s.run.gen: s for s in slots if s.run is not None}
    for gen, leader in list(waiting.items()):
        slot = running.get(gen)
        if slot is None:
            del waiting[gen]
            continue
        run = slot.run
        assert run is not None
        n = len(gen.prompt) - 1  # the last token is decoded by each choice itself
        lead = leader.run
        if lead is not None and lead.gen is run.follows and lead.pending:
            wanted = min(common_prefix(lead.gen.prompt, gen.prompt), n)
            if len(leader.cached) < wanted:
                continue  # the leader is still prefilling what they share
        del waiting[gen]
        keep = 0 if leader.parked is not None else min(common_prefix(leader.cached, gen.prompt), n)
        if keep:
            ctx.seq_cp(leader.seq_id, slot.seq_id, 0, keep)
        slot.cached[:] = gen.prompt[:keep]
        run.cache_n = keep
        run.pending = gen.prompt[keep:] if keep < n else []
