"""Prompt-lookup drafts: the lookup, the per-step plan, and the scheduler checking drafts on the
real model (same text as without them, exact limits, rejected drafts taken out of the cache)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from tests.engine.helpers import collect, load_model, run_prompt
from thoxd.catalog.entries import ModelSpec
from thoxd.engine.drafts import (
    Acceptance,
    Lookup,
    StepCosts,
    measure_step_costs,
    propose,
    row_counts,
)
from thoxd.engine.llama import Batch
from thoxd.engine.request import Delta, Finished, Generation
from thoxd.engine.runtime import LoadedModel
from thoxd.engine.sampling import SamplingParams, TokenLogprob

GREEDY = SamplingParams(temperature=0.0)
# Measured on the 2-core development VM (bench/RESULTS.md): a second row doubles a step, and
# rows past four are cheap, in tiles of four.
CPU = StepCosts({1: 10.3, 2: 24.8, 3: 29.9, 4: 34.4, 8: 41.6, 12: 53.8, 16: 55.6})
# Some lines of text and their repetition: what the model continues by copying.
REPEATING = "The quick brown fox jumps over the lazy dog. " * 6 + "The quick"


# ---------------------------------------------------------------- the lookup


def test_lookup_drafts_what_followed_the_latest_occurrence() -> None:
    lookup = Lookup([1, 2, 3, 4, 5, 1, 2, 3, 6, 7, 9, 2, 3])
    # [2, 3] last came before 6 (not 4): the latest occurrence wins.
    assert lookup.draft(3) == [6, 7, 9]
    assert lookup.draft(1) == [6]
    lookup.append(6)
    lookup.append(7)
    # The 3-gram [3, 6, 7] is known and followed by 9 ...
    assert lookup.draft(4) == [9, 2, 3, 6]


def test_lookup_prefers_the_longer_match() -> None:
    # [8, 2] occurred (followed by 5) and so did [1, 8, 2] (followed by 4): the 3-gram decides.
    lookup = Lookup([1, 8, 2, 4, 0, 9, 8, 2, 5, 1, 8, 2])
    assert lookup.draft(1) == [4]


def test_lookup_has_nothing_without_an_earlier_occurrence() -> None:
    assert Lookup().draft(5) == []
    assert Lookup([1, 2, 3, 4]).draft(5) == []
    # Never the sequence's own end: [3, 4] occurs only as the last two tokens.
    assert Lookup([3, 4, 9, 3, 4]).draft(2) == [9, 3]
    assert Lookup([1, 2, 3]).draft(0) == []


def test_acceptance_scores_each_guess_list_until_it_misses() -> None:
    acceptance = Acceptance(4, prior=0.5, window=2)
    acceptance.expect([7, 8, 9])
    acceptance.expect([1, 2, 3])  # a list is open: this one is not scored
    for token in (7, 8, 5):  # right, right, wrong at depth 3
        acceptance.score(token)
    assert acceptance.rates == [0.75, 0.75, 0.25, 0.5]
    acceptance.score(6)  # no list open: nothing to score
    acceptance.expect([4])
    acceptance.score(4)  # right, and the list has run out
    assert acceptance.rates == [0.875, 0.75, 0.25, 0.5]
    assert acceptance.gains(3) == [0.875, 0.875 * 0.75, 0.875 * 0.75 * 0.25]


def test_acceptance_tells_depths_apart() -> None:
    # The first guess nearly always right, the second rarely: long drafts are not worth it.
    acceptance = Acceptance(16)
    for _ in range(40):
        acceptance.expect([1, 2, 3])
        acceptance.score(1)
        acceptance.score(9)
    assert acceptance.rates[0] > 0.99 and acceptance.rates[1] < 0.01
    assert acceptance.gains(3)[1] < 0.01


def test_acceptance_trusts_a_copied_text_within_a_dozen_guess_lists() -> None:
    acceptance = Acceptance(16)
    for lists in range(1, 13):
        acceptance.expect(list(range(16)))
        for token in range(16):
            acceptance.score(token)
        if lists == 3:  # not yet: counting's early streaks look like this too
            assert CPU.plan(1, [acceptance.gains(15)]) == [0]
    assert min(acceptance.rates) > 0.89
    # Enough for a lone stream to draft on the development VM's costs.
    assert CPU.plan(1, [acceptance.gains(15)])[0] > 0


# ---------------------------------------------------------------- the plan


def _steady(rate: float, n: int = 15) -> list[float]:
    return [rate**j for j in range(1, n + 1)]


def test_one_sequence_drafts_only_when_nearly_always_right() -> None:
    assert CPU.plan(1, [_steady(0.5)]) == [0]  # 2 rows cost 2.4x one: not at 50%
    long = CPU.plan(1, [_steady(0.95)])
    assert long[0] >= 7  # past four rows more are cheap: a long draft, to a measured size
    assert 1 + long[0] in CPU.ms
    # Right at first, rarely after: drafting one would cost more than it brings.
    assert CPU.plan(1, [[0.9, 0.09, 0.009]]) == [0]


def test_four_sequences_draft_at_moderate_acceptance() -> None:
    # At four rows a step already costs 34 ms; four more rows cost 7 ms.
    assert CPU.plan(4, [_steady(0.56)] * 4) == [1, 1, 1, 1]
    assert CPU.plan(4, [_steady(0.1)] * 4) == [0, 0, 0, 0]


def test_drafts_go_to_the_sequences_most_often_right() -> None:
    counts = CPU.plan(4, [_steady(0.9), _steady(0.1), _steady(0.1), _steady(0.1)])
    assert counts[0] >= 4 and counts[1:] == [0, 0, 0]
    # A sequence without guesses gets no rows, however good its record.
    assert CPU.plan(4, [[], _steady(0.6, 3), _steady(0.6, 3), _steady(0.6, 3)])[0] == 0


def test_flat_costs_draft_everything_and_unmeasured_sizes_nothing() -> None:
    flat = StepCosts(dict.fromkeys(range(1, 17), 10.0))  # a GPU-like step: rows are free
    assert flat.plan(2, [_steady(0.3), _steady(0.3, 5)]) == [9, 5]  # up to 16 rows in all
    assert CPU.plan(5, [_steady(0.9)] * 5) == [0] * 5  # 5 rows were never measured
    assert StepCosts({}).plan(1, [_steady(0.99)]) == [0]


def test_the_costs_follow_the_steps_that_run() -> None:
    # Measured at load while something else ran: a second row looked nearly free.
    costs = StepCosts({1: 10.0, 2: 11.0})
    assert costs.plan(1, [_steady(0.8)]) == [1]
    costs.observe(2, 20.0)  # a two-row step that ran: it replaces the load's figure
    assert costs.ms[2] == 20.0
    assert costs.plan(1, [_steady(0.8)]) == [0]
    for ms in (30.0, 10.0, 20.0):  # then a running mean of the steps
        costs.observe(2, ms)
    assert costs.ms[2] == 20.0
    fixed = StepCosts({1: 10.0, 2: 11.0}, learn=False)  # tests' stand-in for a GPU step
    fixed.observe(2, 20.0)
    assert fixed.ms[2] == 11.0


def test_sizes_the_load_did_not_measure_are_tried_now_and_then() -> None:
    # The load-time budget ran out after one size (a loaded machine): the others are planned
    # once every EXPLORE_EVERY plans, smallest first, until a step has measured them.
    costs = StepCosts({1: 10.0}, sizes=[1, 2, 3, 4, 8])
    plans = [costs.plan(1, [_steady(0.9)]) for _ in range(StepCosts.EXPLORE_EVERY)]
    assert plans[:-1] == [[0]] * (StepCosts.EXPLORE_EVERY - 1) and plans[-1] == [1]
    costs.observe(2, 12.0)  # that step: two rows
    plans = [costs.plan(1, [_steady(0.9)]) for _ in range(StepCosts.EXPLORE_EVERY)]
    assert plans[-1] == [2]  # 3 rows next; 2 rows are planned on their merit meanwhile
    assert plans[:-1] == [[1]] * (StepCosts.EXPLORE_EVERY - 1)
    # Out of reach (no guesses, or guesses mostly wrong) nothing is tried; without learning,
    # nothing ever.
    unsure = StepCosts({1: 10.0}, sizes=[1, 2])
    for _ in range(StepCosts.EXPLORE_EVERY):
        assert costs.plan(1, [[]]) == [0]
        assert unsure.plan(1, [_steady(0.3)]) == [0]
    frozen = StepCosts({1: 10.0}, sizes=[1, 2], learn=False)
    assert all(frozen.plan(1, [_steady(0.9)]) == [0] for _ in range(100))


def test_a_load_the_steps_agree_with_is_trusted() -> None:
    # Measured on an idle machine: the first real one-row step agrees, so the sizes the load
    # measured are not tried for their own sake; the one it missed (8 rows) still is.
    costs = StepCosts({1: 10.0, 2: 500.0, 4: 60.0}, sizes=[1, 2, 4, 8])
    costs.observe(1, 11.0)
    plans = [costs.plan(1, [_steady(0.95)]) for _ in range(2 * StepCosts.EXPLORE_EVERY)]
    assert [p for p in plans if p != [0]] == [[7], [7]]  # 8 rows, each EXPLORE_EVERY plans
    # Off by more than TRUST_LOAD allows: the measured sizes are tried as well, smallest first.
    off = StepCosts({1: 10.0, 2: 500.0, 4: 600.0}, sizes=[1, 2, 4, 8])
    off.observe(1, 30.0)
    plans = [off.plan(1, [_steady(0.95)]) for _ in range(StepCosts.EXPLORE_EVERY)]
    assert plans[-1] == [1]


def test_a_size_the_load_measured_too_dear_is_tried_again() -> None:
    # Measured while another process held the cores: two rows looked 50 times one.
    costs = StepCosts({1: 10.0, 2: 500.0}, sizes=[1, 2])
    plans = [costs.plan(1, [_steady(0.9)]) for _ in range(StepCosts.EXPLORE_EVERY)]
    assert plans[-1] == [1] and plans[:-1] == [[0]] * (StepCosts.EXPLORE_EVERY - 1)
    costs.observe(2, 12.0)  # what that step really cost
    assert costs.plan(1, [_steady(0.9)]) == [1]  # drafts pay after all


def test_propose_hands_every_guess_list_to_its_record() -> None:
    lookups = [Lookup([1, 2, 3, 4, 5, 1, 2]), Lookup([5, 6])]
    records = [Acceptance(4, prior=0.99), Acceptance(4, prior=0.99)]
    sequences = list(zip(lookups, records, [3, 3], strict=True))
    # Without costs (a step with prefill): guesses, none checked.
    assert propose(None, sequences) == [([3, 4, 5, 1], 0), ([], 0)]
    records[0].score(3)
    assert records[0].rates[0] > 0.99  # the guess was scored
    flat = StepCosts(dict.fromkeys(range(1, 17), 10.0))
    # One guess more than the room, for the token the step samples anyway; three checked.
    assert propose(flat, sequences) == [([3, 4, 5, 1], 3), ([], 0)]


def test_row_counts_measured() -> None:
    assert row_counts(4, 16) == [1, 2, 3, 4, 8, 12, 16]
    assert row_counts(6, 16) == [1, 2, 3, 4, 5, 6, 8, 12, 16]
    assert row_counts(4, 4) == [1, 2, 3, 4]
    assert row_counts(1, 2) == [1, 2]


# ---------------------------------------------------------------- on the real model


@pytest.fixture(scope="module")
def model(default_spec: ModelSpec, model_file: Path, models_dir: Path) -> Iterator[LoadedModel]:
    m = load_model(default_spec, model_file, models_dir)
    yield m
    m.close()


@pytest.fixture(scope="module")
def plain(default_spec: ModelSpec, model_file: Path, models_dir: Path) -> Iterator[LoadedModel]:
    m = load_model(default_spec, model_file, models_dir, draft_max=0)
    yield m
    m.close()


@pytest.fixture(scope="module")
def eager(default_spec: ModelSpec, model_file: Path, models_dir: Path) -> Iterator[LoadedModel]:
    """Drafting on every guess, whatever this machine's step costs: as on a GPU, where extra
    rows cost next to nothing. (Whether drafts pay on a given CPU is the plan's business,
    tested above; these tests check what drafting does.)"""
    m = load_model(default_spec, model_file, models_dir)
    asyncio.run(run_prompt(m, "Hello", max_tokens=1))  # the costs are measured first: replace them
    m.scheduler._costs = StepCosts(dict.fromkeys(range(1, 17), 10.0), learn=False)
    yield m
    m.close()


def test_the_step_costs_were_measured_at_load(model: LoadedModel) -> None:
    asyncio.run(run_prompt(model, "Hello", max_tokens=1))  # served once they are measured
    costs = model.scheduler._costs.ms  # what the plan reads
    wanted = row_counts(4, 16)
    # Smallest first, until the time budget ran out (all of them on an idle machine; a busy
    # one may stop early, and what was not measured is never planned).
    assert costs and sorted(costs) == wanted[: len(costs)]
    assert all(ms > 0 for ms in costs.values())


def test_the_engine_learns_step_costs_from_its_steps(
    default_spec: ModelSpec, model_file: Path, models_dir: Path
) -> None:
    m = load_model(default_spec, model_file, models_dir)
    try:
        asyncio.run(run_prompt(m, "Hello", max_tokens=1))  # the load's measurement is done
        # As if the load's budget had run out at once: nothing known, every size wanted.
        m.scheduler._costs = costs = StepCosts({}, sizes=row_counts(4, 16))
        asyncio.run(run_prompt(m, "red, green, blue, yellow, " * 12 + "red,", max_tokens=96))
    finally:
        m.close()
    assert costs.ms[1] > 0  # one-row steps ran, so their cost is known now
    assert len(costs.ms) > 1  # and with guesses mostly right, a bigger size was tried


def test_step_costs_stop_at_their_time_budget(model: LoadedModel) -> None:
    batch = Batch(16)
    try:  # spent before the first step: nothing measured, so nothing will be planned
        spent = measure_step_costs(model.scheduler._ctx, batch, [1, 2, 4], 0, 2, budget_s=0.0)
    finally:
        batch.close()
    assert spent.ms == {} and spent.plan(1, [[0.99] * 15]) == [0]


def test_drafts_are_checked_and_change_nothing_on_text_the_model_copies(
    eager: LoadedModel, plain: LoadedModel
) -> None:
    text, fin = asyncio.run(run_prompt(eager, REPEATING, max_tokens=32))
    assert fin.timings.draft_n_accepted > 0  # tokens came from drafts
    assert fin.timings.draft_n >= fin.timings.draft_n_accepted
    assert "draft_n" in fin.timings.as_dict()
    without, fin0 = asyncio.run(run_prompt(plain, REPEATING, max_tokens=32))
    assert fin0.timings.draft_n == 0 and "draft_n" not in fin0.timings.as_dict()
    assert text == without
    assert fin.completion_tokens == fin0.completion_tokens == 32


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 13])
def test_max_tokens_is_exact_when_drafts_run_ahead(eager: LoadedModel, max_tokens: int) -> None:
    _, fin = asyncio.run(run_prompt(eager, REPEATING, max_tokens=max_tokens))
    assert fin.finish_reason == "length"
    assert fin.completion_tokens == fin.timings.predicted_n == max_tokens


def test_a_stop_string_inside_accepted_drafts_ends_the_text_there(eager: LoadedModel) -> None:
    full, _ = asyncio.run(run_prompt(eager, REPEATING, max_tokens=32))
    assert " lazy" in full
    text, fin = asyncio.run(run_prompt(eager, REPEATING, max_tokens=32, stops=(" lazy",)))
    assert fin.finish_reason == "stop"
    assert text == full[: full.index(" lazy")]


def test_a_seeded_sample_repeats_with_drafts(eager: LoadedModel) -> None:
    params = SamplingParams(temperature=0.7, seed=1234)
    runs = [
        asyncio.run(run_prompt(eager, REPEATING, max_tokens=40, params=params)) for _ in range(2)
    ]
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].timings.draft_n > 0


def test_rejected_drafts_leave_the_cache(eager: LoadedModel) -> None:
    # Four counting streams: digits are often guessed wrong.
    async def four() -> list[Finished]:
        gens = [
            Generation(
                prompt=eager.llama.tokenize(f"Count: {n}, {n + 1}, {n + 2},", add_special=True),
                params=GREEDY,
                max_tokens=40,
            )
            for n in (101, 257, 413, 569)
        ]
        for gen in gens:
            eager.submit(gen)
        return [fin for _, fin in await asyncio.gather(*(collect(g) for g in gens))]

    finished = asyncio.run(four())
    drafted = sum(f.timings.draft_n for f in finished)
    accepted = sum(f.timings.draft_n_accepted for f in finished)
    assert drafted > accepted > 0  # some were right, some were rejected
    # Each slot's cells are exactly the tokens it says it holds: none of a rejected draft.
    scheduler, ctx = eager.scheduler, eager.scheduler._ctx
    for slot in scheduler._slots:
        if slot.parked is not None:  # those that finished first left the cache: back they come
            assert ctx.seq_restore(slot.seq_id, slot.parked)
            slot.parked = None
        assert llama_cpp.llama_memory_seq_pos_max(ctx.memory, slot.seq_id) == len(slot.cached) - 1


def test_log_probabilities_come_from_each_accepted_tokens_own_row(
    eager: LoadedModel, plain: LoadedModel
) -> None:
    async def run(model: LoadedModel) -> tuple[str, list[TokenLogprob], Finished]:
        gen = Generation(
            prompt=model.llama.tokenize(REPEATING, add_special=True),
            params=GREEDY,
            max_tokens=24,
            logprobs=2,
        )
        model.submit(gen)
        texts: list[str] = []
        entries: list[TokenLogprob] = []
        async for event in gen.events():
            if isinstance(event, Delta):
                texts.append(event.text)
                entries.extend(event.logprobs)
            elif isinstance(event, Finished):
                return "".join(texts), entries, event
        raise AssertionError("no Finished")

    text, entries, finished = asyncio.run(run(eager))
    assert finished.timings.draft_n_accepted > 0  # tokens came out of drafted rows
    assert len(entries) == finished.completion_tokens
    assert b"".join(e.token for e in entries).decode() == text
    for entry in entries:  # greedy: each token is the likeliest of the row it was sampled from
        assert entry.top[0] == (entry.token, entry.logprob)
    without, plain_entries, _ = asyncio.run(run(plain))
    assert without == text
    for a, b in zip(entries, plain_entries, strict=True):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=0.05)
