"""The ceiling: llama.cpp driven directly, no server, no HTTP, no scheduling decisions.

Per round: C prompts prefilled in one batch, then one `llama_decode` per step with one token for
each of the C sequences, greedy (argmax over the logits), until each has `--tokens` tokens (or
an end-of-generation token). Aggregate tok/s = tokens / round wall time, as in concurrency.py,
with the same prompts, model, threads and context (8192 per slot, unified KV, full-size SWA).
No server can do the same requests with less work, so this is the most any of them can reach on
this machine; concurrency.py runs it between the servers.

`--step-cost` shows where a step's time goes: one decode step for n sequences, with logits for
every sequence and with logits for one only. The difference is the output layer (for Gemma 3
270M a 262 144 x 640 Q8_0 matrix, most of the model's weights), which no scheduler can skip.
Usage: bench/ceiling.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from concurrency import MODEL_FILE, N_CTX, counting_prompt

from thoxd.engine.llama import (
    Batch,
    ContextConfig,
    LlamaContext,
    LlamaModel,
    backend_init,
    route_llama_logs,
)

Picker = Callable[[LlamaContext, int], int]  # the token a sequence takes from a batch row


def greedy(ctx: LlamaContext, row: int) -> int:
    return int(np.argmax(ctx.logits(row)))


def prefill(ctx: LlamaContext, tokens: list[int], seq: int) -> None:
    """`tokens` into sequence `seq` (emptied first), in steps of the whole batch, no outputs."""
    ctx.seq_rm(seq, 0)
    batch = Batch(ctx.n_batch)
    try:
        for start in range(0, len(tokens), ctx.n_batch):
            batch.clear()
            batch.add_sequence(tokens[start : start + ctx.n_batch], start, seq)
            if ctx.decode(batch) != 0:
                raise RuntimeError("llama_decode failed")
    finally:
        batch.close()


def one_round(
    ctx: LlamaContext,
    prompts: list[list[int]],
    tokens: int,
    pickers: Sequence[Picker] = (),
    cached: tuple[int, int] = (0, 0),
) -> tuple[int, float]:
    """Generated tokens and wall seconds for C prompts decoded side by side (sequences 0..C-1),
    each sequence's tokens picked by its picker (greedy without). `cached` = (sequence, n): the
    prompts' first n tokens are that sequence's, copied instead of prefilled (a prefix cache)."""
    pick = list(pickers) or [greedy] * len(prompts)
    source, n_cached = cached
    batch = Batch(ctx.n_batch)
    model = ctx.model
    try:
        for seq in range(len(prompts)):
            ctx.seq_rm(seq, 0)
        t0 = time.perf_counter()
        for seq in range(len(prompts)) if n_cached else ():
            ctx.seq_cp(source, seq, 0, n_cached)
        # Every prompt token, the last ones (with logits) at the end; in steps of the whole
        # batch (as llama-server), the first one short so that the last holds all of those.
        rows = [
            (t, i, seq, False)
            for seq, p in enumerate(prompts)
            for i, t in enumerate(p[:-1])
            if i >= n_cached
        ]
        rows += [(p[-1], len(p) - 1, seq, True) for seq, p in enumerate(prompts)]
        n, first = ctx.n_batch, len(rows) % ctx.n_batch or ctx.n_batch
        chunks = [rows[:first]] + [rows[s : s + n] for s in range(first, len(rows), n)]
        index = {}
        for k, chunk in enumerate(chunks):
            if k:  # the chunk before, without outputs
                if ctx.decode(batch) != 0:
                    raise RuntimeError("llama_decode failed")
                batch.clear()
            for token, i, seq, last in chunk:
                row = batch.add(token, i, seq, logits=last)
                if last:
                    index[seq] = row
        pos = {seq: len(p) for seq, p in enumerate(prompts)}
        made = dict.fromkeys(index, 0)
        while index:
            if ctx.decode(batch) != 0:
                raise RuntimeError("llama_decode failed")
            picks = {seq: pick[seq](ctx, i) for seq, i in index.items()}
            batch.clear()
            index = {}
            for seq, token in picks.items():
                made[seq] += 1
                if made[seq] < tokens and not model.is_eog(token):
                    index[seq] = batch.add(token, pos[seq], seq, logits=True)
                    pos[seq] += 1
        return sum(made.values()), time.perf_counter() - t0
    finally:
        batch.close()


def step_cost(ctx: LlamaContext, n: int, all_outputs: bool, steps: int = 24) -> float:
    """Median milliseconds of one decode step with one token for each of n sequences."""
    ctx.clear()
    batch = Batch(512)
    prompt = ctx.model.tokenize(counting_prompt(3), add_special=True)
    try:
        for seq in range(n):
            batch.add_sequence(prompt, 0, seq)
        if ctx.decode(batch) != 0:
            raise RuntimeError("llama_decode failed")
        times = []
        for step in range(steps):
            batch.clear()
            for seq in range(n):
                batch.add(1000 + step, len(prompt) + step, seq, logits=all_outputs or seq == 0)
            t0 = time.perf_counter()
            if ctx.decode(batch) != 0:
                raise RuntimeError("llama_decode failed")
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000
    finally:
        batch.close()


def print_step_costs(ctx: LlamaContext, slots: int) -> None:
    print("sequences | ms/step, all outputs | ms/step, one output | ms per further output")
    for n in (1, 2, 4, 8):
        if n <= slots:
            every, one = step_cost(ctx, n, True), step_cost(ctx, n, False)
            extra = f"{(every - one) / (n - 1):.1f}" if n > 1 else "-"
            print(f"{n:9} | {every:20.1f} | {one:19.1f} | {extra}")


def open_context(model_file: Path, threads: int, slots: int) -> tuple[LlamaModel, LlamaContext]:
    """The model and a context shaped as the servers' are (bench/sides.py)."""
    route_llama_logs()
    backend_init()
    model = LlamaModel(model_file)
    config = ContextConfig(
        n_ctx=N_CTX * slots, n_seq_max=slots, n_batch=2048, n_ubatch=512, n_threads=threads
    )
    return model, LlamaContext(model, config)


