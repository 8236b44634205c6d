"""How often concurrent greedy requests give the same text as the same requests alone.

In-process on the default model: 16 prompts, 16 greedy tokens each, first one at a time on an
idle engine (each twice in a row: the second run finds its prefix in the cache), all of them
once more after the others ran, then in groups of 4 submitted together; last, alone again on an
engine with prompt-lookup drafts off (`--draft-max`, default thoxd's). Prints how many of the 16
match. Usage: .venv/bin/python bench/parity.py
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from pathlib import Path

from thoxd.catalog.entries import Catalog
from thoxd.engine.llama import backend_init, route_llama_logs
from thoxd.engine.model import EngineConfig, LoadedModel
from thoxd.engine.request import Delta, Generation
from thoxd.engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "Once upon a time",
    "The weather today is",
    "import numpy as np\n",
    "My favourite food is",
    "The quick brown fox",
    "SELECT * FROM users WHERE",
    "In 1969, astronauts",
    "To make a cup of tea,",
    "The best way to learn",
    "class Stack:\n    def",
    "Water boils at",
    "A haiku about autumn:",
    "The meaning of life is",
]


async def _text(model: LoadedModel, prompts: list[str], tokens: int) -> list[str]:
    gens = [
        Generation(
            prompt=model.llama.tokenize(p, add_special=True),
            params=SamplingParams(temperature=0.0),
            max_tokens=tokens,
        )
        for p in prompts
    ]
    for gen in gens:
        model.submit(gen)

    async def read(gen: Generation) -> str:
        return "".join([e.text async for e in gen.events() if isinstance(e, Delta)])

    return list(await asyncio.gather(*(read(g) for g in gens)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models-dir", type=Path, default=Path.home() / ".cache/thoxd-test")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--draft-max", type=int, default=EngineConfig.draft_max)
    args = p.parse_args()
    spec = Catalog.load(ROOT / "models.toml").get("gemma-3-270m")  # what RESULTS measured
    route_llama_logs()
    backend_init()
    config = EngineConfig(
        models_dir=args.models_dir,
        threads=2,
        slots=args.group,
        queue_size=64,
        batch_size=256,
        draft_max=args.draft_max,
    )
    model = LoadedModel(spec, args.models_dir / spec.path, config)
    try:

        async def run() -> tuple[list[str], list[str], list[str], list[str]]:
            alone, cached = [], []
            for q in PROMPTS:  # the second run of each prompt finds it in the cache
                alone.append((await _text(model, [q], args.tokens))[0])
                cached.append((await _text(model, [q], args.tokens))[0])
            later = [(await _text(model, [q], args.tokens))[0] for q in PROMPTS]
            together: list[str] = []
            for i in range(0, len(PROMPTS), args.group):
                together += await _text(model, PROMPTS[i : i + args.group], args.tokens)
            return alone, cached, later, together

        alone, cached, later, together = asyncio.run(run())
    finally:
        model.close()
    plain = LoadedModel(spec, args.models_dir / spec.path, replace(config, draft_max=0))
    try:

        async def run_plain() -> list[str]:
            return [(await _text(plain, [q], args.tokens))[0] for q in PROMPTS]

        undrafted = asyncio.run(run_plain())
    finally:
        plain.close()
    same_drafts = sum(a == u for a, u in zip(alone, undrafted, strict=True))
    same_cached = sum(a == c for a, c in zip(alone, cached, strict=True))
    same_later = sum(a == t for a, t in zip(alone, later, strict=True))
    same_together = sum(a == t for a, t in zip(alone, together, strict=True))
    n = len(PROMPTS)
    print(f"alone, cache miss vs cache hit: {same_cached}/{n} identical")
    print(f"alone, first run vs again after the others: {same_later}/{n} identical")
    print(f"alone vs {args.group} at a time: {same_together}/{n} identical ({args.tokens} tokens)")
    print(f"alone, draft_max {args.draft_max} vs 0: {same_drafts}/{n} identical")
    for q, a, c in zip(PROMPTS, alone, later, strict=True):
        if a != c:
            print(f"  later: {q!r}: {a!r} | {c!r}")
    for q, a, t in zip(PROMPTS, alone, together, strict=True):
        if a != t:
            print(f"  {q!r}: {a!r} | {t!r}")
    for q, a, u in zip(PROMPTS, alone, undrafted, strict=True):
        if a != u:
            print(f"  no drafts: {q!r}: {a!r} | {u!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
