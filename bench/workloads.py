"""Workloads beyond counting: thoxd against llama-server, side by side in one run.

Counting text flatters prompt lookup (its drafts come true), so this measures three loads a
user actually sends, each on /v1/completions with the same sampling on both servers:

    prose   a short story, sampled at temperature 0.8 (top_k 40, top_p 0.95, min_p 0.05) with a
            seed per request
    code    a function rewritten at temperature 0 (much of the answer repeats the prompt)
    chat    a long system prompt (~700 tokens, the same for every request: a prefix-cache hit
            after the first) and a short question, temperature 0.7 with a seed

at C = 1, 4 and 8 concurrent streams, `--rounds` rounds each, new prompts every round; aggregate
tok/s and mean TTFT. One server at a time, same GGUF, threads, slots and context as
bench/concurrency.py. Then the ceiling: llama.cpp driven directly (bench/ceiling.py, no server)
with the same prompts, the same sampling done by llama.cpp's own sampler chain, at most `--slots`
sequences at once (C=8 on 4 slots: two waves of four, the most a 4-slot server can run).
Usage: bench/workloads.py [--rounds 3] [--tokens 128] [--draft-max N] [--no-ceiling]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
from ceiling import Picker, greedy, one_round, open_context, prefill
from concurrency import MODEL_FILE, MODEL_ID, WORDS, code_prefix
from concurrency import machine as machine_info
from sides import add_server_args, each_side, report

from thoxd.engine.placement import common_prefix

RULES = (
    f"Rule {i}: prefer {w} solutions that keep {w} data local." for i, w in enumerate(WORDS * 6)
)
SYSTEM = "You are the assistant of a small engineering team. Answer briefly. " + " ".join(RULES)


def prompt(kind: str, k: int) -> tuple[str, dict[str, Any]]:
    word = WORDS[k % len(WORDS)]
    if kind == "prose":
        sampling = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": k}
        return f"Write a short story about a {word} lighthouse keeper named {k}.\n\n", sampling
    if kind == "code":
        code = code_prefix(k, 2)
        return code + "# The same two functions, rewritten with type hints:\n", {"temperature": 0}
    question = f"Question {k}: how should we name the {word} service? Answer:"
    return f"{SYSTEM}\n\n{question}", {"temperature": 0.7, "seed": k}


async def stream(url: str, text: str, sampling: dict[str, Any], tokens: int) -> dict[str, float]:
    body = {"model": MODEL_ID, "prompt": text, "max_tokens": tokens, "repeat_penalty": 1.0,
            "stream": True, "stream_options": {"include_usage": True}, **sampling}  # fmt: skip
    t0, first, n = time.perf_counter(), 0.0, 0
    async with (
        httpx.AsyncClient(base_url=url, timeout=300) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices") or []):
                first = first or time.perf_counter()
    return {"ttft_ms": ((first or time.perf_counter()) - t0) * 1e3, "tokens": n}


async def load(url: str, kind: str, c: int, rounds: int, tokens: int) -> dict[str, float]:
    rates, ttft = [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        done = await asyncio.gather(
            *(stream(url, *prompt(kind, 1000 * c + 10 * r + i), tokens) for i in range(c))
        )
        rates.append(sum(d["tokens"] for d in done) / (time.perf_counter() - t0))
        ttft += [d["ttft_ms"] for d in done]
    return {"tok_s": statistics.mean(rates), "ttft_ms": statistics.mean(ttft)}


def picker(sampling: dict[str, Any], chains: list[Any]) -> Picker:
    """What llama.cpp itself would pick with these settings: greedy at temperature 0, else
    llama-server's default chain (top_k 40, top_p 0.95, min_p 0.05), then temperature and seed."""
    if not sampling["temperature"]:
        return greedy
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for sampler in (
        llama_cpp.llama_sampler_init_top_k(sampling.get("top_k", 40)),
        llama_cpp.llama_sampler_init_top_p(sampling.get("top_p", 0.95), 1),
        llama_cpp.llama_sampler_init_min_p(sampling.get("min_p", 0.05), 1),
        llama_cpp.llama_sampler_init_temp(sampling["temperature"]),
        llama_cpp.llama_sampler_init_dist(sampling["seed"]),
    ):
        llama_cpp.llama_sampler_chain_add(chain, sampler)
    chains.append(chain)
    return lambda ctx, row: int(llama_cpp.llama_sampler_sample(chain, ctx.ptr, row))


