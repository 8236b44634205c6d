"""Where a slot's cells live and what a new request keeps of them: which idle slot serves a
prompt best, parking idle slots' cells in host memory, and the cache's layout for a lone request.

A parked slot's cells are copied out (`llama_state_seq_get_data`) and removed from the unified
cache, so each step attends only over the running sequences; admitting a request into it copies
them back. The scheduler decides when; this module keeps the bookkeeping. On a sliding-window
model (Gemma 3) a saved state keeps only the last window's cells of the window layers, and
llama.cpp hands cells that fell out of a sequence's window to other sequences' tokens, so a
prompt that shares less than all of a slot's tokens may not be able to use them; the prefix a
slot shares with others (a system prompt) is saved apart too (`Slot.head`), for the next prompt
with another question.

A request admitted alone gets the cache laid out as a fresh context would lay it out (`lay_out`):
llama.cpp's attention adds up over cells in cell order, in chunks set by the cache's extent, so
the same tokens in other cells give other logits (by up to ~1, measured: bench/reproducible.py).
"""

from __future__ import annotations

from thoxd.engine.llama import LlamaContext
from thoxd.engine.slots import Slot

# Fewest shared tokens worth a second saved copy (a head) on a sliding-window model, and how far
# short of the shared end that copy ends (see park_idle and save_head).
MIN_HEAD = 32
HEAD_SLACK = 16


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
    recently used one, and share nothing. Those few cells were computed in another prompt's
    batch; reused, they save little and make the output depend on what ran before (Gemma 3's
    kernels give the same tokens other logits in another batch: 2 of 6 lone prompts, measured).
    """
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
    return slot, 0


def _keep(prompt: list[int], shared: int) -> int:
    """The cached tokens a prompt reuses: all it shares but its last (see Running.pending)."""
    return min(shared, len(prompt) - 1)


def claim(slot: Slot, ctx: LlamaContext, prompt: list[int], shared: int) -> int:
    """Make an idle slot's cache hold the first tokens of `prompt` it shares (copying a parked
    prefix back in); how many it kept. The prompt's last token is always computed anew (see
    Running.pending). A sliding window's head (see Slot.head) stays while the slot's tokens
    still start with it, for the next prompts that cut back to it."""
    keep = _keep(prompt, shared)
    head = slot.head if slot.head is not None and slot.head[0] <= keep else None
    if slot.parked is not None:
        saved, slot.parked = slot.parked, None
        if head is not None and keep < len(slot.cached):
            # Cut back below the saved end, the whole save would lack window cells: the
            # prefix saved apart is whole.
            keep, saved = head
            del slot.cached[keep:]
        if keep and not ctx.seq_restore(slot.seq_id, saved):
            keep = 0
    trimmed = keep >= len(slot.cached) or ctx.seq_rm(slot.seq_id, keep)
    # A sliding window's cells may lack what the next token attends to: restored, they are the
    # saved end's last window only; in place, llama.cpp gives cells that fell out of the window
    # to other sequences' new tokens. Then the head, else nothing.
    if not trimmed or (keep and not ctx.seq_covers(slot.seq_id, keep)):
        ctx.seq_rm(slot.seq_id, -1)
        keep = head[0] if head is not None and ctx.seq_restore(slot.seq_id, head[1]) else 0
    del slot.cached[keep:]
    slot.head = head if keep else None
    return keep


def save_head(slot: Slot, ctx: LlamaContext, keep: int) -> int:
    """On a sliding-window model, a request admitted beside others that keeps a long cached
    prefix (a system prompt) starts a head for its slot, unless it has one: cut back to
    HEAD_SLACK short of that prefix (as `_save_head`), those cells saved apart, and the
    request prefills the few tokens again. While requests run side by side, the cells falling
    out of a sequence's window go to the others' tokens, so cut back in place to that prefix
    the slot could no longer use it (the chat workload at 8 streams prefilled its ~860-token
    prompt again for one request in eight, measured). Returns what the request keeps now."""
    head = keep - HEAD_SLACK
    if slot.head is not None or not ctx.sliding_window or head < MIN_HEAD:
        return keep
    if not ctx.seq_rm(slot.seq_id, head):
        return keep
    del slot.cached[head:]
    slot.head = (head, ctx.seq_save(slot.seq_id))
    return head


def park_idle(slots: list[Slot], ctx: LlamaContext, cap: int) -> None:
    """Move idle slots' cells out of the cache into host memory (before a step, so only while a
    sequence runs); keep what host memory holds (parked slots and every head) under `cap`
    tokens by dropping the least recently used parked slots, then running slots' heads."""
    newly = [s for s in slots if s.run is None and s.cached and s.parked is None]
    if not newly:  # the common case in a step loop: nothing changed
        return
    for slot in newly:
        slot.parked = ctx.seq_save(slot.seq_id)
        if ctx.sliding_window:
            _save_head(slot, slots, ctx)
        ctx.seq_rm(slot.seq_id, -1)
    parked = sorted((s for s in slots if s.parked is not None), key=lambda s: s.last_used)
    heads = sorted((s for s in slots if s.parked is None and s.head), key=lambda s: s.last_used)
    total = sum(_parked_tokens(s) for s in [*parked, *heads])
    for slot in parked:
        if total <= cap:
            break
        total -= _parked_tokens(slot)
        slot.parked = slot.head = None
        slot.cached.clear()
    for slot in heads:  # a running prompt's own copy: the next prompt may want it
        if total <= cap:
            break
        total -= _parked_tokens(slot)
        slot.head = None


