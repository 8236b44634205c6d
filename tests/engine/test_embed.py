"""Embeddings between decode steps (thoxd/engine/embed.py) on the real model: a chunk per round
beside running generations, cancelled after the chunk in hand, a bounded queue, and a failure that
ends only its own request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.helpers import collect, counting, load_model
from thoxd.catalog.entries import ModelSpec
from thoxd.engine.embed import EMBED_BATCH, EMBED_SHARED
from thoxd.engine.faults import Faults
from thoxd.engine.model import LoadedModel
from thoxd.errors import EngineFailure, InvalidRequest, QueueFull


class Recorder(Faults):
    """Records the order of generation steps ("s") and embedding chunks ("e"); can hold the
    engine thread at a given embedding chunk, and make chunks fail."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.hold_at: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        self.fail = False

    def step(self, model_id: str) -> None:
        self.events.append("s")

    def embed(self, model_id: str, n_tokens: int) -> None:
        self.events.append("e")
        if self.fail:
            raise RuntimeError("injected")
        if self.events.count("e") == self.hold_at:
            self.held.set()
            self.release.wait()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def model(
    default_spec: ModelSpec, model_file: Path, models_dir: Path, recorder: Recorder
) -> Iterator[LoadedModel]:
    m = load_model(
        default_spec, model_file, models_dir, slots=2, queue_size=2, draft_max=0, faults=recorder
    )
    yield m
    recorder.release.set()
    m.close()


def _tokens(model: LoadedModel, chunks: int) -> list[int]:
    tokens = model.llama.tokenize("word " * (chunks * EMBED_BATCH), add_special=True)
    return tokens[: chunks * EMBED_BATCH]


def test_chunks_take_turns_with_generation_steps(model: LoadedModel, recorder: Recorder) -> None:
    async def scenario() -> None:
        gen = counting(model, 10, max_tokens=40)
        model.submit(gen)
        job = model.embed([_tokens(model, 4)])
        [vector] = await job.result()
        assert len(vector) == model.llama.n_embd
        await collect(gen)

    asyncio.run(scenario())
    events = "".join(recorder.events)
    window = events[events.index("e") : events.rindex("e") + 1]
    assert window.count("e") == 4 * EMBED_BATCH // EMBED_SHARED  # small chunks beside a stream
    assert "ee" not in window  # a generation step between every two chunks: no stream stalls


def test_a_cancelled_embedding_stops_after_the_chunk_in_hand(
    model: LoadedModel, recorder: Recorder
) -> None:
    recorder.hold_at = 2

    async def scenario() -> None:
        job = model.embed([_tokens(model, 20)])
        await asyncio.to_thread(recorder.held.wait)
        job.cancel()  # as when the client disconnects
        recorder.release.set()
        with pytest.raises(asyncio.CancelledError):
            await job.result()
        assert not model.busy
        assert recorder.events.count("e") == 2  # of 20
        [vector] = await model.embed([_tokens(model, 1)]).result()  # and the next one works
        assert len(vector) == model.llama.n_embd

    asyncio.run(scenario())


def test_the_embeddings_queue_is_bounded(model: LoadedModel, recorder: Recorder) -> None:
    recorder.hold_at = 1

    async def scenario() -> None:
        first = model.embed([_tokens(model, 1)])
        await asyncio.to_thread(recorder.held.wait)
        waiting = [model.embed([_tokens(model, 1)]) for _ in range(2)]  # queue_size
        with pytest.raises(QueueFull):
            model.embed([_tokens(model, 1)])
        recorder.release.set()
        for job in (first, *waiting):
            assert len((await job.result())[0]) == model.llama.n_embd

    asyncio.run(scenario())


def test_a_failed_chunk_ends_only_its_own_request(model: LoadedModel, recorder: Recorder) -> None:
    async def scenario() -> None:
        gen = counting(model, 10, max_tokens=20)
        model.submit(gen)
        recorder.fail = True
        with pytest.raises(EngineFailure) as failed:
            await model.embed([_tokens(model, 3)]).result()
        assert failed.value.code == "engine_error"
        recorder.fail = False
        _, finished = await collect(gen)
        assert finished.completion_tokens == 20
        [vector] = await model.embed([_tokens(model, 1)]).result()
        assert len(vector) == model.llama.n_embd
        assert model.failed is None

    asyncio.run(scenario())


def test_token_ids_outside_the_vocabulary_are_refused(model: LoadedModel) -> None:
    async def scenario() -> None:
        for bad in ([model.llama.n_vocab], [-1], [2**32 + 5]):
            with pytest.raises(InvalidRequest) as refused:
                model.embed([[1, *bad]])
            assert refused.value.param == "input"
        assert not model.busy

    asyncio.run(scenario())
