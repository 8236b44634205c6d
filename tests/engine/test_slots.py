"""Slot bookkeeping without a model: which idle slot a prompt gets, and the parking bound.
(Parking against the real KV cache is tested in test_scheduler.)"""

from __future__ import annotations

from typing import Any, cast

from thoxd.engine.llama import LlamaContext
from thoxd.engine.slots import Running, Slot, common_prefix, park_idle, pick_slot

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
    """Records what parking asks of the context."""

    sliding_window = False

    def __init__(self) -> None:
        self.removed: list[int] = []

    def seq_save(self, seq_id: int) -> bytes:
        return b"cells-%d" % seq_id

    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool:
        self.removed.append(seq_id)
        return True


def test_parking_moves_idle_caches_out_and_keeps_under_the_cap() -> None:
    fake: Any = _Ctx()
    ctx = cast(LlamaContext, fake)
    slots = _slots(list(range(60)), list(range(50)), list(range(30)), used=(1.0, 3.0, 2.0))
    slots[2].run = cast(Running, object())  # running: stays in the cache
    park_idle(slots, ctx, cap=100)
    assert fake.removed == [0, 1]
    # 60 + 50 tokens exceed the cap: the least recently used (slot 0) is dropped entirely.
    assert slots[0].parked is None and slots[0].cached == []
    assert slots[1].parked == b"cells-1" and len(slots[1].cached) == 50
    assert slots[2].parked is None and len(slots[2].cached) == 30
    park_idle(slots, ctx, cap=100)  # nothing new to park: nothing happens
    assert fake.removed == [0, 1]
