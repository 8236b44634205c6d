"""Residency on the real model: JIT loads, the memory budget, LRU eviction, busy and pinned
models, keep_alive, and refused loads that leave the others serving.

The catalog serves the one Gemma file under several ids (a second real entry is the same file),
each with a small context so that a load costs ~250 MiB.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.catalog.test_gguf import BASE_DATA, BASE_TENSORS, STR, base_kvs, build, kv
from tests.conftest import GEMMA
from tests.engine.helpers import collect
from thoxd.catalog.entries import Catalog, ModelSpec
from thoxd.engine.devices import Device
from thoxd.engine.request import Generation
from thoxd.engine.runtime import Engine, EngineConfig, LoadedModel
from thoxd.engine.sampling import SamplingParams
from thoxd.errors import (
    EngineFailure,
    InsufficientMemory,
    MemoryBusy,
    ModelBusy,
    ModelFileRejected,
)

T = TypeVar("T")


def _spec(model_id: str, **kw: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "id": model_id,
        "path": GEMMA,
        "n_ctx": 512,
        "capabilities": ["completion"],
        **kw,
    }
    return ModelSpec.model_validate(fields)


def _engine(shelf: Path, specs: list[ModelSpec], budget_models: float = 10.0) -> Engine:
    """An engine whose budget holds `budget_models` of the small entries."""
    config = EngineConfig(models_dir=shelf, threads=2, slots=1, queue_size=4, batch_size=64)
    probe = Engine(Catalog(specs), config).estimate(_spec("probe"))
    assert probe is not None
    budget = int(probe.total * budget_models)
    return Engine(Catalog(specs), EngineConfig(**{**config.__dict__, "memory_budget": budget}))


def _run(engine: Engine, scenario: Callable[[Engine], Awaitable[T]]) -> T:
    async def main() -> T:
        engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.close()

    return asyncio.run(main())


def _submit(model: LoadedModel, max_tokens: int) -> Generation:
    gen = Generation(
        prompt=model.llama.tokenize("Once upon a time", add_special=True),
        params=SamplingParams(temperature=0.0),
        max_tokens=max_tokens,
    )
    model.submit(gen)
    return gen


async def _touch(engine: Engine, name: str) -> LoadedModel:
    async with engine.use(name) as model:
        return model


@pytest.fixture(scope="module")
def abc() -> list[ModelSpec]:
    return [_spec("a"), _spec("b"), _spec("c")]


def test_a_request_loads_its_model_and_concurrent_ones_share_the_load(
    shelf: Path, abc: list[ModelSpec]
) -> None:
    async def scenario(engine: Engine) -> None:
        assert engine.state("a") == "unloaded"
        first = asyncio.create_task(_touch(engine, "a"))
        second = asyncio.create_task(_touch(engine, "a"))
        await asyncio.sleep(0)
        assert engine.state("a") == "loading"
        one, two = await asyncio.gather(first, second)
        assert one is two
        assert engine.times_loaded("a") == 1
        assert engine.state("a") == "loaded"
        async with engine.use("a") as model:
            text, finished = await collect(_submit(model, 4))
        assert finished.completion_tokens == 4 and text

    _run(_engine(shelf, abc), scenario)


def test_the_least_recently_used_idle_model_goes_first(shelf: Path, abc: list[ModelSpec]) -> None:
    async def scenario(engine: Engine) -> None:
        await _touch(engine, "a")
        await _touch(engine, "b")
        await _touch(engine, "a")  # now b is the least recently used
        await _touch(engine, "c")
        assert [engine.state(m) for m in "abc"] == ["loaded", "unloaded", "loaded"]
        assert engine.used() <= engine.budget
        await _touch(engine, "b")  # and back: now a is the oldest
        assert [engine.state(m) for m in "abc"] == ["unloaded", "loaded", "loaded"]
        assert engine.times_loaded("b") == 2

    _run(_engine(shelf, abc, budget_models=2.5), scenario)


def test_a_busy_model_is_never_evicted(shelf: Path, abc: list[ModelSpec]) -> None:
    async def scenario(engine: Engine) -> None:
        a = await _touch(engine, "a")
        running = _submit(a, 400)  # a is the least recently used, but busy
        await _touch(engine, "b")
        await _touch(engine, "c")
        assert engine.state("a") == "loaded" and engine.state("b") == "unloaded"
        # With both residents held, a third load is refused for now and evicts nothing.
        async with engine.use("c"):
            with pytest.raises(MemoryBusy) as refused:
                await engine.load("b")
        assert "busy" in refused.value.message and refused.value.headers["Retry-After"]
        assert engine.state("a") == engine.state("c") == "loaded"
        running.cancel()
        await collect(running)
        await _touch(engine, "b")  # idle again: a can go now
        assert engine.state("b") == "loaded"

    _run(_engine(shelf, abc, budget_models=2.5), scenario)


def test_a_pinned_model_stays_while_others_rotate(shelf: Path) -> None:
    specs = [_spec("p", pinned=True), _spec("a"), _spec("b")]

    async def scenario(engine: Engine) -> None:
        await _touch(engine, "p")
        await _touch(engine, "a")
        await _touch(engine, "b")  # p is the oldest, but pinned
        assert [engine.state(m) for m in ("p", "a", "b")] == ["loaded", "unloaded", "loaded"]

    _run(_engine(shelf, specs, budget_models=2.5), scenario)


def test_a_load_larger_than_the_budget_is_refused_with_the_estimate(shelf: Path) -> None:
    specs = [_spec("a"), _spec("huge", n_ctx=32768)]

    async def scenario(engine: Engine) -> None:
        await _touch(engine, "a")
        with pytest.raises(InsufficientMemory) as refused:
            await engine.load("huge")
        message = refused.value.message
        assert refused.value.status == 507
        assert "needs about" in message and "KV cache" in message and "budget" in message
        assert engine.state("huge") == "error"
        # Nothing was evicted for it: a still serves.
        async with engine.use("a") as model:
            _, finished = await collect(_submit(model, 2))
        assert finished.completion_tokens == 2

    _run(_engine(shelf, specs, budget_models=2.5), scenario)


def test_a_hostile_file_is_refused_fast_and_the_others_keep_serving(shelf: Path) -> None:
    specs = [_spec("a"), _spec("bad", path="hostile.gguf"), _spec("gone", path="missing.gguf")]

    async def scenario(engine: Engine) -> None:
        await _touch(engine, "a")
        with pytest.raises(ModelFileRejected) as refused:
            await engine.load("bad")
        # Refused by our own header check, before llama.cpp ever opened the file.
        assert "over the limit" in refused.value.message
        assert refused.value.status == 422 and "bad" in refused.value.message
        assert str(shelf) not in refused.value.message
        with pytest.raises(ModelFileRejected):
            await engine.load("gone")
        assert engine.state("bad") == engine.state("gone") == "error"
        async with engine.use("a") as model:
            _, finished = await collect(_submit(model, 2))
        assert finished.completion_tokens == 2

    _run(_engine(shelf, specs), scenario)


def test_keep_alive_unloads_an_idle_model_and_waits_for_a_busy_one(shelf: Path) -> None:
    specs = [_spec("short", keep_alive="300ms"), _spec("a")]

    async def scenario(engine: Engine) -> None:
        model = await _touch(engine, "short")
        gen = _submit(model, 400)  # seconds of decoding: longer than its keep_alive
        await asyncio.sleep(0.6)
        assert engine.state("short") == "loaded"  # busy: its clock has not started
        gen.cancel()
        await collect(gen)
        await _wait_for(lambda: engine.state("short") == "unloaded", 3.0)
        # A request's own keep_alive replaces the model's: "a" keeps forever by default.
        async with engine.use("a", keep_alive=0.0):
            pass
        await _wait_for(lambda: engine.state("a") == "unloaded", 3.0)

    _run(_engine(shelf, specs), scenario)


def test_unload_refuses_a_busy_model_and_frees_an_idle_one(
    shelf: Path, abc: list[ModelSpec]
) -> None:
    async def scenario(engine: Engine) -> None:
        assert await engine.unload("a") is False  # not loaded: nothing to do
        model = await _touch(engine, "a")
        gen = _submit(model, 400)
        with pytest.raises(ModelBusy) as refused:
            await engine.unload("a")
        extra = refused.value.extra
        assert refused.value.status == 409 and extra["running"] + extra["waiting"] == 1
        gen.cancel()
        await collect(gen)
        assert await engine.unload("a") is True
        assert engine.state("a") == "unloaded" and engine.used() == 0

    _run(_engine(shelf, abc), scenario)


async def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_a_request_never_sees_its_model_closed_under_it(shelf: Path) -> None:
    """keep_alive 0 unloads as soon as a model is idle; a request that waited for the load
    must still get a live model (it reloads if the first one went)."""
    specs = [_spec("zero", keep_alive=0)]

    async def scenario(engine: Engine) -> list[int]:
        async def one() -> int:
            async with engine.use("zero") as model:
                _, finished = await collect(_submit(model, 2))
            return finished.completion_tokens

        return list(await asyncio.gather(*(one() for _ in range(3))))

    assert _run(_engine(shelf, specs), scenario) == [2, 2, 2]


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    yield
    # Every engine above closed its models: no scheduler thread outlives its test.
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("thoxd-engine")]


def test_a_file_llama_cpp_refuses_evicts_nothing(shelf: Path) -> None:
    """The gate passes it (well-formed), llama.cpp does not know its architecture: found out
    before the idle residents are evicted to make room for it."""
    odd = shelf / "odd-arch.gguf"
    odd.write_bytes(
        build(
            base_kvs(general__architecture=kv("general.architecture", STR, "no-such-arch")),
            BASE_TENSORS,
            BASE_DATA,
        )
    )
    specs = [_spec("a"), _spec("b"), _spec("odd", path=odd.name)]

    async def scenario(engine: Engine) -> None:
        await _touch(engine, "a")
        await _touch(engine, "b")
        with pytest.raises(EngineFailure):
            await engine.load("odd")
        assert engine.state("odd") == "error"
        assert engine.state("a") == engine.state("b") == "loaded"

    engine = _engine(shelf, specs, budget_models=2.5)
    odd_cost, a_cost = engine.estimate(specs[2]), engine.estimate(specs[0])
    assert odd_cost is not None and a_cost is not None
    # It fits the budget alone, but not beside a and b: loading it would evict.
    assert engine.budget - 2 * a_cost.total < odd_cost.total < engine.budget
    _run(engine, scenario)


def test_a_new_catalog_serves_new_entries_and_reloads_changed_ones_when_idle(
    shelf: Path,
) -> None:
    async def scenario(engine: Engine) -> None:
        a = await _touch(engine, "a")
        b = await _touch(engine, "b")
        running = _submit(b, 400)  # b is busy when its entry changes
        stale = engine.replace_catalog(Catalog([_spec("a"), _spec("b", n_ctx=1024), _spec("new")]))
        assert stale == ["b"]
        assert (await _touch(engine, "new")).spec.id == "new"
        assert engine.resident("a") is a  # unchanged: untouched
        assert await _touch(engine, "b") is b  # busy: the old one keeps serving
        running.cancel()
        await collect(running)
        await _wait_for(lambda: engine.state("b") == "unloaded", 3.0)  # idle: it goes
        assert (await _touch(engine, "b")).n_ctx == 1024  # and the next request loads the new
        engine.replace_catalog(Catalog([_spec("b", n_ctx=1024)]))
        await _wait_for(lambda: engine.state("a") == "unloaded", 3.0)  # removed: it goes too
        assert engine.state("b") == "loaded"

    _run(_engine(shelf, [_spec("a"), _spec("b")]), scenario)


def test_two_loads_that_both_evict_take_one_victim_each(shelf: Path) -> None:
    """Each load re-plans its room after llama.cpp has read its file (an await): the other load
    may have taken the victim it planned for meanwhile."""
    specs = [_spec(m) for m in "abcd"]

    async def scenario(engine: Engine) -> None:
        await _touch(engine, "a")
        await _touch(engine, "b")
        await asyncio.gather(_touch(engine, "c"), _touch(engine, "d"))
        assert [engine.state(m) for m in "abcd"] == ["unloaded", "unloaded", "loaded", "loaded"]
        assert engine.used() <= engine.budget

    _run(_engine(shelf, specs, budget_models=2.5), scenario)


def test_the_gpu_budget_evicts_and_refuses_as_the_host_budget_does(shelf: Path) -> None:
    # This machine has no GPU: the config's seam gives one, llama.cpp (no GPU backend) keeps
    # the layers here, and the bookkeeping is what is tested. Host memory is plentiful.
    def gpu() -> list[Device]:
        return [Device("GPU0", "test", 1, 1 << 33, 1 << 33)]

    config = EngineConfig(
        models_dir=shelf, threads=2, slots=1, queue_size=4, batch_size=64, gpu_devices=gpu
    )
    one = Engine(Catalog([]), config).estimate(_spec("probe", n_gpu_layers=-1))
    assert one is not None and one.gpu_layers == 19
    room = int(one.gpu * 1.5)
    specs = [
        _spec("a", n_gpu_layers=-1),
        _spec("b", n_gpu_layers=-1),
        _spec("wide", n_ctx=8192, n_gpu_layers=-1),
        _spec("wide-auto", n_ctx=8192),
    ]
    config = EngineConfig(**{**config.__dict__, "gpu_memory_budget": str(room)})

    async def scenario(engine: Engine) -> None:
        await _touch(engine, "a")
        assert (engine.gpu_budget, engine.gpu_used()) == (room, one.gpu)
        await _touch(engine, "b")  # room for one on the GPU: a goes
        assert [m.spec.id for m in engine.loaded()] == ["b"]
        with pytest.raises(InsufficientMemory) as refused:
            await engine.load("wide")  # every layer asked for, more than the whole GPU budget
        assert "gpu_memory_budget" in refused.value.message
        assert [m.spec.id for m in engine.loaded()] == ["b"]
        async with engine.use("wide-auto") as model:  # as many layers as fit: b goes
            assert 0 < model.memory.gpu_layers < 19
            _, finished = await collect(_submit(model, 2))
        assert finished.completion_tokens == 2
        assert [m.spec.id for m in engine.loaded()] == ["wide-auto"]
        assert engine.gpu_used() == model.memory.gpu <= room

    _run(Engine(Catalog(specs), config), scenario)
