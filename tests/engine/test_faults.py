"""Failures injected through the engine's fault seam (thoxd/engine/faults.py), on the real model:
a failing llama_decode, a raising step, a model that fails for good, a load that throws, and a
decode that never returns while the model is being freed. Also the bounds that kept bad settings
and bursts of requests from corrupting memory or refusing work on an idle model."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GEMMA
from tests.engine.helpers import collect, counting, load_model
from thoxd.catalog.entries import Catalog, ModelSpec
from thoxd.engine.faults import Faults
from thoxd.engine.llama import Batch
from thoxd.engine.model import LoadedModel
from thoxd.engine.request import Generation
from thoxd.engine.runtime import Engine, EngineConfig
from thoxd.engine.scheduler import MAX_FAILURES
from thoxd.errors import EngineFailure, QueueFull


class DecodeFaults(Faults):
    """The generation decodes numbered in `fail` (1-based, counted from `arm()`) return -1, or
    raise from the step instead when `raising`."""

    def __init__(self, fail: set[int], raising: bool = False) -> None:
        self.fail = fail
        self.raising = raising
        self.calls = 0
        self.armed = False

    def arm(self) -> None:
        self.calls, self.armed = 0, True

    def decode(self, model_id: str, n_tokens: int) -> int | None:
        if not self.armed:
            return None
        self.calls += 1
        if self.calls in self.fail:
            if self.raising:
                raise RuntimeError("injected: no logits")
            return -1
        return None


@pytest.fixture
def faults() -> DecodeFaults:
    return DecodeFaults(set())


@pytest.fixture
def model(
    default_spec: ModelSpec, model_file: Path, models_dir: Path, faults: DecodeFaults
) -> Iterator[LoadedModel]:
    m = load_model(
        default_spec, model_file, models_dir, slots=2, batch_size=64, draft_max=0, faults=faults
    )
    yield m
    m.close()


async def _text(model: LoadedModel, start: int) -> str:
    gen = counting(model, start)
    model.submit(gen)
    return (await collect(gen))[0]


@pytest.mark.parametrize("raising", [False, True], ids=["decode returns -1", "step raises"])
def test_a_failed_step_fails_its_requests_and_the_model_serves_on(
    model: LoadedModel, faults: DecodeFaults, raising: bool
) -> None:
    async def scenario() -> None:
        before = await _text(model, 40)
        faults.fail, faults.raising = {5}, raising
        faults.arm()
        a, b = counting(model, 10, max_tokens=30), counting(model, 20, max_tokens=30)
        model.submit(a)
        model.submit(b)
        for gen in (a, b):  # both were in the step that failed
            with pytest.raises(EngineFailure) as failed:
                await collect(gen)
            assert failed.value.code == "engine_error"
        assert model.failed is None
        # The context was made again: the same greedy text as before the failure.
        assert await _text(model, 40) == before
        assert not model.busy

    asyncio.run(scenario())


def test_failures_in_a_row_give_the_model_up_with_the_reason(
    model: LoadedModel, faults: DecodeFaults
) -> None:
    async def scenario() -> None:
        faults.fail = set(range(1, 100))
        faults.arm()
        for _ in range(MAX_FAILURES - 1):
            with pytest.raises(EngineFailure):
                await _text(model, 10)
            assert model.failed is None
        last, waiting = counting(model, 10), counting(model, 20)
        model.submit(last)
        with pytest.raises(EngineFailure):
            await collect(last)
        assert model.failed == f"{MAX_FAILURES} steps in a row failed"
        with pytest.raises(EngineFailure) as refused:
            model.submit(waiting)
        assert model.failed in refused.value.message

    asyncio.run(scenario())


def test_a_decode_that_never_returns_is_never_freed_under_it(
    default_spec: ModelSpec, model_file: Path, models_dir: Path
) -> None:
    reached, release = threading.Event(), threading.Event()

    class Hang(Faults):
        def decode(self, model_id: str, n_tokens: int) -> int | None:
            reached.set()
            release.wait()
            return None

    model = load_model(
        default_spec, model_file, models_dir, faults=Hang(), stop_timeout=0.1, draft_max=0
    )

    async def start() -> Generation:
        gen = counting(model, 10)
        model.submit(gen)
        await asyncio.to_thread(reached.wait)
        return gen

    gen = asyncio.run(start())
    assert model.close() is False  # the thread is still inside "llama_decode"
    assert model.llama.ptr is not None  # so the weights and contexts were not freed
    release.set()
    assert model.scheduler.stop(timeout=60)  # it stops once the decode returns
    assert model.close() is True  # and now it is freed
    assert model.llama.ptr is None
    assert gen.cancelled is False


def test_more_slots_than_the_batch_holds(
    default_spec: ModelSpec, model_file: Path, models_dir: Path
) -> None:
    """Six sequences over a 4-token batch: they take turns, and each gets its own text (the
    rows never pass the batch's end: that wrote past llama_batch's arrays)."""
    model = load_model(default_spec, model_file, models_dir, slots=6, batch_size=4)

    async def scenario() -> None:
        alone = await _text(model, 100)
        gens = [counting(model, 100 + 10 * i) for i in range(6)]
        for gen in gens:
            model.submit(gen)
        results = await asyncio.gather(*(collect(g) for g in gens))
        assert results[0][0] == alone
        for text, finished in results:
            assert finished.finish_reason == "length"
            assert finished.completion_tokens == 12
            assert text

    try:
        asyncio.run(scenario())
    finally:
        model.close()


def test_a_batch_refuses_a_token_past_its_end() -> None:
    batch = Batch(2)
    try:
        batch.add(1, 0, 0, logits=False)
        batch.add(2, 1, 0, logits=True)
        with pytest.raises(IndexError):
            batch.add(3, 2, 0, logits=True)
        assert batch.n_tokens == 2
    finally:
        batch.close()


# -- the queue: requests, not prompts; cancelled ones stop counting at once ----------------------


class Gate(Faults):
    """Holds the engine thread at the start of its next step once `close()` was called."""

    def __init__(self) -> None:
        self.closed = False
        self.held = threading.Event()
        self.opened = threading.Event()

    def close(self) -> None:
        self.opened.clear()
        self.closed = True

    def open(self) -> None:
        self.closed = False
        self.opened.set()

    def step(self, model_id: str) -> None:
        if self.closed:
            self.held.set()
            self.opened.wait()


def test_a_list_of_prompts_is_one_request(
    default_spec: ModelSpec, model_file: Path, models_dir: Path
) -> None:
    model = load_model(default_spec, model_file, models_dir, slots=1, queue_size=1)

    async def scenario() -> None:
        gens = [counting(model, 10 * i, max_tokens=4) for i in range(1, 6)]
        model.submit(*gens)  # five prompts: more than the slot and the queue, yet one request
        second = counting(model, 100, max_tokens=4)
        model.submit(second)  # waits behind it: the queue holds one request
        with pytest.raises(QueueFull):
            model.submit(counting(model, 200))
        results = await asyncio.gather(*(collect(g) for g in [*gens, second]))
        assert [f.completion_tokens for _, f in results] == [4] * 6

    try:
        asyncio.run(scenario())
    finally:
        model.close()


def test_a_cancelled_request_stops_counting_against_the_queue_at_once(
    default_spec: ModelSpec, model_file: Path, models_dir: Path
) -> None:
    gate = Gate()
    model = load_model(default_spec, model_file, models_dir, slots=1, queue_size=1, faults=gate)

    async def scenario() -> None:
        running = counting(model, 10, max_tokens=40)
        model.submit(running)
        gate.close()
        await asyncio.to_thread(gate.held.wait)  # the engine thread cannot tidy the queue now
        for _ in range(5):  # a cancel storm: each cancelled request's place is free at once
            waiting = counting(model, 20)
            model.submit(waiting)
            waiting.cancel()
        last = counting(model, 30, max_tokens=4)
        model.submit(last)
        with pytest.raises(QueueFull):
            model.submit(counting(model, 40))
        gate.open()
        running.cancel()
        _, finished = await collect(last)
        assert finished.completion_tokens == 4
        _, first = await collect(running)
        assert first.finish_reason == "cancelled"

    try:
        asyncio.run(scenario())
    finally:
        gate.open()
        model.close()


# -- the Engine: failed loads and failed models ------------------------------------------------


class LoadFaults(Faults):
    def __init__(self) -> None:
        self.refuse: set[str] = set()

    def load(self, model_id: str) -> None:
        if model_id in self.refuse:
            raise OSError(errno.ENOSPC, "No space left on device", "/var/lib/thoxd/secret.sha256")


def _spec(model_id: str) -> ModelSpec:
    return ModelSpec.model_validate(
        {"id": model_id, "path": GEMMA, "n_ctx": 256, "capabilities": ["completion"]}
    )


def test_a_load_that_throws_leaves_the_model_in_error_and_the_others_serving(shelf: Path) -> None:
    faults = LoadFaults()
    config = EngineConfig(
        models_dir=shelf, threads=2, slots=1, queue_size=4, batch_size=64, faults=faults
    )
    engine = Engine(Catalog([_spec("a"), _spec("b")]), config)

    async def scenario() -> None:
        engine.start()
        try:
            a = await engine.load("a")
            faults.refuse = {"b"}
            with pytest.raises(EngineFailure) as failed:
                await engine.load("b")
            assert "ENOSPC" in failed.value.message
            assert "/var/lib" not in failed.value.message
            assert engine.state("b") == "error"
            assert "ENOSPC" in (engine.error("b") or "")
            assert (await _text(a, 10)).strip()  # the other model serves on
            faults.refuse = set()
            await engine.load("b")
            assert engine.state("b") == "loaded"
            assert engine.error("b") is None
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_a_model_that_gave_up_reloads_on_the_next_request(shelf: Path) -> None:
    faults = DecodeFaults(set(range(1, 100)))
    config = EngineConfig(
        models_dir=shelf, threads=2, slots=1, queue_size=4, batch_size=64, draft_max=0,
        faults=faults,
    )  # fmt: skip
    engine = Engine(Catalog([_spec("a")]), config)

    async def scenario() -> None:
        engine.start()
        try:
            first = await engine.load("a")
            faults.arm()
            for _ in range(MAX_FAILURES):
                with pytest.raises(EngineFailure):
                    await _text(first, 10)
            assert engine.state("a") == "error"
            assert engine.error("a") == f"{MAX_FAILURES} steps in a row failed"
            faults.armed = False
            async with engine.use("a") as second:
                assert second is not first
                assert (await _text(second, 10)).strip()
            assert engine.state("a") == "loaded"
            assert engine.stuck is False
        finally:
            await engine.close()

    asyncio.run(scenario())
