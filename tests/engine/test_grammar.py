"""thoxd/engine/grammar.py and the grammar in sampling, on the real model: the one-token check
agrees with the full mask, constrained output matches, and a grammar goes with its slot."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.engine.helpers import collect, counting, load_model
from thoxd.catalog.entries import ModelSpec
from thoxd.engine.grammar import Candidates, Grammar, GrammarInvalid
from thoxd.engine.model import LoadedModel
from thoxd.engine.request import Generation
from thoxd.engine.sampling import GrammarSpec, Sampler, SamplingParams
from thoxd.engine.schema import json_grammar

HOT = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture(scope="module")
def model(default_spec: ModelSpec, model_file: Path, models_dir: Path) -> Iterator[LoadedModel]:
    m = load_model(default_spec, model_file, models_dir, slots=2, draft_max=0)
    yield m
    m.close()


def test_one_token_checks_agree_with_the_full_mask(model: LoadedModel) -> None:
    grammar = Grammar(model.llama, json_grammar({"type": "object"}))
    try:
        logits = np.zeros(model.llama.n_vocab, dtype=np.float32)
        candidates = Candidates(logits)
        grammar.mask(candidates)
        allowed = np.isfinite(candidates.logits())
        assert 0 < allowed.sum() < model.llama.n_vocab
        sample = np.random.default_rng(0).choice(model.llama.n_vocab, 300, replace=False)
        opening = np.flatnonzero(allowed)[:50]
        probe = [*opening, *sample]
        assert [grammar.allows(int(t)) for t in probe] == [bool(allowed[t]) for t in probe]
        assert all(model.llama.piece(int(t)).startswith(b"{") for t in opening)
    finally:
        grammar.close()


def test_a_grammar_llama_cpp_cannot_parse_is_refused(model: LoadedModel) -> None:
    with pytest.raises(GrammarInvalid):
        Grammar(model.llama, 'root ::= "unterminated')


def test_hot_sampling_under_a_grammar_stays_in_it(model: LoadedModel) -> None:
    """Temperature 1.5 over the whole vocabulary: most first samples are rejected and sampled
    again under the mask; the output still parses."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
    }
    spec = GrammarSpec(json_grammar(schema))

    async def one(seed: int) -> tuple[str, str]:
        params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        gen = Generation(
            prompt=model.llama.tokenize("Data:", add_special=True),
            params=params,
            max_tokens=80,
            grammar=spec,
        )
        model.submit(gen)
        text, finished = await collect(gen)
        return text, finished.finish_reason

    async def both() -> list[tuple[str, str]]:
        return list(await asyncio.gather(one(1), one(2)))

    for text, reason in asyncio.run(both()):
        if reason == "stop":
            document = json.loads(text)
            assert isinstance(document["n"], int) and isinstance(document["ok"], bool)


def test_a_cancelled_constrained_request_frees_its_grammar(model: LoadedModel) -> None:
    async def scenario() -> None:
        gen = Generation(
            prompt=model.llama.tokenize("List:", add_special=True),
            params=HOT,
            max_tokens=4000,
            grammar=GrammarSpec(json_grammar({"type": "array", "items": {"type": "string"}})),
        )
        model.submit(gen)
        events = gen.events()
        await anext(events)  # it runs: its sampler holds the grammar
        [running] = [s.run for s in model.scheduler._slots if s.run is not None]
        sampler = running.sampler
        assert sampler._grammar is not None
        gen.cancel()
        async for _ in events:
            pass
        assert sampler._grammar is None  # freed with the slot
        after = counting(model, 10, max_tokens=4)
        model.submit(after)
        _, finished = await collect(after)  # and the slot serves
        assert finished.completion_tokens == 4

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=0, min_p=0.05)],
    ids=["greedy", "min-p"],
)
def test_the_shortlist_decides_as_the_whole_vocabulary_would(
    model: LoadedModel, params: SamplingParams
) -> None:
    """A rejected sample is drawn again from the likeliest tokens only when they decide it: the
    same token for greedy, the same survivors of min-p, as masking every token would give."""
    spec = GrammarSpec(json_grammar({"type": "object"}))
    sampler = Sampler(params, model=model.llama, grammar=spec)
    grammar = Grammar(model.llama, spec.gbnf)
    rng = np.random.default_rng(7)
    decided = 0
    opening = Candidates(np.zeros(model.llama.n_vocab, dtype=np.float32))
    grammar.mask(opening)
    allowed = np.flatnonzero(np.isfinite(opening.logits()))  # what may start an object
    try:
        for lift in np.linspace(0.0, 16.0, 30):
            logits = (rng.standard_normal(model.llama.n_vocab) * 4).astype(np.float32)
            logits[allowed] += lift  # from far below the likeliest token to near it
            short = sampler._shortlist(logits.copy())
            full = Candidates(logits.copy())
            grammar.mask(full)
            if short is None:
                continue
            decided += 1
            if params.temperature == 0.0:
                assert short.best() == full.best()
            else:
                every = full.logits()
                survivors = set(np.flatnonzero(every >= every.max() + np.log(params.min_p)))
                listed = short.logits()
                assert set(np.flatnonzero(listed >= listed.max() + np.log(params.min_p))) == (
                    survivors
                )
    finally:
        sampler.close()
        grammar.close()
    assert decided > 0  # the shortlist was used at all
