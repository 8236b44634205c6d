"""Sampling against llama.cpp's own samplers: the numpy penalties and greedy pick must choose what
llama.cpp's penalties and greedy samplers choose, on synthetic and on real logits."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from thoxd.engine.llama import Batch, ContextConfig, LlamaContext, LlamaModel, route_llama_logs
from thoxd.engine.sampling import Penalties, Sampler, SamplingParams, _top_candidates

N_VOCAB = 3000


def _llama_apply(sampler: Any, logits: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], int]:
    """Run a llama.cpp sampler over `logits`; the logits it leaves and the token it selected."""
    data = (llama_cpp.llama_token_data * len(logits))()
    for i, logit in enumerate(logits.tolist()):
        data[i].id, data[i].logit, data[i].p = i, logit, 0.0
    arr = llama_cpp.llama_token_data_array(data=data, size=len(logits), selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
    out = np.empty(len(logits), dtype=np.float32)
    for k in range(arr.size):
        out[data[k].id] = data[k].logit
    return out, int(arr.selected)


@pytest.mark.parametrize(
    ("repeat", "frequency", "presence"),
    [(1.3, 0.0, 0.0), (0.8, 0.0, 0.0), (1.1, 0.4, 0.25), (1.0, 0.0, 0.6)],
)
def test_penalties_change_logits_as_llama_cpp_does(
    repeat: float, frequency: float, presence: float
) -> None:
    params = SamplingParams(
        repeat_penalty=repeat,
        frequency_penalty=frequency,
        presence_penalty=presence,
        penalty_last_n=8,
    )
    ours = Penalties(params)
    theirs = llama_cpp.llama_sampler_init_penalties(N_VOCAB, 8, repeat, frequency, presence)
    rng = np.random.default_rng(5)
    changed = 0
    try:
        # 30 tokens from a small set: repeats, counts above 1, and a window that drops tokens.
        for token in rng.integers(0, 12, size=30).tolist():
            logits = rng.normal(0.0, 4.0, size=N_VOCAB).astype(np.float32)
            expected, _ = _llama_apply(theirs, logits)
            mine = logits.copy()
            ours.apply(mine)
            changed += int(not np.array_equal(mine, logits))
            if frequency or presence:  # the C side may fuse a multiply-add: allow one rounding
                np.testing.assert_allclose(mine, expected, rtol=1e-6, atol=1e-6)
            else:
                np.testing.assert_array_equal(mine, expected)
            ours.accept(token)
            llama_cpp.llama_sampler_accept(theirs, token)
    finally:
        llama_cpp.llama_sampler_free(theirs)
    assert changed >= 29  # every step after the first had tokens to penalise


def test_neutral_or_windowless_penalties_are_skipped() -> None:
    assert not Penalties.needed(SamplingParams())
    assert not Penalties.needed(SamplingParams(repeat_penalty=1.5, penalty_last_n=0))
    assert not Penalties.needed(SamplingParams(repeat_penalty=1.5, penalty_last_n=-1))
    assert Penalties.needed(SamplingParams(presence_penalty=0.1))


def test_greedy_takes_the_first_of_equal_maxima_like_llama_cpp() -> None:
    logits = np.zeros(N_VOCAB, dtype=np.float32)
    logits[[17, 900, 2500]] = 3.5
    greedy = llama_cpp.llama_sampler_init_greedy()
    try:
        _, selected = _llama_apply(greedy, logits)
    finally:
        llama_cpp.llama_sampler_free(greedy)
    assert selected == 17 == int(logits.argmax())


@pytest.fixture(scope="module")
def context(model_file: Path) -> Iterator[LlamaContext]:
    route_llama_logs()
    model = LlamaModel(model_file)
    ctx = LlamaContext(model, ContextConfig(n_ctx=512, n_seq_max=1, n_batch=64, n_threads=2))
    yield ctx
    ctx.close()
    model.close()


def _decode_steps(ctx: LlamaContext, prompt: str, steps: int, pick: Any) -> list[int]:
    """Greedy-style loop over the real model: `pick(ctx, index)` chooses each next token."""
    ctx.clear()
    tokens = ctx.model.tokenize(prompt, add_special=True)
    batch = Batch(64)
    try:
        batch.add_sequence(tokens[:-1], 0, 0)
        index = batch.add(tokens[-1], len(tokens) - 1, 0, logits=True)
        out: list[int] = []
        for _ in range(steps):
            assert ctx.decode(batch) == 0
            token = pick(ctx, index)
            out.append(token)
            batch.clear()
            index = batch.add(token, len(tokens) + len(out) - 1, 0, logits=True)
        return out
    finally:
        batch.close()


def _llama_chain(*samplers: Any) -> Any:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for s in samplers:
        llama_cpp.llama_sampler_chain_add(chain, s)
    return chain


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_real_logits_pick_what_llama_cpp_picks(context: LlamaContext, temperature: float) -> None:
    """Greedy (argmax) and the chain path (top-k 1 after our penalties) against llama.cpp's
    penalties sampler, on text that repeats itself unless penalised."""
    prompt = "one two one two one two one two"
    params = SamplingParams(temperature=temperature, top_k=1, repeat_penalty=1.5, seed=3)
    n_vocab = context.model.n_vocab
    reference = _llama_chain(
        llama_cpp.llama_sampler_init_penalties(n_vocab, 64, 1.5, 0.0, 0.0),
        llama_cpp.llama_sampler_init_greedy(),
    )
    try:
        expected = _decode_steps(
            context,
            prompt,
            24,
            lambda c, i: int(llama_cpp.llama_sampler_sample(reference, c.ptr, i)),
        )
    finally:
        llama_cpp.llama_sampler_free(reference)
    sampler = Sampler(params)
    try:
        got = _decode_steps(context, prompt, 24, sampler.sample)
    finally:
        sampler.close()
    assert got == expected
    unpenalised = Sampler(SamplingParams(temperature=0.0))
    try:
        plain = _decode_steps(context, prompt, 24, unpenalised.sample)
    finally:
        unpenalised.close()
    assert plain != expected  # the penalty changed the text: the comparison above means something


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_matches_llama_cpps_logit_bias_sampler(
    context: LlamaContext, temperature: float
) -> None:
    """A bias of -100 bans the token the model would pick; other biases move logits as
    llama.cpp's logit-bias sampler (the head of its chain) moves them."""
    prompt = "one two one two one two one two"
    [plain] = _decode_steps(context, prompt, 1, Sampler(SamplingParams(temperature=0.0)).sample)
    bias = ((plain, -100.0), (7, 2.5), (11, -3.0))
    params = SamplingParams(temperature=temperature, top_k=1, seed=3, logit_bias=bias)
    n_vocab = context.model.n_vocab
    items = (llama_cpp.llama_logit_bias * len(bias))()
    for i, (token, value) in enumerate(bias):
        items[i].token, items[i].bias = token, -np.inf if value <= -100 else value
    reference = _llama_chain(
        llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(bias), items),
        llama_cpp.llama_sampler_init_greedy(),
    )
    try:
        expected = _decode_steps(
            context,
            prompt,
            8,
            lambda c, i: int(llama_cpp.llama_sampler_sample(reference, c.ptr, i)),
        )
    finally:
        llama_cpp.llama_sampler_free(reference)
    sampler = Sampler(params)
    try:
        got = _decode_steps(context, prompt, 8, sampler.sample)
    finally:
        sampler.close()
    assert got == expected
    assert plain not in got  # banned at every step


