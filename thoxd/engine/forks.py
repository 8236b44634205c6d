"""n > 1: the choices of one prompt share its prefill.

The first choice (the leader) is admitted as any request. Each other choice (a fork) takes a slot
of its own but prefills nothing: it waits until the leader's prompt is in the cache, then gets a
copy of those cells (`llama_memory_seq_cp`: in a unified cache the cells are shared, not
duplicated) and decodes the prompt's last token itself, so from there on it runs like any
sequence with its own sampler. If the leader's cells are gone by then (it failed, or ended and
its slot was taken), a fork copies what is left of them and prefills the rest.
"""

from __future__ import annotations

from thoxd.engine.llama import LlamaContext
from thoxd.engine.request import Generation
from thoxd.engine.slots import Slot, common_prefix


def leader_of(slots: list[Slot], gen: Generation, shared: int) -> Slot | None:
    """The slot running the choice `gen` forks from, if `gen` should wait for its cells: not
    when the slot `gen` got already holds its prompt (`shared` tokens of it)."""
    if gen.fork_of is None or shared >= len(gen.prompt) - 1:
        return None
    return next((s for s in slots if s.run is not None and s.run.gen is gen.fork_of), None)


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
        lead = leader.run
        if lead is not None and lead.gen is gen.fork_of and lead.pending:
            continue  # the leader is still prefilling
        del waiting[gen]
        run = slot.run
        assert run is not None
        n = len(gen.prompt) - 1  # the last token is decoded by each choice itself
        keep = 0 if leader.parked is not None else min(common_prefix(leader.cached, gen.prompt), n)
        if keep:
            ctx.seq_cp(leader.seq_id, slot.seq_id, 0, keep)
        slot.cached[:] = gen.prompt[:keep]
        run.cache_n = keep
        run.pending = gen.prompt[keep:] if keep < n else []