def _save_head(slot: Slot, slots: list[Slot], ctx: LlamaContext) -> None:
    """A sliding window's save keeps the last window's cells only, so a prompt that shares less
    than all of it (the same system prompt, another question) could not use it: the prefix this
    slot shares with another is saved apart for such prompts. A little short of it, since the
    next prompt may part a few tokens sooner ("Question 10" shared by this round's prompts,
    "Question 2" the next round's); a running slot counts by its whole prompt (it may be
    halfway through prefilling it)."""
    shared = (
        common_prefix(slot.cached, s.run.gen.prompt if s.run else s.cached)
        for s in slots
        if s is not slot
    )
    head = max(shared, default=0) - HEAD_SLACK
    if MIN_HEAD <= head < len(slot.cached) - 1 and ctx.seq_rm(slot.seq_id, head):
        slot.head = (head, ctx.seq_save(slot.seq_id))


def _parked_tokens(slot: Slot) -> int:
    """Tokens of `slot` in host memory: its parked cells, if any, and its head."""
    parked = len(slot.cached) if slot.parked is not None else 0
    return parked + (slot.head[0] if slot.head is not None else 0)


def lay_out(
    slots: list[Slot],
    slot: Slot,
    ctx: LlamaContext,
    prompt: list[int],
    shared: int,
    cap: int,
    *,
    alone: bool,
) -> None:
    """Before `slot` is claimed for `prompt` (`shared` tokens of it cached there): if nothing
    else runs (`alone`), every other idle slot is parked now rather than before the step, the
    cells `slot` keeps are copied out unless they already lie from cell 0 on, and the cache is
    emptied, so that `claim` puts them back from cell 0 and the request's tokens follow in
    order: the layout of a fresh context, so the same request gives the same logits whatever
    ran before it. Beside other requests no layout is kept: every slot loses `alone`."""
    if not alone:
        for s in slots:
            s.alone = False
        return
    others = [s for s in slots if s is not slot]
    if (
        slot.alone
        and slot.cached
        and slot.parked is None
        and not any(s.cached and s.parked is None for s in others)
    ):
        return  # it ran alone last and nothing came in since: its cells are in place
    if slot.cached and slot.parked is None:
        # Cut to what the request keeps first: less to copy, and a sliding window's saved
        # cells (the last window's, see claim) are then the ones its next token needs.
        keep = _keep(prompt, shared)
        if keep < len(slot.cached) and ctx.seq_rm(slot.seq_id, keep):
            del slot.cached[keep:]
        if slot.cached:  # claim restores it: not counted against the cap
            slot.parked = ctx.seq_save(slot.seq_id)
    park_idle(others, ctx, cap)
    ctx.clear(data=False)  # also takes the cache's next cell back to 0
    slot.alone = True
