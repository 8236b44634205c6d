"""The step loop on the real model: generation, limits, stops, cancel, admission, prefix reuse."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.helpers import collect, load_model, run_prompt
from thoxd.catalog.entries import ModelSpec
from thoxd.engine.faults import Faults
from thoxd.engine.llama import route_llama_logs
from thoxd.engine.request import Delta, Finished, Generation
from thoxd.engine.runtime import LoadedModel
from thoxd.engine.sampling import SamplingParams
from thoxd.errors import QueueFull

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model(default_spec: ModelSpec, model_file: Path, models_dir: Path) -> Iterator[LoadedModel]:
    m = load_model(default_spec, model_file, models_dir)
    yield m
    m.close()


def test_generates_until_max_tokens(model: LoadedModel) -> None:
    text, fin = asyncio.run(run_prompt(model, "The capital of France is", max_tokens=12))
    assert text.strip()
    assert fin.finish_reason == "length"
    assert fin.completion_tokens == 12
    assert fin.timings.predicted_n == 12
    assert fin.prompt_tokens == len(
        model.llama.tokenize("The capital of France is", add_special=True)
    )


def test_greedy_is_repeatable_and_prefix_cache_changes_nothing(model: LoadedModel) -> None:
    prompt = "def fibonacci(n):\n    "
    first, _ = asyncio.run(run_prompt(model, prompt, max_tokens=20))
    second, f2 = asyncio.run(run_prompt(model, prompt, max_tokens=20))
    assert first == second
    # The second run found the prompt cached in a slot and prefilled only its last token.
    assert f2.timings.cache_n == f2.prompt_tokens - 1
    assert f2.timings.prompt_n == 1


def test_same_seed_same_text(model: LoadedModel) -> None:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    a, _ = asyncio.run(run_prompt(model, "Once upon a time", params=params, max_tokens=24))
    b, _ = asyncio.run(run_prompt(model, "Once upon a time", params=params, max_tokens=24))
    assert a == b
    others = {
        asyncio.run(
            run_prompt(model, "Once upon a time", max_tokens=24,
                 params=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=s))
        )[0]
        for s in (1, 2, 3)
    }  # fmt: skip
    assert len(others | {a}) > 1, "different seeds should not all give the same text"


def test_stop_string_ends_generation_without_leaking(model: LoadedModel) -> None:
    full, _ = asyncio.run(run_prompt(model, "1, 2, 3, 4, 5,", max_tokens=24))
    stop = full.strip()[2:6] if len(full.strip()) > 6 else full.strip()[-2:]
    cut, fin = asyncio.run(run_prompt(model, "1, 2, 3, 4, 5,", max_tokens=24, stops=(stop,)))
    assert fin.finish_reason == "stop"
    assert stop not in cut
    assert full.startswith(cut)


def test_cancel_frees_the_slot_within_a_step(model: LoadedModel) -> None:
    async def scenario() -> Finished:
        gen = Generation(
            prompt=model.llama.tokenize("Write a long story:", add_special=True),
            params=GREEDY,
            max_tokens=4000,
        )
        model.submit(gen)
        events = gen.events()
        assert isinstance(await anext(events), Delta)
        gen.cancel()
        async for event in events:
            if isinstance(event, Finished):
                return event
        raise AssertionError("no Finished")

    fin = asyncio.run(scenario())
    assert fin.finish_reason == "cancelled"
    assert fin.completion_tokens < 50  # of 4000: it stopped within a step or two
    assert model.stats().running == 0


def test_queue_bound_refuses_with_queue_full(
    default_spec: ModelSpec, model_file: Path, models_dir: Path
) -> None:
    small = load_model(default_spec, model_file, models_dir, slots=1, queue_size=1)

    async def scenario() -> None:
        prompt = small.llama.tokenize("Hello", add_special=True)
        gens = [Generation(prompt=prompt, params=GREEDY, max_tokens=2000) for _ in range(3)]
        small.submit(gens[0])
        await anext(gens[0].events())  # running in the one slot
        small.submit(gens[1])  # waits
        with pytest.raises(QueueFull) as info:
            small.submit(gens[2])
        assert info.value.status == 503
        assert "Retry-After" in info.value.headers
        for gen in gens[:2]:
            gen.cancel()
        # The waiting one leaves the queue as cancelled without ever running.
        finals = [e async for e in gens[1].events() if isinstance(e, Finished)]
        assert finals[0].finish_reason == "cancelled"
        assert finals[0].completion_tokens == 0

    try:
        asyncio.run(scenario())
    finally:
        small.close()


def test_a_special_token_stop_string_stops_on_the_token(model: LoadedModel) -> None:
    """Control tokens render as no text, so a turn marker ("<start_of_turn>", "<|im_start|>")
    must stop by token id."""
    marker = model.spec.stop[-1]  # the catalog's stop strings end with the model's turn opener
    special = model.stop_tokens([marker, "plain text"])
    assert special == {model.llama.tokenize(marker, add_special=False)[0]}

    # The mechanism: a stop token ends the generation before it is emitted or counted.
    first_piece, _ = asyncio.run(run_prompt(model, "The capital of France is", max_tokens=1))
    (first_token,) = model.llama.tokenize(first_piece, add_special=False)

    async def scenario() -> tuple[str, Finished]:
        prompt = model.llama.tokenize("The capital of France is", add_special=True)
        gen = Generation(
            prompt=prompt, params=GREEDY, max_tokens=8, stop_tokens=frozenset({first_token})
        )
        model.submit(gen)
        events = [e async for e in gen.events()]
        final = events[-1]
        assert isinstance(final, Finished)
        return "".join(e.text for e in events if isinstance(e, Delta)), final

    text, final = asyncio.run(scenario())
    assert (text, final.finish_reason, final.completion_tokens) == ("", "stop", 0)


def test_log_router_is_one_per_process() -> None:
    assert route_llama_logs() is route_llama_logs()


def _prompt(model: LoadedModel, seed: int, words: int) -> list[int]:
    text = " ".join(f"w{seed}x{i}" for i in range(words))
    return model.llama.tokenize(text, add_special=True)


def test_idle_prefixes_are_parked_while_others_run_and_still_reused(
    default_spec: ModelSpec, model_file: Path, models_dir: Path
) -> None:
    model = load_model(
        default_spec.model_copy(update={"n_ctx": 1024}), model_file, models_dir, slots=2
    )

    async def scenario() -> None:
        prefix = _prompt(model, 1, 100)
        alone = Generation(prompt=[*prefix, 1000], params=GREEDY, max_tokens=2)
        model.submit(alone)
        await collect(alone)
        assert model.stats().parked == 0  # nothing runs: no step, its cells stay in place
        busy = Generation(prompt=_prompt(model, 2, 20), params=GREEDY, max_tokens=200)
        model.submit(busy)  # into the empty slot: a shared BOS does not claim the cached one
        async for _ in busy.events():  # one token out: steps are running
            break
        assert model.stats().parked == 1  # the idle prefix left the cache for host memory
        again = Generation(prompt=[*prefix, 2000], params=GREEDY, max_tokens=2)
        model.submit(again)
        _, finished = await collect(again)
        assert finished.timings.cache_n == len(prefix)  # copied back, then reused
        busy.cancel()
        await collect(busy)

    try:
        asyncio.run(scenario())
    finally:
        model.close()


def test_parked_prefixes_are_bounded_by_one_context(
    default_spec: ModelSpec, model_file: Path, models_dir: Path
) -> None:
    small = load_model(default_spec.model_copy(update={"n_ctx": 512}), model_file, models_dir)

    async def scenario() -> None:
        prefixes = [_prompt(small, k, 100) for k in range(3)]  # ~300 tokens each
        first = [Generation(prompt=p, params=GREEDY, max_tokens=1) for p in prefixes]
        for gen in first:  # one after another: the last one is the most recently used
            small.submit(gen)
            await collect(gen)
        busy = Generation(prompt=_prompt(small, 9, 5), params=GREEDY, max_tokens=100)
        small.submit(busy)
        async for _ in busy.events():
            break
        # 3 x ~300 tokens > 512: only the most recent prefix stays parked.
        assert small.stats().parked == 1
        hits = []
        for p in (prefixes[2], prefixes[0]):
            gen = Generation(prompt=[*p, 1000], params=GREEDY, max_tokens=1)
            small.submit(gen)
            hits.append((await collect(gen))[1].timings.cache_n)
        assert hits == [len(prefixes[2]), 0]
        busy.cancel()
        await collect(busy)

    try:
        asyncio.run(scenario())
    finally:
        small.close()


class StepSizes(Faults):
    """Records how many tokens each step decodes (the fault seam, faulting nothing)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def decode(self, model_id: str, n_tokens: int) -> int | None:
        self.sizes.append(n_tokens)
        return None


