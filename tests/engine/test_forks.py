"""thoxd/engine/forks.py: n > 1 choices of one prompt share its prefill."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.engine.helpers import collect, counting, load_model
from thoxd.catalog.entries import ModelSpec
from thoxd.engine.forks import leader_of, sync_forks
from thoxd.engine.model import LoadedModel
from thoxd.engine.request import Generation
from thoxd.engine.sampling import SamplingParams
from thoxd.engine.slots import Slot


@pytest.fixture(scope="module")
def model(default_spec: ModelSpec, model_file: Path, models_dir: Path) -> Iterator[LoadedModel]:
    loaded = load_model(default_spec, model_file, models_dir, slots=4)
    yield loaded
    loaded.close()


def choices(first: Generation, n: int, seeds: list[int] | None = None) -> list[Generation]:
    """`first` and n - 1 forks of it, as start.py makes them."""
    gens = [first]
    for k in range(1, n):
        params = replace(first.params, seed=seeds[k]) if seeds else first.params
        gens.append(
            Generation(
                prompt=first.prompt, params=params, max_tokens=first.max_tokens, fork_of=first
            )
        )
    return gens


async def run_all(model: LoadedModel, gens: list[Generation]) -> list[tuple[str, Any]]:
    model.submit(*gens)
    return list(await asyncio.gather(*(collect(g) for g in gens)))


def test_forks_copy_the_prompt_instead_of_prefilling_it(model: LoadedModel) -> None:
    async def main() -> None:
        first = counting(model, 300)
        results = await run_all(model, choices(first, 3))
        n = len(first.prompt)
        (text, lead), *forks = results
        assert lead.timings.prompt_n == n  # the leader prefilled the prompt (a cache miss)
        for fork_text, fork in forks:
            # Each fork computed only the last prompt token: the rest came from the leader.
            assert (fork.timings.cache_n, fork.timings.prompt_n) == (n - 1, 1)
            assert fork.prompt_tokens == n
            assert fork_text == text  # greedy counting: every choice counts on alike
        assert text.startswith(" 306, 307")

    asyncio.run(main())


def test_forks_sample_with_their_own_seeds(model: LoadedModel) -> None:
    async def main() -> list[str]:
        first = Generation(
            prompt=model.llama.tokenize("Once upon a time", add_special=True),
            params=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1),
            max_tokens=8,
        )
        results = await run_all(model, choices(first, 4, seeds=[1, 2, 3, 4]))
        return [text for text, _ in results]

    texts = asyncio.run(main())
    assert len(set(texts)) > 1  # 4 seeds over the whole vocabulary: not all one text


def test_a_cancelled_leader_leaves_its_forks_running(model: LoadedModel) -> None:
    async def main() -> None:
        first = counting(model, 500)
        gens = choices(first, 3)
        model.submit(*gens)
        first.cancel()  # before, or while, its prefill: the forks prefill what they lack
        results = await asyncio.gather(*(collect(g) for g in gens))
        assert results[0][1].finish_reason == "cancelled"
        for text, finished in results[1:]:
            assert finished.finish_reason == "length"
            assert text.startswith(" 506, 507")

    asyncio.run(main())


# -- sync_forks on its own: what a fork does in each state its leader can be in ---------------


class FakeContext:
    def __init__(self) -> None:
        self.copies: list[tuple[int, int, int, int]] = []

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.copies.append((src, dst, p0, p1))


PROMPT = [1, 10, 11, 12, 13, 14]


class Fake(SimpleNamespace):
    """A generation or a run with only the fields sync_forks reads; keyed by identity."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__


def fork_setup(leader_cached: list[int], leader_pending: list[int] | None) -> tuple[Any, ...]:
    lead_gen = Fake(prompt=PROMPT)
    gen = Fake(prompt=PROMPT, fork_of=lead_gen)
    leader = Slot(seq_id=0, cached=list(leader_cached))
    if leader_pending is not None:
        leader.run = Fake(gen=lead_gen, pending=leader_pending)  # type: ignore[assignment]
    fork = Slot(seq_id=1)
    fork.run = Fake(gen=gen, pending=[], cache_n=0, follows=lead_gen)  # type: ignore[assignment]
    return gen, leader, fork


def test_a_fork_waits_while_its_leader_prefills() -> None:
    gen, leader, fork = fork_setup(PROMPT[:2], PROMPT[2:])
    waiting = {gen: leader}
    ctx = FakeContext()
    sync_forks([leader, fork], waiting, ctx)  # type: ignore[arg-type]
    assert waiting == {gen: leader} and ctx.copies == []


