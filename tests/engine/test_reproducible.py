"""A lone request gives the same tokens, with the same log probabilities, whatever ran before it:
on a fresh engine, after its cache was parked and restored, after other requests ran alone or
together, and with 2 or 4 slots (README, "Concurrency and determinism"). The cache is laid out
for it as on a fresh context (thoxd.engine.placement.lay_out); llama.cpp's attention sums over cells
in cell order, so the same cells elsewhere give other logits. Drafts off throughout: what a
request drafts rests on step costs the engine learns from every step it runs, and drafted steps
take the multi-row kernels (README)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest

from tests.engine.helpers import load_model
from thoxd.catalog.entries import ModelSpec
from thoxd.engine.llama import LlamaContext
from thoxd.engine.model import LoadedModel
from thoxd.engine.placement import lay_out, pick_slot
from thoxd.engine.request import Delta, Failed, Finished, Generation
from thoxd.engine.sampling import SamplingParams
from thoxd.engine.slots import Running, Slot

GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.8, seed=1234)
PROMPT = "def fibonacci(n):\n    "
OTHERS = ("The weather today is", "SELECT * FROM users WHERE", "A haiku about autumn:")

# What a request produced: each token with its log probability, and its Finished event.
Trace = tuple[list[tuple[bytes, float]], Finished]


async def _trace(gen: Generation) -> Trace:
    tokens: list[tuple[bytes, float]] = []
    async for event in gen.events():
        if isinstance(event, Delta):
            tokens += [(t.token, t.logprob) for t in event.logprobs]
        elif isinstance(event, Failed):
            raise event.error
        else:
            return tokens, event
    raise AssertionError("no Finished event")


def run(
    model: LoadedModel, *prompts: str, params: SamplingParams = GREEDY, max_tokens: int = 12
) -> Trace:
    """`prompts` submitted together; the first one's trace."""

    async def main() -> Trace:
        gens = [
            Generation(
                prompt=model.llama.tokenize(p, add_special=True),
                params=params,
                max_tokens=max_tokens,
                logprobs=0,
            )
            for p in prompts
        ]
        for gen in gens:
            model.submit(gen)
        return (await asyncio.gather(*(_trace(g) for g in gens)))[0]

    return asyncio.run(main())


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("slots", [2, 4])
def test_a_parked_and_restored_prefix_gives_the_fresh_engines_output(
    default_spec: ModelSpec, model_file: Path, models_dir: Path, slots: int, params: SamplingParams
) -> None:
    model = load_model(default_spec, model_file, models_dir, slots=slots, draft_max=0)
    try:
        fresh, _ = run(model, PROMPT, params=params)  # the engine's first request
        run(model, OTHERS[0], params=params)  # parks the prompt's slot, leaves its own cells
        again, fin = run(model, PROMPT, params=params)
    finally:
        model.close()
    assert len(fresh) == 12
    # Its prefix came back from host memory (only the last prompt token was computed)...
    assert fin.timings.cache_n == fin.prompt_tokens - 1
    # ...and every token and its log probability are the fresh engine's, bit for bit.
    assert again == fresh


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_requests_that_ran_together_before_change_nothing(
    default_spec: ModelSpec, model_file: Path, models_dir: Path, params: SamplingParams
) -> None:
    model = load_model(default_spec, model_file, models_dir, slots=4, draft_max=0)
    try:
        fresh, _ = run(model, PROMPT, params=params)
        run(model, *OTHERS, params=params)  # three at once: their cells interleave
        again, _ = run(model, PROMPT, params=params)
        run(model, OTHERS[1], PROMPT, params=params)  # the prompt's own slot beside another
        last, _ = run(model, PROMPT, params=params)
    finally:
        model.close()
    assert again == fresh
    assert last == fresh


@pytest.mark.parametrize("which", ["default", "gemma"])
def test_the_slot_count_changes_nothing(
    request: pytest.FixtureRequest, models_dir: Path, which: str
) -> None:
    """Drafts off: what a lone request drafts rests on the step costs each load measures.
    With 2 slots the prompt's own cache is gone by the end, and the slot it gets shares only
    BOS with it: nothing is reused (Gemma 3 gave other logits for a BOS cell from another
    prompt's batch)."""
    spec: ModelSpec = request.getfixturevalue(f"{which}_spec")
    path: Path = request.getfixturevalue("model_file" if which == "default" else "gemma_file")
    traces = []
    for slots in (2, 4):
        model = load_model(spec, path, models_dir, slots=slots, draft_max=0)
        try:
            traces.append(run(model, PROMPT)[0])
            run(model, OTHERS[0])
            run(model, *OTHERS[1:])
            traces.append(run(model, PROMPT)[0])
        finally:
            model.close()
    assert len(traces[0]) == 12
    assert all(t == traces[0] for t in traces)


