"""Prompt-lookup drafts on and off, side by side: where they pay and where they cost.

In-process on Gemma 3 270M (no HTTP: both sides pay the same for it), `--tokens` per request,
C = 1 and 4 concurrent requests, for four kinds of text:
- counting: concurrency.py's counting prompts, greedy (what flatters prompt lookup);
- prose, code, chat: bench/workloads.py's (a story at temperature 0.8 with a seed, a function
  rewritten at temperature 0, a long system prompt and a question at temperature 0.7).
Each round loads the engine with `draft_max` 15, then 0, and runs every kind and C on both;
prints aggregate tok/s for each, their ratio, and how many drafts were checked and accepted.

`--loaded-calibration`: while each engine loads and measures its step costs (the first
request waits for that), two busy processes hold both cores, as on a machine that is busy
when the daemon starts; they stop before the measurement. The costs the plan starts from are
then wrong, and what the drafts-on engine does with them is what this shows (thoxd learns the
costs again from its own steps: thoxd.engine.drafts.StepCosts.observe).
Usage: .venv/bin/python bench/drafts.py [--rounds 2] [--loaded-calibration]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from concurrency import counting_prompt
from workloads import prompt

from thoxd.catalog.entries import Catalog
from thoxd.engine.llama import backend_init, route_llama_logs
from thoxd.engine.model import EngineConfig, LoadedModel
from thoxd.engine.request import Delta, Finished, Generation
from thoxd.engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
GREEDY: dict[str, Any] = {"temperature": 0.0}

KINDS: dict[str, Callable[[int], tuple[str, dict[str, Any]]]] = {
    "counting": lambda i: (counting_prompt(101 + 37 * i), GREEDY),
    "prose": lambda i: prompt("prose", i),
    "code": lambda i: prompt("code", i),
    "chat": lambda i: prompt("chat", i),
}


def _burn(until: Any) -> None:
    while not until.is_set():
        pass


@contextmanager
def busy_cores(n: int) -> Iterator[None]:
    """n processes spinning until the block ends."""
    stop = multiprocessing.Event()
    procs = [multiprocessing.Process(target=_burn, args=(stop,)) for _ in range(n)]
    for proc in procs:
        proc.start()
    try:
        yield
    finally:
        stop.set()
        for proc in procs:
            proc.join()


async def one_level(
    model: LoadedModel,
    make: Callable[[int], tuple[str, dict[str, Any]]],
    c: int,
    tokens: int,
    first: int,
) -> tuple[float, int, int]:
    """Aggregate tok/s of C requests at once, and their drafts checked and accepted."""
    asks = [make(first + i) for i in range(c)]
    gens = [
        Generation(
            prompt=model.llama.tokenize(text, add_special=True),
            params=SamplingParams(**sampling),
            max_tokens=tokens,
        )
        for text, sampling in asks
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
    p.add_argument("--loaded-calibration", action="store_true")
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
            with busy_cores(2 if args.loaded_calibration else 0):
                model = LoadedModel(
                    spec, args.models_dir / spec.path, replace(config, draft_max=draft_max)
                )
                warm = KINDS["counting"]
                asyncio.run(one_level(model, warm, 1, 4, 0))  # served once costs are measured
            try:
                at_load = dict(model.scheduler._costs.ms)
                results[draft_max].append(run_all(model, args.tokens, r))
                if draft_max:
                    learned = model.scheduler._costs.ms
                    print("step ms by rows, at load -> after the run:", ", ".join(
                        f"{n}: {at_load.get(n, 0):.1f} -> {learned[n]:.1f}" for n in sorted(learned)
                    ))  # fmt: skip
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