def direct(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The ceiling: each workload's rounds decoded by llama.cpp directly, `--slots` at a time."""
    # One sequence more than the servers' slots: it holds the chat's system prompt, which every
    # chat request copies instead of prefilling, as the servers' prefix caches do.
    model, ctx = open_context(args.models_dir / MODEL_FILE, args.threads, args.slots + 1)
    out = {}
    try:
        one_round(ctx, [model.tokenize("Warm up: 1, 2, 3,", add_special=True)], 8)
        for kind in args.kinds:
            system = [model.tokenize(prompt(kind, k)[0], add_special=True) for k in (0, 1)]
            n_cached = max(common_prefix(*system) - 2, 0) if kind == "chat" else 0
            # Timed, and counted in the first level's wall: the servers' first chat request
            # prefills it too.
            started = time.perf_counter()
            if n_cached:
                prefill(ctx, system[0][:n_cached], args.slots)
            first_wall = time.perf_counter() - started
            for c in args.concurrency:
                rates = []  # per round, as `load` takes them from the servers
                for r in range(args.rounds):
                    made, wall, first_wall = 0, first_wall, 0.0
                    asks = [prompt(kind, 1000 * c + 10 * r + i) for i in range(c)]
                    for w in range(0, c, args.slots):
                        wave, chains = asks[w : w + args.slots], []
                        try:
                            n, s = one_round(
                                ctx,
                                [model.tokenize(text, add_special=True) for text, _ in wave],
                                args.tokens,
                                [picker(sampling, chains) for _, sampling in wave],
                                cached=(args.slots, n_cached),
                            )
                        finally:
                            for chain in chains:
                                llama_cpp.llama_sampler_free(chain)
                        made, wall = made + n, wall + s
                    rates.append(made / wall)
                out[f"{kind} C={c}"] = {"tok_s": statistics.mean(rates)}
    finally:
        ctx.close()
        model.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_server_args(p)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    levels = lambda v: [int(x) for x in v.split(",")]  # noqa: E731
    p.add_argument("--concurrency", type=levels, default=[1, 4, 8])
    p.add_argument("--kinds", type=lambda v: v.split(","), default=["prose", "code", "chat"])
    p.add_argument("--json", type=Path)
    p.add_argument("--no-ceiling", action="store_true", help="skip llama.cpp driven directly")
    args = p.parse_args()

    def measure(url: str) -> dict[str, dict[str, float]]:
        asyncio.run(stream(url, "Warm up: 1, 2, 3,", {"temperature": 0}, 8))
        return {
            f"{kind} C={c}": asyncio.run(load(url, kind, c, args.rounds, args.tokens))
            for kind in args.kinds
            for c in args.concurrency
        }

    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args)}
    results.update(each_side(args, measure))
    if not args.no_ceiling:
        print("== llama.cpp direct", flush=True)
        results["direct"] = direct(args)
    lines = [
        "| workload | thoxd tok/s | llama-server tok/s | thoxd / llama-server | direct tok/s | "
        "thoxd / direct | llama-server / direct | thoxd TTFT ms | llama-server TTFT ms |",
        "| - | - | - | - | - | - | - | - | - |",
    ]
    for key, a in results["thoxd"].items():
        b = results["llama-server"][key]
        top = results.get("direct", {}).get(key, {}).get("tok_s")
        vs = f"{top:.1f} | {a['tok_s'] / top:.2f} | {b['tok_s'] / top:.2f}" if top else "- | - | -"
        lines.append(
            f"| {key} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {a['tok_s'] / b['tok_s']:.2f}x | "
            f"{vs} | {a['ttft_ms']:.0f} | {b['ttft_ms']:.0f} |"
        )
    return report(lines, results, args.json)


if __name__ == "__main__":
    sys.exit(main())
