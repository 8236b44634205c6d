"""thoxd/engine/queue.py: the bounded wait queue, fair between clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from thoxd.engine.queue import WaitQueue
from thoxd.engine.request import Generation
from thoxd.engine.sampling import SamplingParams


def in_loop(test: Callable[[], None]) -> None:
    """Generations are made on an event loop (they hand events back to it)."""

    async def main() -> None:
        test()

    asyncio.run(main())


def gen(client: str, tag: int = 0) -> Generation:
    return Generation(prompt=[1, tag], params=SamplingParams(), max_tokens=1, client=client)


def test_a_backlog_waits_behind_another_clients_single_request() -> None:
    def test() -> None:
        queue = WaitQueue(size=32)
        flood = [gen("A", i) for i in range(20)]
        for g in flood:
            queue.add([g], idle_slots=0)
        single = gen("B")
        queue.add([single], idle_slots=0)
        # A holds every slot; the first slot that frees goes to B, then A's oldest waits on.
        assert queue.take(1, {"A": 4}) == [single]
        assert queue.take(2, {"A": 3, "B": 1}) == flood[:2]

    in_loop(test)


def test_equal_shares_alternate_and_each_client_stays_in_order() -> None:
    def test() -> None:
        queue = WaitQueue(size=32)
        a = [gen("A", i) for i in range(3)]
        b = [gen("B", i) for i in range(3)]
        for g in [*a, *b]:  # all of A's first
            queue.add([g], idle_slots=0)
        assert queue.take(6) == [a[0], b[0], a[1], b[1], a[2], b[2]]
        assert queue.waiting() == 0

    in_loop(test)


def test_one_request_is_one_entry_and_cancelled_ones_leave() -> None:
    def test() -> None:
        queue = WaitQueue(size=32)
        choices = [gen("A", i) for i in range(3)]  # one request, three choices
        queue.add(choices, idle_slots=0)
        gone = gen("B")
        queue.add([gone], idle_slots=0)
        gone.cancel()
        other = gen("C")
        queue.add([other], idle_slots=0)
        # C holds nothing, A took one: C's request comes before A's second choice.
        assert queue.take(2) == [choices[0], other]
        assert queue.take(5) == choices[1:]
        assert queue.waiting() == 0

    in_loop(test)


def test_a_capped_client_leaves_slots_free_while_others_are_served() -> None:
    def test() -> None:
        queue = WaitQueue(size=32, cap=2)
        flood = [gen("A", i) for i in range(6)]
        for g in flood:
            queue.add([g], idle_slots=0)
        # B is being served: A takes up to its cap, and the other free slots stay free.
        assert queue.take(4, {"B": 1}) == flood[:2]
        assert queue.take(2, {"A": 2, "B": 1}) == []
        # A newcomer finds them free at once.
        c = gen("C")
        queue.add([c], idle_slots=2)
        assert queue.take(2, {"A": 2, "B": 1}) == [c]
        # Alone on the model, A may use every slot.
        assert queue.take(3, {"A": 2}) == flood[2:5]

    in_loop(test)


def test_without_a_cap_a_lone_flood_fills_every_slot() -> None:
    def test() -> None:
        queue = WaitQueue(size=32)
        flood = [gen("A", i) for i in range(6)]
        for g in flood:
            queue.add([g], idle_slots=0)
        assert queue.take(4, {"B": 1}) == flood[:4]

    in_loop(test)
