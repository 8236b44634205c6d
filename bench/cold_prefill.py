"""Cold prefill: time to first token for a long prompt on an idle model, thoxd against
llama-server, side by side in one run (one server at a time, same GGUF, threads, slots, context).

For each prompt size (default 1000 and 4000 tokens) and each server: `--reps` prompts never seen
before (a new code-like text each, so nothing is cached), one at a time, streamed, max_tokens 1;
TTFT is request sent to first text chunk, as the client sees it. Reported: mean and min TTFT per
server, and thoxd / llama-server.

Then, with --beside (on by default), the same largest prompt arrives while a stream is running:
that stream's longest gap between two tokens while the prompt prefills, against its longest gap
before, and the prompt's TTFT beside it (thoxd prefills beside running streams in batch_size
chunks, one step at a time; llama-server in n_batch steps). Build llama-server first with
bench/build_llama_server.sh.
Usage: bench/cold_prefill.py [--sizes 1000,4000] [--reps 4] [--no-beside]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from concurrency import MODEL_ID, code_prefix, complete
from concurrency import machine as machine_info
from sides import add_server_args, each_side, report

FUNC_TOKENS = 72  # about what one code_prefix function costs in Gemma 3 tokens


async def cold_runs(url: str, size: int, reps: int, seed: int) -> list[dict[str, Any]]:
    runs = []
    for k in range(reps):
        text = code_prefix(seed + k, max(1, size // FUNC_TOKENS))
        runs.append(await complete(url, text + "# Q: what does the first function do?\n", 1))
    return runs


async def stream_arrivals(url: str, arrivals: list[float]) -> None:
    """A greedy counting stream, long enough to outlast the prompt; each chunk's arrival."""
    body = {"model": MODEL_ID, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 3000,
            "temperature": 0, "repeat_penalty": 1.0, "stream": True}  # fmt: skip
    async with (
        httpx.AsyncClient(base_url=url, timeout=300) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                arrivals.append(time.perf_counter())


def longest_gap_ms(arrivals: list[float], start: float, end: float) -> float:
    inside = [t for t in arrivals if start <= t <= end]
    return max((b - a for a, b in itertools.pairwise(inside)), default=0.0) * 1e3


async def beside(url: str, size: int, seed: int) -> dict[str, Any]:
    """A cold prompt of `size` tokens arriving while a stream runs: the stream's longest gap
    before it and while it prefills, and its TTFT."""
    arrivals: list[float] = []
    running = asyncio.create_task(stream_arrivals(url, arrivals))
    while len(arrivals) < 40:  # the stream is well under way
        await asyncio.sleep(0.01)
    sent = time.perf_counter()
    text = code_prefix(seed, max(1, size // FUNC_TOKENS))
    cold = await complete(url, text + "# Q: what does the first function do?\n", 1)
    first = sent + cold["ttft_ms"] / 1e3
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    return {
        "ttft_ms": cold["ttft_ms"],
        "prompt_tokens": cold["prompt_tokens"],
        "gap_before_ms": longest_gap_ms(arrivals, arrivals[0], sent),
        "gap_during_ms": longest_gap_ms(arrivals, sent, first),
        "tokens_during": sum(sent <= t <= first for t in arrivals),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_server_args(p)
    p.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1000, 4000])
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--no-beside", dest="beside", action="store_false")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    def measure(url: str) -> dict[Any, Any]:
        asyncio.run(complete(url, "Warm up: 1, 2, 3,", 4))
        found: dict[Any, Any] = {
            size: asyncio.run(cold_runs(url, size, args.reps, 5000 + size)) for size in args.sizes
        }
        if args.beside:
            found["beside"] = asyncio.run(beside(url, max(args.sizes), 90_000))  # never seen
        return found

    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args)}
    results.update(each_side(args, measure))
    lines = [
        "| prompt tokens | thoxd TTFT ms (mean / min) | llama-server TTFT ms (mean / min) "
        "| thoxd / llama-server (mean) |",
        "| - | - | - | - |",
    ]
    for size in args.sizes:
        a = [r["ttft_ms"] for r in results["thoxd"][size]]
        b = [r["ttft_ms"] for r in results["llama-server"][size]]
        tokens = results["thoxd"][size][0]["prompt_tokens"]
        lines.append(
            f"| {tokens} | {statistics.mean(a):.0f} / {min(a):.0f} | "
            f"{statistics.mean(b):.0f} / {min(b):.0f} | "
            f"{statistics.mean(a) / statistics.mean(b):.2f}x |"
        )
    if args.beside:
        lines += [
            "",
            "| beside a running stream | prompt TTFT ms | stream's longest gap before / while it "
            "prefills (ms) | stream tokens meanwhile |",
            "| - | - | - | - |",
        ]
        for name in ("thoxd", "llama-server"):
            b = results[name]["beside"]
            lines.append(
                f"| {name} ({b['prompt_tokens']} tokens) | {b['ttft_ms']:.0f} | "
                f"{b['gap_before_ms']:.0f} / {b['gap_during_ms']:.0f} | {b['tokens_during']} |"
            )
    return report(lines, results, args.json)


if __name__ == "__main__":
    sys.exit(main())