def test_a_cold_prompt_prefills_in_one_step_and_beside_a_stream_in_chunks(
    default_spec: ModelSpec, model_file: Path, models_dir: Path
) -> None:
    steps = StepSizes()
    m = load_model(
        default_spec,
        model_file,
        models_dir,
        batch_size=256,
        draft_max=0,
        faults=steps,
        cold_batch=2048,  # the default with GPU offload; on a CPU batch_size is the cold step
    )
    long_prompt = " ".join(f"word{i % 50}" for i in range(700))  # about 1400 tokens

    async def scenario() -> None:
        # Alone on the model: the whole prompt in one step, as llama-server prefills it.
        alone = Generation(
            prompt=m.llama.tokenize(long_prompt, add_special=True),
            params=GREEDY,
            max_tokens=1,
        )
        assert len(alone.prompt) > 1000
        m.submit(alone)
        await collect(alone)
        # (its last token then decodes on its own, as a generated token: reproducible output)
        assert steps.sizes[:2] == [len(alone.prompt) - 1, 1]
        # Beside a stream: chunks of batch_size, so the stream keeps a token every step.
        steps.sizes.clear()
        stream = Generation(
            prompt=m.llama.tokenize("1, 2, 3, 4,", add_special=True),
            params=GREEDY,
            max_tokens=200,
        )
        m.submit(stream)
        async for event in stream.events():
            if isinstance(event, Delta):
                break
        other = Generation(
            prompt=m.llama.tokenize("x " + long_prompt, add_special=True),
            params=GREEDY,
            max_tokens=1,
        )
        m.submit(other)
        await collect(other)
        stream.cancel()
        await collect(stream)
        assert max(steps.sizes) <= 256
        assert sum(1 for n in steps.sizes if n > 200) >= 4  # the prompt came in chunks

    try:
        asyncio.run(scenario())
    finally:
        m.close()