def test_a_fork_copies_all_but_the_last_token_once_prefilled() -> None:
    gen, leader, fork = fork_setup(PROMPT, [])
    waiting = {gen: leader}
    ctx = FakeContext()
    sync_forks([leader, fork], waiting, ctx)  # type: ignore[arg-type]
    assert ctx.copies == [(0, 1, 0, len(PROMPT) - 1)]
    assert fork.cached == PROMPT[:-1] and fork.run.pending == [] and fork.run.cache_n == 5
    assert waiting == {}


def test_a_fork_prefills_what_its_leaders_cells_no_longer_hold() -> None:
    # The leader ended and its slot was taken by a prompt sharing only 3 tokens.
    gen, leader, fork = fork_setup([*PROMPT[:3], 99, 98], None)
    ctx = FakeContext()
    sync_forks([leader, fork], {gen: leader}, ctx)  # type: ignore[arg-type]
    assert ctx.copies == [(0, 1, 0, 3)]
    assert fork.cached == PROMPT[:3] and fork.run.pending == PROMPT[3:]


def test_a_fork_whose_leader_was_parked_prefills_it_all() -> None:
    gen, leader, fork = fork_setup(PROMPT, None)
    leader.parked = b"cells"
    ctx = FakeContext()
    sync_forks([leader, fork], {gen: leader}, ctx)  # type: ignore[arg-type]
    assert ctx.copies == [] and fork.cached == [] and fork.run.pending == PROMPT


def test_a_fork_that_ended_while_waiting_is_forgotten() -> None:
    gen, leader, fork = fork_setup(PROMPT[:2], PROMPT[2:])
    fork.run = None
    waiting = {gen: leader}
    sync_forks([leader, fork], waiting, FakeContext())  # type: ignore[arg-type]
    assert waiting == {}


def test_only_a_fork_whose_slot_lacks_the_prompt_waits() -> None:
    lead_gen = Fake(prompt=PROMPT)
    leader = Slot(seq_id=0)
    leader.run = Fake(gen=lead_gen, follows=None)  # type: ignore[assignment]
    gen = Fake(prompt=PROMPT, fork_of=lead_gen)
    assert leader_of([leader], gen, 0) is leader  # type: ignore[arg-type]
    assert leader_of([leader], gen, len(PROMPT) - 1) is None  # type: ignore[arg-type]
    assert leader_of([leader], Fake(prompt=PROMPT, fork_of=None), 0) is None  # type: ignore[arg-type]


# -- prompts that start alike ----------------------------------------------------------------

SYSTEM = "You answer questions about the project. " + " ".join(
    f"Note {i}: the module m{i} keeps its state local." for i in range(30)
)


def test_prompts_sent_together_with_one_system_prompt_prefill_it_once(model: LoadedModel) -> None:
    def gen(question: str) -> Generation:
        tokens = model.llama.tokenize(f"{SYSTEM}\nQ: {question}\nA:", add_special=True)
        return Generation(prompt=tokens, params=SamplingParams(temperature=0.0), max_tokens=4)

    async def main() -> tuple[list[Generation], list[tuple[str, Any]]]:
        gens = [gen("what is m1?"), gen("where is m2?"), gen("why m3?")]
        return gens, await run_all(model, gens)

    shared = len(model.llama.tokenize(f"{SYSTEM}\nQ:", add_special=True))
    assert shared > 200
    gens, results = asyncio.run(main())
    first, *others = [finished.timings for _, finished in results]
    assert first.cache_n == 0 and first.prompt_n == len(gens[0].prompt)
    for timings, g in zip(others, gens[1:], strict=True):
        # The system prompt's cells came from the first request; only the question prefilled.
        assert shared - 2 <= timings.cache_n < len(g.prompt)
        assert timings.prompt_n == len(g.prompt) - timings.cache_n


def test_a_prompt_follows_the_running_one_it_shares_the_most_with() -> None:
    short_gen, long_gen = Fake(prompt=[1, *range(100, 180)]), Fake(prompt=[1, *range(100, 300)])
    a, b = Slot(seq_id=0), Slot(seq_id=1)
    a.run = Fake(gen=short_gen, follows=None)  # type: ignore[assignment]
    b.run = Fake(gen=long_gen, follows=None)  # type: ignore[assignment]
    gen = Fake(prompt=[1, *range(100, 250), 7, 8], fork_of=None)
    assert leader_of([a, b], gen, 0) is b  # type: ignore[arg-type]
    # Not when the idle slot it got holds nearly as much, nor for a short shared start.
    assert leader_of([a, b], gen, 120) is None  # type: ignore[arg-type]
    assert leader_of([a], Fake(prompt=[1, 100, 101, 5], fork_of=None), 0) is None  # type: ignore[arg-type]