def test_top_candidates_hold_the_top_k_or_give_up() -> None:
    rng = np.random.default_rng(11)
    logits = rng.normal(0.0, 3.0, size=262_144).astype(np.float32)
    for k in (1, 40, 100):
        ids = _top_candidates(logits, k)
        assert ids is not None
        assert len(ids) < 4096  # a shortlist, not the vocabulary
        top = np.argpartition(logits, -k)[-k:]
        assert set(top.tolist()) <= set(ids.tolist())
    assert _top_candidates(logits[:N_VOCAB], 40) is None  # small vocabulary: the whole chain
    assert _top_candidates(logits, 20_000) is None  # large k: the whole chain
    flat = np.zeros(262_144, dtype=np.float32)
    flat[:10] = 1.0  # ten tokens above a cut the sample cannot see: no shortlist of 40
    ids = _top_candidates(flat, 40)
    assert ids is None or len(ids) >= 40


def test_seeded_draws_match_llama_cpps_chain_over_the_whole_vocabulary(
    context: LlamaContext,
) -> None:
    """The shortlist before the chain changes nothing: the same seeded chain sampled by
    llama.cpp over all 262 144 logits picks the same tokens."""
    prompt = "Once upon a time, in a small village by the sea,"
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.05, seed=7)
    reference = _llama_chain(
        llama_cpp.llama_sampler_init_top_k(40),
        llama_cpp.llama_sampler_init_top_p(0.95, 1),
        llama_cpp.llama_sampler_init_min_p(0.05, 1),
        llama_cpp.llama_sampler_init_temp(1.0),
        llama_cpp.llama_sampler_init_dist(7),
    )
    try:
        expected = _decode_steps(
            context,
            prompt,
            40,
            lambda c, i: int(llama_cpp.llama_sampler_sample(reference, c.ptr, i)),
        )
    finally:
        llama_cpp.llama_sampler_free(reference)
    sampler = Sampler(params)
    try:
        got = _decode_steps(context, prompt, 40, sampler.sample)
    finally:
        sampler.close()
    assert got == expected
    greedy = Sampler(SamplingParams(temperature=0.0))
    try:
        assert _decode_steps(context, prompt, 40, greedy.sample) != got  # a real draw
    finally:
        greedy.close()