def test_a_parked_system_prompt_serves_another_question_on_a_sliding_window_model(
    gemma_spec: ModelSpec, gemma_file: Path, models_dir: Path
) -> None:
    # Gemma 3's window layers: a parked slot's saved state keeps their last 512 cells only, so
    # a prompt sharing the system prompt but not the question could not use the whole save.
    m = load_model(gemma_spec, gemma_file, models_dir, draft_max=0)
    system = "You are a careful assistant. " + " ".join(
        f"Rule {i}: keep answers short and name the {w}." for i, w in enumerate(["file"] * 60)
    )
    n_system = len(m.llama.tokenize(system, add_special=True))
    assert n_system > 600  # longer than the window

    def gen(text: str, max_tokens: int) -> Generation:
        tokens = m.llama.tokenize(text, add_special=True)
        return Generation(prompt=tokens, params=GREEDY, max_tokens=max_tokens)

    async def scenario() -> int:
        # A stream runs throughout, so idle slots are parked before each step.
        other = gen("Count: 1, 2, 3, 4, 5,", 400)
        m.submit(other)
        first = [gen(f"{system}\nQuestion 11: why?", 2), gen(f"{system}\nQuestion 12: how?", 2)]
        m.submit(*first)
        for g in first:
            await collect(g)
        third = gen(f"{system}\nQuestion 27: when?", 2)
        m.submit(third)
        _, finished = await collect(third)
        other.cancel()
        await collect(other)
        return finished.timings.cache_n

    try:
        cache_n = asyncio.run(scenario())
    finally:
        m.close()
    assert n_system - 40 <= cache_n < n_system  # the system prompt, not prefilled again


def test_a_short_prompt_does_not_wait_for_a_long_prompts_whole_prefill(
    default_spec: ModelSpec, model_file: Path, models_dir: Path
) -> None:
    steps = StepSizes()
    m = load_model(default_spec, model_file, models_dir, batch_size=64, draft_max=0, faults=steps)
    long_prompt = " ".join(f"item{i % 40}" for i in range(400))  # ~800 tokens: 12+ chunks

    async def scenario() -> tuple[int, int, int]:
        long = Generation(
            prompt=m.llama.tokenize(long_prompt, add_special=True), params=GREEDY, max_tokens=1
        )
        m.submit(long)
        for _ in range(2000):  # until it is two chunks in (bounded; nothing here is timed)
            if len(steps.sizes) >= 2:
                break
            await asyncio.sleep(0.002)
        short = Generation(
            prompt=m.llama.tokenize("Hi", add_special=True), params=GREEDY, max_tokens=1
        )
        m.submit(short)
        submitted = len(steps.sizes)
        await collect(short)
        short_done = len(steps.sizes)
        await collect(long)
        return submitted, short_done, len(steps.sizes)

    try:
        submitted, short_done, long_done = asyncio.run(scenario())
    finally:
        m.close()
    assert long_done - submitted > 8  # the long prompt was still prefilling when "Hi" came
    # "Hi" joined the next steps (the one running as it came, and one more), not the prefill's end.
    assert short_done - submitted <= 3
