"""Whether a lone request's output depends on what ran before it (issue #17, item 7).

In-process, on the default model (`--model` for another). Each prompt, greedy and then seeded
(temperature 0.8, seed 1234, thoxd's other defaults), runs first as the first request of a
freshly loaded engine with 4 slots. Then, on that engine:
- again at once (its cells still in the cache: a prefix-cache hit);
- restored: after two other prompts ran one at a time (its slot was parked, and its prefix comes
  back from host memory);
- after three other prompts ran together.
Then, on a fresh engine with 2 slots, first and after the same two other prompts. Last, greedy
only, a continuation (the prompt, its output and a few more words, as a chat's next turn) on the
first engine, where the output's cells are cached, against a fresh engine.

For each case it prints how many prompts gave the same text as on the fresh 4-slot engine, how
many the same logits at the first decoded token (bit for bit), and the largest difference in one
of those logits. Every measured run is alone on its engine. Prompt 7 is long (past Gemma 3's
512-token sliding window). Usage: .venv/bin/python bench/reproducible.py [--model gemma-3-270m]
"""

from __future__ import annotations

import argparse
import asyncio
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from thoxd.catalog.entries import Catalog
from thoxd.engine.llama import LlamaContext, backend_init, route_llama_logs
from thoxd.engine.model import EngineConfig, LoadedModel
from thoxd.engine.request import Delta, Finished, Generation
from thoxd.engine.sampling import Sampler, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "SELECT * FROM users WHERE",
    "To make a cup of tea,",
    "class Stack:\n    def",
    "Summarize this price list: "
    + " ".join(f"item {i} costs {i * 7 % 13} dollars;" for i in range(70)),
]
OTHERS = ["The weather today is", "import numpy as np\n", "A haiku about autumn:"]
GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.8, seed=1234)

# The logits each request's sampler saw first: the first decoded token's.
_first: list[np.ndarray[Any, np.dtype[np.float32]]] = []
_seen: weakref.WeakSet[Sampler] = weakref.WeakSet()
_sample = Sampler.sample


def _recording(self: Sampler, ctx: LlamaContext, batch_index: int) -> int:
    if self not in _seen:
        _seen.add(self)
        _first.append(ctx.logits(batch_index).copy())
    return _sample(self, ctx, batch_index)


Sampler.sample = _recording  # type: ignore[method-assign]


@dataclass
class Run:
    text: str
    logits: np.ndarray[Any, np.dtype[np.float32]]
    drafts: int


async def _read(gen: Generation) -> tuple[str, Finished]:
    parts: list[str] = []
    async for event in gen.events():
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Finished):
            return "".join(parts), event
        else:
            raise RuntimeError(f"request failed: {event}")
    raise RuntimeError("no Finished event")


async def _run(model: LoadedModel, prompts: list[str], params: SamplingParams, n: int) -> Run:
    """Submit `prompts` together; the first one's text, first logits and drafts checked."""
    _first.clear()
    gens = [
        Generation(prompt=model.llama.tokenize(p, add_special=True), params=params, max_tokens=n)
        for p in prompts
    ]
    for gen in gens:
        model.submit(gen)
    results = await asyncio.gather(*(_read(g) for g in gens))
    text, fin = results[0]
    return Run(text, _first[0], fin.timings.draft_n)


def _cases(
    load: Any, prompt: str, params: SamplingParams, n: int, continuation: bool
) -> dict[str, Run]:
    async def on_four(model: LoadedModel) -> dict[str, Run]:
        out = {"fresh": await _run(model, [prompt], params, n)}
        out["again at once"] = await _run(model, [prompt], params, n)
        for other in OTHERS[:2]:
            await _run(model, [other], params, n)
        out["restored after 2 others"] = await _run(model, [prompt], params, n)
        await _run(model, OTHERS, params, n)
        out["after 3 others together"] = await _run(model, [prompt], params, n)
        if continuation:
            more = prompt + out["fresh"].text + " And"
            out["continuation, output cached"] = await _run(model, [more], params, n)
        return out

    async def on_two(model: LoadedModel) -> dict[str, Run]:
        out = {"2 slots: fresh": await _run(model, [prompt], params, n)}
        for other in OTHERS[:2]:
            await _run(model, [other], params, n)
        out["2 slots: after 2 others"] = await _run(model, [prompt], params, n)
        return out

    model = load(4)
    try:
        out = asyncio.run(on_four(model))
    finally:
        model.close()
    model = load(2)
    try:
        out |= asyncio.run(on_two(model))
    finally:
        model.close()
    if continuation:
        more = prompt + out["fresh"].text + " And"
        model = load(4)
        try:
            out["continuation, fresh engine"] = asyncio.run(_run(model, [more], params, n))
        finally:
            model.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models-dir", type=Path, default=Path.home() / ".cache/thoxd-test")
    p.add_argument("--model", default="thox-coder")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--draft-max", type=int, default=EngineConfig.draft_max)
    args = p.parse_args()
    spec = Catalog.load(ROOT / "models.toml").get(args.model)
    route_llama_logs()
    backend_init()
    config = EngineConfig(
        models_dir=args.models_dir,
        threads=2,
        slots=4,
        queue_size=64,
        batch_size=512,
        draft_max=args.draft_max,
    )

    def load(slots: int) -> LoadedModel:
        return LoadedModel(spec, args.models_dir / spec.path, replace(config, slots=slots))

    print(f"{spec.id}, {len(PROMPTS)} prompts, {args.tokens} tokens, draft_max {args.draft_max}")
    print("| case | params | same text | same first logits | max logit diff | drafts |")
    print("|---|---|---:|---:|---:|---:|")
    for label, params in (("greedy", GREEDY), ("seeded", SEEDED)):
        runs = [_cases(load, q, params, args.tokens, label == "greedy") for q in PROMPTS]
        for case in runs[0]:
            if case == "continuation, fresh engine":
                continue
            ref = "continuation, fresh engine" if case.startswith("continuation") else "fresh"
            pairs = [(r[ref], r[case]) for r in runs]
            same = sum(a.text == b.text for a, b in pairs)
            bits = sum(np.array_equal(a.logits, b.logits) for a, b in pairs)
            diff = max(float(np.abs(a.logits - b.logits).max()) for a, b in pairs)
            drafts = sum(b.drafts for _, b in pairs)
            print(f"| {case} | {label} | {same}/{len(pairs)} | {bits}/{len(pairs)} | {diff:.3g} "
                  f"| {drafts} |")  # fmt: skip
            for i, (a, b) in enumerate(pairs):
                if a.text != b.text:
                    print(f"|   prompt {i + 1}: {a.text!r} / {b.text!r} | | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
