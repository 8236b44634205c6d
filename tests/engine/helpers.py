"""Engine tests' helpers: a real model loaded as the daemon loads it, and reading events."""

from __future__ import annotations

from pathlib import Path

from thoxd.catalog.entries import ModelSpec
from thoxd.engine.faults import Faults
from thoxd.engine.llama import route_llama_logs
from thoxd.engine.model import EngineConfig, LoadedModel
from thoxd.engine.request import Delta, Failed, Finished, Generation
from thoxd.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def load_model(
    spec: ModelSpec,
    model_file: Path,
    models_dir: Path,
    *,
    slots: int = 4,
    queue_size: int = 16,
    batch_size: int = 512,
    draft_max: int = 15,
    faults: Faults | None = None,
    stop_timeout: float = 10.0,
    cold_batch: int = 0,
) -> LoadedModel:
    # As in the daemon: llama.cpp logs through our router, also while contexts are freed.
    route_llama_logs()
    config = EngineConfig(
        models_dir=models_dir,
        threads=2,
        slots=slots,
        queue_size=queue_size,
        batch_size=batch_size,
        draft_max=draft_max,
        faults=faults or Faults(),
        stop_timeout=stop_timeout,
        cold_batch=cold_batch,
    )
    return LoadedModel(spec, model_file, config)


async def collect(gen: Generation) -> tuple[str, Finished]:
    """The generated text and the Finished event; a Failed event raises its error."""
    parts: list[str] = []
    async for event in gen.events():
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Failed):
            raise event.error
        else:
            return "".join(parts), event
    raise AssertionError("no Finished event")


def counting(model: LoadedModel, start: int, max_tokens: int = 12) -> Generation:
    """Greedy counting from `start`: confident text, the same alone or beside others."""
    numbers = ", ".join(str(n) for n in range(start, start + 6))
    return Generation(
        prompt=model.llama.tokenize(f"{numbers},", add_special=True),
        params=SamplingParams(temperature=0.0, repeat_penalty=1.0),
        max_tokens=max_tokens,
    )


async def run_prompt(
    model: LoadedModel,
    prompt: str,
    *,
    params: SamplingParams = GREEDY,
    max_tokens: int = 16,
    stops: tuple[str, ...] = (),
) -> tuple[str, Finished]:
    """One request for `prompt` (tokenized with BOS) on its own: its text and Finished event."""
    gen = Generation(
        prompt=model.llama.tokenize(prompt, add_special=True),
        params=params,
        max_tokens=max_tokens,
        stops=stops,
    )
    model.submit(gen)
    return await collect(gen)
