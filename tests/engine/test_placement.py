"""Where slots' cells live: which idle slot a prompt gets, the parking bound and a sliding
window's head, without a model (a fake context records what is asked of it); then on Gemma 3,
a system prompt served to every request of a chat at eight streams."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from tests.engine.helpers import GREEDY, collect, load_model
from thoxd.catalog.entries import ModelSpec
from thoxd.engine.llama import LlamaContext
from thoxd.engine.placement import (
    HEAD_SLACK,
    claim,
    common_prefix,
    park_idle,
    pick_slot,
    save_head,
)
from thoxd.engine.request import Generation
from thoxd.engine.slots import Running, Slot

BOS = 2


def _slots(*caches: list[int], used: tuple[float, ...] = ()) -> list[Slot]:
    return [
        Slot(seq_id=i, cached=list(c), last_used=used[i] if used else 0.0)
        for i, c in enumerate(caches)
    ]


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_the_longest_useful_cache_wins() -> None:
    slots = _slots([BOS, 5, 6, 7], [BOS, 5, 6, 7, 8, 9], [])
    slot, shared = pick_slot(slots, [BOS, 5, 6, 7, 8, 9, 10])
    assert (slot.seq_id, shared) == (1, 6)


def test_a_shared_header_alone_does_not_cost_another_prompt_its_cache() -> None:
    # Slot 0 holds a long prefix that only shares BOS with the new prompt: take the empty slot.
    slots = _slots([BOS, *range(100, 140)], [])
    slot, shared = pick_slot(slots, [BOS, 7, 8, 9, 10, 11])
    assert (slot.seq_id, shared) == (1, 0)
    # With no empty slot, the least recently used one goes.
    slots = _slots([BOS, *range(100, 140)], [BOS, *range(200, 240)], used=(5.0, 1.0))
    slot, _ = pick_slot(slots, [BOS, 7, 8, 9, 10, 11])
    assert slot.seq_id == 1


def test_busy_slots_are_never_picked() -> None:
    slots = _slots([BOS, 5, 6, 7], [])
    slots[0].run = cast(Running, object())
    slot, _ = pick_slot(slots, [BOS, 5, 6, 7, 8])
    assert slot.seq_id == 1


class _Ctx:
    """Records what parking asks of the context. With a sliding window (512 tokens), the cells
    in place start at position `covered_from`."""

    def __init__(self, sliding_window: bool = False, covered_from: int = 0) -> None:
        self.sliding_window = sliding_window
        self.covered_from = covered_from
        self.removed: list[int] = []
        self.saved: list[int] = []  # each save's length
        self.restored: list[bytes] = []
        self.length = 0

    def seq_save(self, seq_id: int) -> bytes:
        self.saved.append(self.length)
        return b"cells-%d-%d" % (seq_id, self.length)

    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool:
        self.removed.append(seq_id)
        self.length = 0 if p0 < 0 else min(self.length, p0)
        return True

    def seq_restore(self, seq_id: int, data: bytes) -> bool:
        self.restored.append(data)
        self.length = int(data.split(b"-")[-1])
        self.covered_from = 0
        return True

    def seq_covers(self, seq_id: int, n: int) -> bool:
        return not self.sliding_window or self.covered_from <= max(0, n - 512)


def test_parking_moves_idle_caches_out_and_keeps_under_the_cap() -> None:
    fake: Any = _Ctx()
    ctx = cast(LlamaContext, fake)
    slots = _slots(list(range(60)), list(range(50)), list(range(30)), used=(1.0, 3.0, 2.0))
    slots[2].run = cast(Running, object())  # running: stays in the cache
    park_idle(slots, ctx, cap=100)
    assert fake.removed == [0, 1]
    # 60 + 50 tokens exceed the cap: the least recently used (slot 0) is dropped entirely.
    assert slots[0].parked is None and slots[0].cached == []
    assert slots[1].parked == b"cells-1-0" and len(slots[1].cached) == 50
    assert slots[2].parked is None and len(slots[2].cached) == 30
    park_idle(slots, ctx, cap=100)  # nothing new to park: nothing happens
    assert fake.removed == [0, 1]


def test_running_slots_heads_count_against_the_cap_and_go_last() -> None:
    def slots_with_heads(idle: int) -> list[Slot]:
        slots = _slots(list(range(idle)), *[list(range(30))] * 3, used=(9.0, 4.0, 2.0, 3.0))
        for slot in slots[1:]:  # running, each with a 30-token head of its own
            slot.run, slot.head = cast(Running, object()), (30, b"head")
        return slots

    # 40 parked + 3 x 30 of heads over a cap of 100: the parked slot goes first, and that does.
    slots = slots_with_heads(40)
    park_idle(slots, cast(LlamaContext, _Ctx()), cap=100)
    assert slots[0].parked is None and slots[0].cached == []
    assert all(s.head == (30, b"head") for s in slots[1:])
    # Under a cap of 70, a running slot's head goes too: the least recently used (slot 2's).
    slots = slots_with_heads(10)
    park_idle(slots, cast(LlamaContext, _Ctx()), cap=70)
    assert slots[0].parked is None
    assert [s.head is None for s in slots[1:]] == [False, True, False]
    assert len(slots[2].cached) == 30  # its cells in the cache are untouched


def test_a_long_kept_prefix_beside_others_starts_a_head() -> None:
    fake: Any = _Ctx(sliding_window=True)
    ctx = cast(LlamaContext, fake)
    slot = Slot(seq_id=1, cached=list(range(900)))
    fake.length = 900
    # Beside others, a request keeps 850 tokens: cut HEAD_SLACK short and saved apart.
    assert save_head(slot, ctx, 850) == 850 - HEAD_SLACK
    assert slot.head == (834, b"cells-1-834") and len(slot.cached) == 834
    assert save_head(slot, ctx, 850) == 850  # one head at a time: kept, not saved again
    assert fake.saved == [834]
    # Short prefixes, or a model without a sliding window: nothing.
    assert save_head(Slot(seq_id=2, cached=[1] * 40), ctx, 40) == 40
    plain = Slot(seq_id=3, cached=list(range(900)))
    assert save_head(plain, cast(LlamaContext, _Ctx()), 850) == 850 and plain.head is None


def test_a_cut_back_missing_window_cells_falls_back_to_the_head() -> None:
    # The slot ran on after its head: cells from before position 400 went to other sequences.
    fake: Any = _Ctx(sliding_window=True, covered_from=400)
    ctx = cast(LlamaContext, fake)
    slot = Slot(seq_id=0, cached=list(range(989)), head=(834, b"cells-0-834"))
    fake.length = 989
    prompt = [*range(850), 7, 8]  # shares 850 tokens, whose next token attends back to 338
    assert claim(slot, ctx, prompt, 850) == 834
    assert fake.restored == [b"cells-0-834"] and slot.cached == list(range(834))
    assert slot.head == (834, b"cells-0-834")  # still the slot's start: kept for the next
    # Without a head the same cut back keeps nothing (the prompt is prefilled afresh) ...
    fake = _Ctx(sliding_window=True, covered_from=400)
    fake.length = 989
    bare = Slot(seq_id=0, cached=list(range(989)))
    assert claim(bare, cast(LlamaContext, fake), prompt, 850) == 0 and bare.cached == []
    # ... and a prompt keeping less than the head drops it: the slot no longer starts with it.
    fake = _Ctx(sliding_window=True)
    fake.length = 989
    short = Slot(seq_id=0, cached=list(range(989)), head=(834, b"cells-0-834"))
    assert claim(short, cast(LlamaContext, fake), [*range(700), 5], 700) == 700
    assert short.head is None


def test_every_request_of_a_chat_at_eight_streams_reuses_the_system_prompt(
    gemma_spec: ModelSpec, gemma_file: Path, models_dir: Path
) -> None:
    # Gemma 3, 4 slots, 8 requests at once sharing a ~860-token system prompt, twice: slots
    # are reused in place as soon as they free, after their window's older cells went to the
    # other sequences' tokens. Without heads, one request in eight prefilled it all again.
    m = load_model(gemma_spec, gemma_file, models_dir, draft_max=0)
    system = "You are the assistant of a small engineering team. Answer briefly. " + " ".join(
        f"Rule {i}: prefer {w} solutions that keep {w} data local."
        for i, w in enumerate(["small", "fast", "plain", "local"] * 15)
    )
    n_system = len(m.llama.tokenize(system, add_special=True))
    assert n_system > 700  # longer than the 512-token window

    async def round_of(k: int) -> list[int]:
        gens = [
            Generation(
                prompt=m.llama.tokenize(f"{system}\n\nQuestion {k + i}: a name?", add_special=True),
                params=GREEDY,
                max_tokens=128,
            )
            for i in range(8)
        ]
        m.submit(*gens)
        return [(await collect(g))[1].timings.cache_n for g in gens]

    try:
        asyncio.run(round_of(800))
        second = asyncio.run(round_of(810))
    finally:
        m.close()
    assert all(n >= n_system - 40 for n in second), second
