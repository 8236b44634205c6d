"""Concurrency: thoxd against llama.cpp's own llama-server, side by side in one run.

Same GGUF file, threads, slots (`--slots`, default 4: thoxd --slots N, llama-server -np N; 8
streams on 4 slots queue on both), context per request (8192; llama-server -c 8192*N) and a
unified KV cache with full-size SWA; everything else at each server's defaults. One server at a
time, never both (they would fight for the cores). For each: C concurrent streaming clients
(C = 1, 4, 8) on /v1/completions, greedy, `--rounds` rounds, new prompts every round: aggregate
tok/s (tokens received / round wall time), TTFT (request sent to first text chunk, mean and
p95); cold vs prefix-cached TTFT for a ~1000-token code-like prefix (a new one per cold run);
/health latency while 4 streams run. Each phase also notes how many cores other processes kept
busy (above ~0.1 the numbers are not to be trusted). Last, with both servers stopped,
bench/ceiling.py drives llama.cpp directly with the same C=1 and C=4 requests: the most any
server can reach on this machine, so how much room each target leaves.
Build llama-server first with bench/build_llama_server.sh. Usage: bench/concurrency.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from thoxd.engine.devices import repacks_safely

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
MODEL_ID = "gemma-3-270m"  # by id: llama-server runs the same file (thox-coder is SmolLM2)
N_CTX = 8192
HZ = os.sysconf("SC_CLK_TCK")
WORDS = ("alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo", "lima", "mike")


def no_repack() -> list[str]:
    """llama-server's flag that keeps its weights unrepacked where thoxd keeps them so (a build
    with AMX kernels, which crash: thoxd/engine/devices.py)."""
    return [] if repacks_safely() else ["--no-repack"]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def busy_jiffies(pid: int | None = None) -> int:
    """CPU time used so far: by the whole machine, or by one process (all its threads)."""
    if pid is None:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[11]) + int(stat[12])  # utime + stime


class Server:
    """One server process on a loopback port; stopped (and waited for) on exit."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path) -> None:
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} did not get ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def complete(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streaming /v1/completions request, timed by the client at each SSE chunk."""
    body = {
        "model": MODEL_ID,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,  # thoxd's catalog default is 1.1; llama-server's is 1.0
        "cache_prompt": True,  # llama-server's default, said out loud; thoxd ignores it
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    texts: list[str] = []
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    first = 0.0
    t0 = time.perf_counter()
    async with (
        httpx.AsyncClient(base_url=url, timeout=120) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    first = first or time.perf_counter()
                    texts.append(choice["text"])
    end = time.perf_counter()
    tokens = usage.get("completion_tokens") or timings.get("predicted_n") or len(texts)
    return {
        "ttft_ms": ((first or end) - t0) * 1e3,
        "tokens": tokens,
        "prompt_tokens": usage.get("prompt_tokens"),
        "cache_n": timings.get("cache_n"),
        "text": "".join(texts),
    }


def counting_prompt(start: int) -> str:
    word = WORDS[start % len(WORDS)]
    return f"{word.title()} count: " + " ".join(f"{start + i}," for i in range(8))


async def load(url: str, c: int, rounds: int, max_tokens: int) -> dict[str, Any]:
    """`rounds` rounds of C concurrent streams; aggregate tok/s = tokens received / round wall."""
    rates, requests = [], []
    for r in range(rounds):
        prompts = [counting_prompt(101 + 37 * (100 * c + 10 * r + i)) for i in range(c)]
        t0 = time.perf_counter()
        done = await asyncio.gather(*(complete(url, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - t0
        rates.append(sum(d["tokens"] for d in done) / wall)
        requests += done
    ttft = [d["ttft_ms"] for d in requests]
    return {
        "tok_s": statistics.mean(rates),
        "tok_s_rounds": rates,
        "ttft_mean_ms": statistics.mean(ttft),
        "ttft_p95_ms": percentile(ttft, 0.95),
        "requests": requests,
    }


def code_prefix(seed: int, n_funcs: int) -> str:
    """A code-like system text, different for every seed (so a cold run is really cold)."""
    rng = random.Random(seed)
    out = ["# You are a coding assistant. The user's project follows.\n"]
    for _ in range(n_funcs):
        a, b, c = (rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(3))
        out.append(
            f"def {a}_{b}({c}, limit={rng.randrange(99)}):\n"
            f'    """Return the {b} of {c} up to limit."""\n'
            f"    total = {rng.randrange(1000)}\n"
            f"    for item in {c}[:limit]:\n"
            f"        total += item * {rng.randrange(17)}\n"
            f"    return total\n\n"
        )
    return "".join(out)


async def prefix(url: str, reps: int, n_funcs: int) -> dict[str, Any]:
    cold, cached = [], []
    for k in range(reps):
        text = code_prefix(1000 + k, n_funcs)
        cold.append(await complete(url, text + "# Q: what does the first function do?\n", 8))
        cached.append(await complete(url, text + "# Q: name the last function's loop.\n", 8))
    c = statistics.mean(d["ttft_ms"] for d in cold)
    h = statistics.mean(d["ttft_ms"] for d in cached)
    return {"cold_ms": c, "cached_ms": h, "ratio": h / c, "cold": cold, "cached": cached}


async def health(url: str, polls: int, max_tokens: int) -> dict[str, Any]:
    """GET /health from a thread (its own client) while 4 streams run."""
    lat: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while len(lat) < polls and not stop.is_set():
                t0 = time.perf_counter()
                client.get("/health").raise_for_status()
                lat.append((time.perf_counter() - t0) * 1e3)
                time.sleep(0.02)

    streams = [complete(url, counting_prompt(9001 + 53 * i), max_tokens) for i in range(4)]
    task = asyncio.gather(*streams)
    await asyncio.sleep(0.5)  # let the streams get going
    poller = asyncio.create_task(asyncio.to_thread(poll))
    await task
    stop.set()
    await poller
    return {"n": len(lat), "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99)}


def phase(server: Server, result: dict[str, Any], key: str, work: Any) -> Any:
    """Run one phase; note how many cores other processes kept busy meanwhile (want ~0)."""
    busy, own, me = busy_jiffies(), busy_jiffies(server.proc.pid), time.process_time()
    t0 = time.monotonic()
    out = asyncio.run(work)
    wall = time.monotonic() - t0
    others = (busy_jiffies() - busy - busy_jiffies(server.proc.pid) + own) / HZ
    result["other_load"][key] = round(max(0.0, others - time.process_time() + me) / wall, 2)
    result["wall_s"] += wall
    return out


def measure(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    server.wait_ready()
    asyncio.run(complete(server.url, counting_prompt(7), 16))  # warm-up
    result: dict[str, Any] = {"load": {}, "other_load": {}, "wall_s": 0.0}
    for c in args.concurrency:
        work = load(server.url, c, args.rounds, args.tokens)
        result["load"][c] = phase(server, result, f"C={c}", work)
        print(f"  {server.name} C={c}: {result['load'][c]['tok_s']:.1f} tok/s", flush=True)
    work = prefix(server.url, args.prefix_reps, args.prefix_funcs)
    result["prefix"] = phase(server, result, "prefix", work)
    work = health(server.url, args.health_polls, 2 * args.tokens)
    result["health"] = phase(server, result, "health", work)
    print(f"  {server.name} other load (cores): {result['other_load']}", flush=True)
    return result


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if "model name" in ln), "?")
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem, 1),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def table(t: dict[str, Any], s: dict[str, Any], args: argparse.Namespace) -> list[str]:
    rows = [("metric", "thoxd", "llama-server", "thoxd/llama-server", "target", "met")]

    def row(name: str, a: float, b: float, target: str = "", ok: bool | None = None) -> None:
        met = "" if ok is None else ("yes" if ok else "NO")
        rows.append((name, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x", target, met))

    for c in args.concurrency:
        lt, ls = t["load"][c], s["load"][c]
        tgt = {1: 1.0, 4: 1.1}.get(c, 0.0)
        ok = lt["tok_s"] / ls["tok_s"] >= tgt if tgt else None
        row(f"C={c} aggregate tok/s", lt["tok_s"], ls["tok_s"], f">= {tgt}x" * bool(tgt), ok)
        ok = lt["ttft_mean_ms"] <= ls["ttft_mean_ms"] if c == 4 else None
        row(f"C={c} mean TTFT ms", lt["ttft_mean_ms"], ls["ttft_mean_ms"], "<= 1x" * (c == 4), ok)
        row(f"C={c} p95 TTFT ms", lt["ttft_p95_ms"], ls["ttft_p95_ms"])
    pt, ps = t["prefix"], s["prefix"]
    row("prefix cold TTFT ms", pt["cold_ms"], ps["cold_ms"])
    row("prefix cached TTFT ms", pt["cached_ms"], ps["cached_ms"])
    ok = pt["ratio"] <= 0.15
    rows.append(("cached/cold", f"{pt['ratio']:.3f}", f"{ps['ratio']:.3f}", "", "thoxd <= 0.15",
                 "yes" if ok else "NO"))  # fmt: skip
    ht, hs = t["health"], s["health"]
    row("/health p50 ms (4 streams)", ht["p50_ms"], hs["p50_ms"])
    row("/health p99 ms (4 streams)", ht["p99_ms"], hs["p99_ms"], "thoxd < 50", ht["p99_ms"] < 50)
    w = [max(len(r[i]) for r in rows) for i in range(6)]
    rows.insert(1, tuple("-" * n for n in w))
    return ["| " + " | ".join(v.ljust(n) for v, n in zip(r, w, strict=True)) + " |" for r in rows]


def ceiling(args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """bench/ceiling.py in its own process (the servers are stopped): C=1 and C=4."""
    cmd = [sys.executable, str(ROOT / "bench/ceiling.py"), "--json",
           "--models-dir", str(args.models_dir), "--threads", str(args.threads),
           "--slots", str(args.slots), "--concurrency", "1,4", "--rounds", str(args.rounds),
           "--tokens", str(args.tokens)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {int(c): r for c, r in json.loads(out).items()}


def ceiling_table(t: dict[str, Any], s: dict[str, Any], direct: dict[int, Any]) -> list[str]:
    """Both servers against llama.cpp driven directly: how much room the targets leave."""
    lines = [
        "| C | llama.cpp direct tok/s | thoxd / direct | llama-server / direct | target / direct |",
        "| - | ---------------------- | -------------- | --------------------- | --------------- |",
    ]
    for c, target in ((1, 1.0), (4, 1.1)):
        d, a, b = direct[c]["tok_s"], t["load"][c]["tok_s"], s["load"][c]["tok_s"]
        lines.append(f"| {c} | {d:.1f} | {a / d:.2f} | {b / d:.2f} | {target * b / d:.2f} |")
    return lines


def main() -> int:
    version = importlib.metadata.version("llama-cpp-python")
    default_bin = ROOT / f"bench/.build/llama-build-{version}/bin/llama-server"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-server", type=Path, default=default_bin)
    p.add_argument("--models-dir", type=Path, default=Path.home() / ".cache/thoxd-test")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--slots", type=int, default=4, help="thoxd --slots and llama-server -np")
    p.add_argument(
        "--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 8]
    )
    p.add_argument("--rounds", type=int, default=4, help="rounds per concurrency level")
    p.add_argument("--tokens", type=int, default=128, help="max_tokens per stream")
    p.add_argument("--prefix-reps", type=int, default=4)
    p.add_argument("--prefix-funcs", type=int, default=14, help="size of the shared prefix")
    p.add_argument("--health-polls", type=int, default=200)
    p.add_argument("--draft-max", type=int, help="thoxd --draft-max (prompt-lookup drafts; 0: off)")
    p.add_argument(
        "--llama-server-args",
        default="",
        help="more llama-server flags, e.g. '--spec-type ngram-simple'",
    )
    p.add_argument("--first", choices=["thoxd", "llama-server"], default="thoxd")
    p.add_argument("--json", type=Path, help="save every number here")
    p.add_argument("--no-ceiling", action="store_true", help="skip llama.cpp driven directly")
    args = p.parse_args()
    if 4 not in args.concurrency or 1 not in args.concurrency:
        p.error("--concurrency must include 1 and 4 (the targets)")
    model = args.models_dir / MODEL_FILE
    if not args.llama_server.exists():
        p.error(f"{args.llama_server} is missing: run bench/build_llama_server.sh")
    if not model.exists():
        p.error(f"{model} is missing")
    t, n = str(args.threads), args.slots
    results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="thoxd-conc-") as tmp:
        port = free_port()
        drafts = [] if args.draft_max is None else ["--draft-max", str(args.draft_max)]
        cmds = {
            "thoxd": [sys.executable, "-m", "thoxd", "serve", "--host", "127.0.0.1",
                      "--port", str(port), "--models-dir", str(args.models_dir),
                      "--state-dir", tmp, "--threads", t, "--slots", str(n),
                      "--log-level", "warning", "--default-model", MODEL_ID, *drafts],
            "llama-server": [str(args.llama_server), "-m", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "-t", t, "-tb", t, "-np", str(n),
                             "-c", str(N_CTX * n), "--kv-unified", "--swa-full", "--no-webui",
                             *no_repack(), *args.llama_server_args.split()],
        }  # fmt: skip
        for name in sorted(cmds, key=lambda k: k != args.first):
            cmd = cmds[name]
            print(f"== {name}: {' '.join(cmd)}", flush=True)
            results[name + "_cmd"] = cmd
            server = Server(name, cmd, port, Path(tmp) / f"{name}.log")
            try:
                results[name] = measure(server, args)
            finally:
                server.stop()
        if not args.no_ceiling:
            print("== llama.cpp direct (bench/ceiling.py)", flush=True)
            results["direct"] = ceiling(args)
    th, ls = results["thoxd"], results["llama-server"]
    alone = zip(th["load"][1]["requests"], ls["load"][1]["requests"], strict=True)
    same = sum(a["text"] == b["text"] for a, b in alone)
    results["same_text_c1"] = f"{same}/{len(th['load'][1]['requests'])}"
    lines = table(th, ls, args)
    if "direct" in results:
        lines += ["", *ceiling_table(th, ls, results["direct"])]
    print("\n" + "\n".join(lines))
    print(
        f"\nthreads {t}, slots {n}, {args.tokens} tokens/stream, {args.rounds} rounds; "
        f"prefix {th['prefix']['cold'][0]['prompt_tokens']} prompt tokens, thoxd cache_n "
        f"{[d['cache_n'] for d in th['prefix']['cached']]}, llama-server cache_n "
        f"{[d['cache_n'] for d in ls['prefix']['cached']]}; greedy text at C=1 identical "
        f"{results['same_text_c1']}; wall {th['wall_s']:.0f}+{ls['wall_s']:.0f} s"
    )
    busy = {
        f"{k} {p}": v
        for k in ("thoxd", "llama-server")
        for p, v in results[k]["other_load"].items()
    }
    if any(v > 0.1 for v in busy.values()):
        print(f"WARNING: other processes kept cores busy, do not trust these numbers: {busy}")
    results["table"] = lines
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