def measure(model_file: Path, threads: int, slots: int, levels: list[int], rounds: int,
            tokens: int, step_costs: bool = False) -> dict[int, dict[str, Any]]:  # fmt: skip
    """{C: tok/s per round and their mean}, with the prompts concurrency.py's load sends."""
    model, ctx = open_context(model_file, threads, slots)
    try:
        one_round(ctx, [model.tokenize(counting_prompt(7), add_special=True)], 16)  # warm-up
        if step_costs:
            print_step_costs(ctx, slots)
        out: dict[int, dict[str, Any]] = {}
        for c in levels:
            rates = []
            for r in range(rounds):
                prompts = [counting_prompt(101 + 37 * (100 * c + 10 * r + i)) for i in range(c)]
                made, wall = one_round(ctx, [model.tokenize(p, add_special=True) for p in prompts],
                                       tokens)  # fmt: skip
                rates.append(made / wall)
            out[c] = {"tok_s": statistics.mean(rates), "tok_s_rounds": rates}
        return out
    finally:
        ctx.close()
        model.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", type=Path, default=Path.home() / ".cache/thoxd-test")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    p.add_argument("--step-cost", action="store_true", help="first print the cost of one step")
    args = p.parse_args()
    if max(args.concurrency) > args.slots:
        p.error("every concurrency level must fit in --slots (one sequence per slot)")
    if args.json and args.step_cost:
        p.error("--step-cost prints a table; it does not go with --json")
    result = measure(args.models_dir / MODEL_FILE, args.threads, args.slots, args.concurrency,
                     args.rounds, args.tokens, args.step_cost)  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        for c, r in result.items():
            print(f"llama.cpp direct C={c}: {r['tok_s']:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
