"""A loaded model's own work on the real model: embeddings (chunked, bounded in memory) and the
use count that residency reads."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

import thoxd.engine.embed
from tests.engine.helpers import collect, load_model
from thoxd.catalog.entries import ModelSpec
from thoxd.engine.model import LoadedModel
from thoxd.engine.request import Generation
from thoxd.engine.sampling import SamplingParams


def _load(spec: ModelSpec, model_file: Path, models_dir: Path) -> LoadedModel:
    return load_model(spec, model_file, models_dir, slots=2, queue_size=4, batch_size=256)


@pytest.fixture(scope="module")
def model(default_spec: ModelSpec, model_file: Path, models_dir: Path) -> Iterator[LoadedModel]:
    m = _load(default_spec, model_file, models_dir)
    yield m
    m.close()


async def embed(model: LoadedModel, inputs: list[list[int]]) -> list[list[float]]:
    return await model.embed(inputs).result()


def _dot(x: list[float], y: list[float]) -> float:
    return sum(p * q for p, q in zip(x, y, strict=True))


def test_embeddings_are_normalised_and_meaningful(model: LoadedModel) -> None:
    async def embed(text: str) -> list[float]:
        [vector] = await model.embed([model.llama.tokenize(text, add_special=True)]).result()
        return vector

    async def scenario() -> tuple[list[float], list[float], list[float]]:
        return (
            await embed("The cat sat on the mat."),
            await embed("A cat was sitting on the mat."),
            await embed("Quarterly revenue grew by four percent."),
        )

    a, b, c = asyncio.run(scenario())
    assert len(a) == model.llama.n_embd
    assert sum(v * v for v in a) == pytest.approx(1.0, abs=1e-3)
    assert _dot(a, b) > _dot(a, c)


def test_chunking_does_not_change_an_embedding(
    model: LoadedModel,
    default_spec: ModelSpec,
    model_file: Path,
    models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Causal attention: each token's state is the same whether its prefix came in one decode
    or several, so the mean over 64-token chunks is the mean over the whole input."""
    tokens = model.llama.tokenize(
        "The quick brown fox jumps over the lazy dog. " * 20, add_special=True
    )
    assert len(tokens) > 3 * thoxd.engine.embed.EMBED_BATCH
    [chunked] = asyncio.run(embed(model, [tokens]))
    monkeypatch.setattr(thoxd.engine.embed, "EMBED_BATCH", 512)
    whole = _load(default_spec, model_file, models_dir)
    try:
        [single] = asyncio.run(embed(whole, [tokens]))
    finally:
        whole.close()
    assert _dot(chunked, single) > 0.9999


def test_a_long_input_embeds_in_bounded_memory(model: LoadedModel) -> None:
    """llama.cpp computes logits for every token of a ubatch: a 3000-token input in one ubatch
    took 3000 x 262144 floats (3 GiB) for Gemma 3. In 64-token chunks it takes a few MiB."""
    tokens = model.llama.tokenize("word " * 3000, add_special=True)
    process = psutil.Process()
    before = process.memory_info().rss
    [vector] = asyncio.run(embed(model, [tokens]))
    grown = process.memory_info().rss - before
    assert len(vector) == model.llama.n_embd
    assert grown < 400 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"


def test_the_use_count_follows_generations_to_their_end(model: LoadedModel) -> None:
    async def scenario() -> None:
        assert not model.busy
        gen = Generation(
            prompt=model.llama.tokenize("Hello", add_special=True),
            params=SamplingParams(temperature=0.0),
            max_tokens=4,
        )
        model.submit(gen)
        assert model.busy  # from submit, before the engine thread has seen it
        await collect(gen)
        assert not model.busy
        with model.lease():
            assert model.busy
        assert not model.busy

    asyncio.run(scenario())
