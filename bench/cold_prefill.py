"""Cold prefill: time to first token for a long prompt on an idle model, thoxd against
llama-server, side by side in one run (one server at a time, same GGUF, threads, slots, context).

For each prompt size (default 1000 and 4000 tokens) and each server: `--reps` prompts never seen
before (a new code-like text each, so nothing is cached), one at a time, streamed, max_tokens 1;
TTFT is request sent to first text chunk, as the client sees it. Reported: mean and min TTFT per
server, and thoxd / llama-server. Build llama-server first with bench/build_llama_server.sh.
Usage: bench/cold_prefill.py [--sizes 1000,4000] [--reps 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path
from typing import Any

from concurrency import code_prefix, complete
from concurrency import machine as machine_info
from sides import add_server_args, each_side, report

FUNC_TOKENS = 72  # about what one code_prefix function costs in Gemma 3 tokens


async def cold_runs(url: str, size: int, reps: int, seed: int) -> list[dict[str, Any]]:
    runs = []
    for k in range(reps):
        text = code_prefix(seed + k, max(1, size // FUNC_TOKENS))
        runs.append(await complete(url, text + "# Q: what does the first function do?\n", 1))
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_server_args(p)
    p.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1000, 4000])
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    def measure(url: str) -> dict[int, list[dict[str, Any]]]:
        asyncio.run(complete(url, "Warm up: 1, 2, 3,", 4))
        return {
            size: asyncio.run(cold_runs(url, size, args.reps, 5000 + size)) for size in args.sizes
        }

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
    return report(lines, results, args.json)


if __name__ == "__main__":
    sys.exit(main())