def test_a_sliding_window_prefix_comes_back_only_when_whole(
    gemma_spec: ModelSpec, gemma_file: Path, models_dir: Path
) -> None:
    """Gemma 3 attends over the last 512 positions in most layers, and a saved sequence keeps
    only those layers' last 512 cells. A long prompt asked again after its slot was parked is
    prefilled afresh (cut back to the prompt, the restored cells would miss the start of its
    window) and gives the fresh output; a next turn that extends all of it still reuses it.
    (Past the window its cells come back elsewhere than a fresh prefill puts them: the output
    may differ from a fresh engine's then, README.)"""
    model = load_model(gemma_spec, gemma_file, models_dir, slots=2, draft_max=0)
    long = "Prices: " + " ".join(f"item {i} costs {i * 7 % 13} dollars;" for i in range(70))
    try:
        n = len(model.llama.tokenize(long, add_special=True))
        assert n > 600
        fresh, _ = run(model, long, max_tokens=6)
        run(model, OTHERS[0], max_tokens=6)
        again, fin = run(model, long, max_tokens=6)
        assert fin.timings.cache_n == 0
        assert again == fresh
        run(model, OTHERS[0], max_tokens=6)
        text = b"".join(token for token, _ in fresh).decode()
        _, turn = run(model, long + text + " Total:", max_tokens=2)
        assert turn.timings.cache_n > n
        # Beside another request the turn's cells stay in place, but they came back from host
        # memory: cut back to the prompt, they would miss the same window cells.
        _, fin = run(model, long, OTHERS[0], max_tokens=2)
        assert fin.timings.cache_n == 0
        # Alone again, its cells (all there now) are cut back to the prompt before they are
        # copied out and in, so the window's cells come back with them.
        _, fin = run(model, long, max_tokens=2)
        assert fin.timings.cache_n == n - 1
    finally:
        model.close()


# -- lay_out without a model ------------------------------------------------------------------


class _Ctx:
    """Records what laying out asks of the context."""

    sliding_window = False

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def seq_save(self, seq_id: int) -> bytes:
        self.calls.append(("save", seq_id))
        return b"cells-%d" % seq_id

    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool:
        self.calls.append(("rm", seq_id))
        return True

    def clear(self, *, data: bool = True) -> None:
        assert not data  # the contents stay: only which cells are taken is reset
        self.calls.append(("clear", -1))


def test_without_a_useful_cache_nothing_is_shared() -> None:
    slots = [Slot(seq_id=0, cached=[2, 5, 6, 7, 8], last_used=1.0), Slot(seq_id=1, cached=[2, 9])]
    slot, shared = pick_slot(slots, [2, 30, 31, 32])  # BOS alone in common with both
    assert (slot.seq_id, shared) == (1, 0)


def _setup(*caches: list[int]) -> tuple[list[Slot], Any, LlamaContext]:
    slots = [Slot(seq_id=i, cached=list(c), last_used=float(i)) for i, c in enumerate(caches)]
    fake = _Ctx()
    return slots, fake, cast(LlamaContext, fake)


def test_alone_every_cell_leaves_and_the_slots_own_come_back_from_cell_0() -> None:
    slots, fake, ctx = _setup([7] * 60, [4, 5], [6] * 90)
    slots[0].last_used = slots[2].last_used = -1.0  # the least recently used
    slots[2].parked = b"parked-2"
    lay_out(slots, slots[0], ctx, [7] * 50 + [8], 50, cap=50, alone=True)
    # The cells it keeps (50 of 60) are saved for claim to restore; the other idle slot is
    # parked as before a step; then the cache is emptied.
    assert fake.calls == [("rm", 0), ("save", 0), ("save", 1), ("rm", 1), ("clear", -1)]
    assert slots[0].parked == b"cells-0" and len(slots[0].cached) == 50 and slots[0].alone
    assert slots[1].parked == b"cells-1"
    # The bound on parked tokens drops the others' oldest (slot 2), never the claimed slot's.
    assert slots[2].parked is None and slots[2].cached == []


def test_a_slot_that_ran_alone_last_keeps_its_cells_in_place() -> None:
    slots, fake, ctx = _setup([1, 2, 3], [4, 5])
    slots[1].parked = b"parked-1"
    slots[0].alone = True
    lay_out(slots, slots[0], ctx, [1, 2, 3, 9], 3, cap=50, alone=True)
    assert fake.calls == []


def test_beside_others_no_slot_keeps_its_layout() -> None:
    slots, fake, ctx = _setup([1, 2, 3], [4, 5])
    slots[0].alone = True
    slots[0].run = cast(Running, object())
    lay_out(slots, slots[1], ctx, [4, 5, 6], 2, cap=50, alone=False)
    assert fake.calls == []
    assert not any(s.alone for s in slots)
    # Later, alone again, its cells are laid out anew.
    slots[0].run = None
    lay_out(slots, slots[0], ctx, [1, 2, 3, 9], 3, cap=50, alone=True)
    assert fake.calls == [("save", 0), ("save", 1), ("rm", 1), ("clear", -1)]
