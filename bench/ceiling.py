"""The ceiling: llama.cpp driven directly, no server, no HTTP, no scheduling decisions.

Per round: C prompts prefilled in one batch, then one `llama_decode` per step with one token for
each of the C sequences, greedy (argmax over the logits), until each has `--tokens` tokens (or
an end-of-generation token). Aggregate tok/s = tokens / round wall time, as in concurrency.py,
with the same prompts, model, threads and context (8192 per slot, unified KV, full-size SWA).
No server can do the same requests with less work, so this is the most any of them can reach on
this machine; concurrency.py runs it between the servers. Usage: bench/ceiling.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
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


def one_round(ctx: LlamaContext, prompts: list[list[int]], tokens: int) -> tuple[int, float]:
    """Generated tokens and wall seconds for C prompts decoded side by side."""
    ctx.clear()
    batch = Batch(max(sum(len(p) for p in prompts), len(prompts)))
    model = ctx.model
    try:
        t0 = time.perf_counter()
        index = {}
        for seq, prompt in enumerate(prompts):
            batch.add_sequence(prompt[:-1], 0, seq)
            index[seq] = batch.add(prompt[-1], len(prompt) - 1, seq, logits=True)
        pos = {seq: len(p) for seq, p in enumerate(prompts)}
        made = dict.fromkeys(index, 0)
        while index:
            if ctx.decode(batch) != 0:
                raise RuntimeError("llama_decode failed")
            picks = {seq: int(np.argmax(ctx.logits(i))) for seq, i in index.items()}
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


def measure(model_file: Path, threads: int, slots: int, levels: list[int], rounds: int,
            tokens: int) -> dict[int, dict[str, Any]]:  # fmt: skip
    """{C: tok/s per round and their mean}, with the prompts concurrency.py's load sends."""
    route_llama_logs()
    backend_init()
    model = LlamaModel(model_file)
    config = ContextConfig(n_ctx=N_CTX * slots, n_seq_max=slots, n_batch=512, n_threads=threads)
    ctx = LlamaContext(model, config)
    try:
        one_round(ctx, [model.tokenize(counting_prompt(7), add_special=True)], 16)  # warm-up
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
    args = p.parse_args()
    if max(args.concurrency) > args.slots:
        p.error("every concurrency level must fit in --slots (one sequence per slot)")
    result = measure(args.models_dir / MODEL_FILE, args.threads, args.slots, args.concurrency,
                     args.rounds, args.tokens)  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        for c, r in result.items():
            print(f"llama.cpp direct C={c}: {r['tok_s']:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
