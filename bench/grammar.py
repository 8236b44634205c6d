"""JSON-schema-constrained decoding: thoxd against itself unconstrained and against llama-server
constrained by the same schema, side by side in one run.

Gemma 3 270M (a 262 144-token vocabulary: what makes a naive grammar expensive), the same GGUF,
threads and slots for both servers, one server at a time. For each server and C = 1 and 4
concurrent streaming /v1/completions clients, `--rounds` rounds of new prompts (so no prefix
cache helps), sampled at temperature 0.8 with a seed per request: aggregate decode tok/s with
the schema (thoxd: `response_format` json_schema; llama-server: its `json_schema` field, the
grammar it builds the same way) and without it. Every constrained answer that ended by itself
is parsed and counted. Prints the ratios the issue asks for: constrained / unconstrained (thoxd,
target >= 0.85) and thoxd / llama-server constrained (target >= 1.0).
Build llama-server first with bench/build_llama_server.sh. Usage: bench/grammar.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrency import N_CTX, ROOT, Server, free_port, machine, no_repack

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "city": {"type": "string"},
        "bio": {"type": "string"},
        "skills": {"type": "array", "items": {"type": "string"}},
        "years": {"type": "integer"},
    },
    "required": ["name", "city", "bio", "skills", "years"],
    "additionalProperties": False,
}
TOPICS = ("a chef", "a pilot", "a painter", "a nurse", "a coder", "a farmer", "a judge", "a poet")


def body(server: str, prompt: str, seed: int, max_tokens: int, constrained: bool) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": "gemma-3-270m",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
        "min_p": 0.05,
        "repeat_penalty": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if constrained and server == "thoxd":
        b["response_format"] = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    elif constrained:
        b["json_schema"] = SCHEMA
    return b


async def one(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    arrivals: list[float] = []
    texts: list[str] = []
    usage: dict[str, Any] = {}
    finish = None
    async with (
        httpx.AsyncClient(base_url=url, timeout=300) as client,
        client.stream("POST", "/v1/completions", json=payload) as response,
    ):
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                finish = choice.get("finish_reason") or finish
                if choice.get("text"):
                    arrivals.append(time.perf_counter())
                    texts.append(choice["text"])
    tokens = usage.get("completion_tokens") or len(arrivals)
    return {"tokens": tokens, "first": arrivals[0] if arrivals else None,
            "last": arrivals[-1] if arrivals else None, "text": "".join(texts),
            "finish": finish}  # fmt: skip


async def load(server: str, url: str, c: int, rounds: int, tokens: int, constrained: bool,
               start: int) -> dict[str, Any]:  # fmt: skip
    done: list[dict[str, Any]] = []
    decode_s = 0.0
    for r in range(rounds):
        jobs = []
        for i in range(c):
            n = start + r * c + i
            prompt = f"Record {n}: describe {TOPICS[n % len(TOPICS)]} (#{n}) as JSON.\n"
            jobs.append(one(url, body(server, prompt, n, tokens, constrained)))
        results = await asyncio.gather(*jobs)
        firsts = [x["first"] for x in results if x["first"]]
        lasts = [x["last"] for x in results if x["last"]]
        decode_s += max(lasts) - min(firsts)
        done += results
    generated = sum(max(x["tokens"] - 1, 0) for x in done)
    valid = 0
    ended = [x for x in done if x["finish"] == "stop"]
    for x in ended:
        try:
            document = json.loads(x["text"])
            valid += set(document) == set(SCHEMA["properties"])
        except ValueError:
            pass
    return {"tok_s": generated / decode_s if decode_s else 0.0, "tokens": generated,
            "ended": len(ended), "valid": valid, "requests": len(done)}  # fmt: skip


def main() -> int:
    version = importlib.metadata.version("llama-cpp-python")
    p = argparse.ArgumentParser(description=__doc__)
    server_bin = ROOT / f"bench/.build/llama-build-{version}/bin/llama-server"
    p.add_argument("--llama-server", type=Path, default=server_bin)
    p.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "thoxd-test")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=96, help="max_tokens per request")
    p.add_argument("--json", type=Path, help="save every number here")
    args = p.parse_args()
    model = args.models_dir / MODEL_FILE
    if not args.llama_server.exists():
        p.error(f"{args.llama_server} is missing: run bench/build_llama_server.sh")
    t, n = str(args.threads), args.slots
    results: dict[str, Any] = {
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="thoxd-grammar-") as tmp:
        port = free_port()
        cmds = {
            "thoxd": [sys.executable, "-m", "thoxd", "serve", "--host", "127.0.0.1",
                      "--port", str(port), "--models-dir", str(args.models_dir),
                      "--state-dir", tmp, "--threads", t, "--slots", str(n),
                      "--default-model", "gemma-3-270m", "--log-level", "warning",
                      "--mdns", "false"],
            "llama-server": [str(args.llama_server), "-m", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "-t", t, "-tb", t, "-np", str(n),
                             "-c", str(N_CTX * n), "--kv-unified", "--swa-full", "--no-webui",
                             *no_repack()],
        }  # fmt: skip
        for name, cmd in cmds.items():
            print(f"== {name}", flush=True)
            server = Server(name, cmd, port, Path(tmp) / f"{name}.log")
            try:
                server.wait_ready()
                asyncio.run(load(name, server.url, 1, 1, 8, True, 10_000))  # warm-up
                results[name] = {}
                for c in (1, 4):
                    for constrained in (False, True):
                        key = f"C{c}-{'json' if constrained else 'free'}"
                        start = 1000 * c + (500 if constrained else 0)
                        r = asyncio.run(load(name, server.url, c, args.rounds, args.tokens,
                                             constrained, start))  # fmt: skip
                        results[name][key] = r
                        print(f"  {key}: {r}", flush=True)
            finally:
                server.stop()
    th, ls = results["thoxd"], results["llama-server"]
    print("\n| C | thoxd free | thoxd json | json/free | llama-server json | thoxd/llama-server |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c in (1, 4):
        free, js, ljs = (
            th[f"C{c}-free"]["tok_s"],
            th[f"C{c}-json"]["tok_s"],
            ls[f"C{c}-json"]["tok_s"],
        )
        print(f"| {c} | {free:.1f} | {js:.1f} | {js / free:.2f}x | {ljs:.1f} | {js / ljs:.2f}x |")
    for name in ("thoxd", "llama-server"):
        for c in (1, 4):
            r = results[name][f"C{c}-json"]
            print(f"{name} C={c}: {r['valid']}/{r['ended']} ended answers valid "
                  f"({r['requests']} requests)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
