"""Prompt-lookup drafts on and off, side by side: where they pay and where they cost.

In-process on the default model (no HTTP: both sides pay the same for it), greedy, `--tokens`
per request, C = 1 and 4 concurrent requests, for three kinds of text:
- counting: concurrency.py's counting prompts (the issue 3 benchmark);
- code edit: "rewrite this function with one change", over code-like text (the IDE pattern);
- prose: story openings, which the model continues with little repetition.
Each round loads the engine with `draft_max` 15, then 0, and runs every kind and C on both;
prints aggregate tok/s for each, their ratio, and how many drafts were checked and accepted.
Usage: .venv/bin/python bench/drafts.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from concurrency import code_prefix, counting_prompt

from thoxd.catalog.entries import Catalog
from thoxd.engine.llama import backend_init, route_llama_logs
from thoxd.engine.model import EngineConfig, LoadedModel
from thoxd.engine.request import Delta, Finished, Generation
from thoxd.engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
OPENINGS = (
    "Once upon a time, in a small village by the sea,",
    "The old lighthouse keeper climbed the stairs and",
    "When the train stopped in the middle of the desert,",
    "My grandmother kept a box of letters that",
)


def code_edit(seed: int) -> str:
    code = code_prefix(seed, 3).split("\n", 1)[1]
    return f"{code}# The same code with `total` renamed to `result`:\n\n" + code[:30]


KINDS: dict[str, Callable[[int], str]] = {
    "counting": lambda i: counting_prompt(101 + 37 * i),
    "code edit": code_edit,
    "prose": lambda i: OPENINGS[i % len(OPENINGS)],
}


async def one_level(
    model: LoadedModel, make: Callable[[int], str], c: int, tokens: int, first: int
) -> tuple[float, int, int]:
    """Aggregate tok/s of C requests at once, and their drafts checked and accepted."""
    gens = [
        Generation(
            prompt=model.llama.tokenize(make(first + i), add_special=True),
            params=SamplingParams(temperature=0.0),
            max_tokens=tokens,
        )
        for i in range(c)
    ]
    t0 = time.perf_counter()
    for gen in gens:
        model.submit(gen)
    done: list[Finished] = []
    for gen in gens:
        async for event in gen.events():
            if isinstance(event, Finished):
                done.append(event)
            elif not isinstance(event, Delta):
                raise RuntimeError(f"request failed: {event}")
    wall = time.perf_counter() - t0
    produced = sum(f.completion_tokens for f in done)
    drafted = sum(f.timings.draft_n for f in done)
    return produced / wall, drafted, sum(f.timings.draft_n_accepted for f in done)


def run_all(
    model: LoadedModel, tokens: int, seed: int
) -> dict[tuple[str, int], tuple[float, int, int]]:
    async def go() -> dict[tuple[str, int], tuple[float, int, int]]:
        await one_level(model, KINDS["prose"], 1, 4, 0)  # warm up
        out = {}
        for kind, make in KINDS.items():
            for c in (1, 4):
                out[kind, c] = await one_level(model, make, c, tokens, seed * 10)
        return out

    return asyncio.run(go())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models-dir", type=Path, default=Path.home() / ".cache/thoxd-test")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    spec = Catalog.load(ROOT / "models.toml").get("gemma-3-270m")  # what RESULTS measured
    route_llama_logs()
    backend_init()
    config = EngineConfig(
        models_dir=args.models_dir, threads=args.threads, slots=4, queue_size=64, batch_size=256
    )
    results: dict[int, list[dict[tuple[str, int], tuple[float, int, int]]]] = {15: [], 0: []}
    for r in range(args.rounds):
        for draft_max in results:
            model = LoadedModel(
                spec, args.models_dir / spec.path, replace(config, draft_max=draft_max)
            )
            try:
                results[draft_max].append(run_all(model, args.tokens, r))
            finally:
                model.close()
    print(
        f"\n{args.tokens} greedy tokens per request, {args.rounds} rounds, threads {args.threads}"
    )
    print("| text | C | drafts on tok/s | drafts off tok/s | ratio | drafts checked / accepted |")
    print("|---|---:|---:|---:|---:|---:|")
    for key in results[15][0]:
        on = statistics.mean(run[key][0] for run in results[15])
        off = statistics.mean(run[key][0] for run in results[0])
        checked = sum(run[key][1] for run in results[15])
        accepted = sum(run[key][2] for run in results[15])
        kind, c = key
        print(f"| {kind} | {c} | {on:.1f} | {off:.1f} | {on / off:.2f}x | {checked} / {accepted} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
