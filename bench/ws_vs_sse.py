"""WebSocket (/v1/stream) against SSE (/v1/completions, stream=true) on the same requests.

One thoxd daemon, one request at a time, interleaved (SSE, WS, SSE, WS, ...): greedy counting
that never ends early, so every run makes exactly --tokens tokens. Both clients keep their
connection open across requests, so the comparison is per request, not per connection.
Prints median TTFT and decode tok/s (client-side, from message arrival times) and WS/SSE ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import ClientConnection, connect

REPO = Path(__file__).resolve().parent.parent
PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body(tokens: int) -> dict[str, object]:
    return {"model": "gemma-3-270m", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}


def rates(sent: float, arrivals: list[float]) -> tuple[float, float]:
    """TTFT in ms, and decode tok/s over the tokens after the first."""
    ttft = (arrivals[0] - sent) * 1000
    span = arrivals[-1] - arrivals[0]
    return ttft, (len(arrivals) - 1) / span if span > 0 else 0.0


async def sse_once(client: httpx.AsyncClient, url: str, tokens: int) -> tuple[float, float]:
    arrivals: list[float] = []
    sent = time.perf_counter()
    async with client.stream("POST", url, json={**body(tokens), "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    arrivals.append(time.perf_counter())
    return rates(sent, arrivals)


async def ws_once(ws: ClientConnection, tokens: int, n: int) -> tuple[float, float]:
    arrivals: list[float] = []
    sent = time.perf_counter()
    await ws.send(json.dumps({**body(tokens), "id": f"r{n}"}))
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == "delta":
            arrivals.append(time.perf_counter())
        elif event["type"] == "done":
            return rates(sent, arrivals)
        else:
            raise RuntimeError(event)


async def measure(base: str, tokens: int, reps: int) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {"sse": [], "ws": []}
    ws_url = base.replace("http://", "ws://") + "/v1/stream"
    async with httpx.AsyncClient(timeout=120) as client, connect(ws_url) as ws:
        await sse_once(client, base + "/v1/completions", 8)  # warm-up, both paths
        await ws_once(ws, 8, -1)
        for n in range(reps):
            results["sse"].append(await sse_once(client, base + "/v1/completions", tokens))
            results["ws"].append(await ws_once(ws, tokens, n))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "thoxd-test")
    args = parser.parse_args()

    port = free_port()
    with tempfile.TemporaryDirectory() as state:
        cmd = [sys.executable, "-m", "thoxd", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--models-dir", str(args.models_dir), "--state-dir", state,
               "--log-level", "warning"]  # fmt: skip
        daemon = subprocess.Popen(cmd, cwd=REPO)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit("thoxd did not become ready")
                time.sleep(0.2)
            results = asyncio.run(measure(base, args.tokens, args.reps))
        finally:
            daemon.terminate()
            daemon.wait(30)

    med = {k: (statistics.median(t for t, _ in v), statistics.median(r for _, r in v))
           for k, v in results.items()}  # fmt: skip
    print(f"thoxd WebSocket vs SSE: {args.reps} interleaved runs of {args.tokens} greedy tokens, "
          f"{len(os.sched_getaffinity(0))} cores")  # fmt: skip
    print(f"{'':6}{'TTFT ms':>10}{'decode tok/s':>14}")
    for name in ("sse", "ws"):
        print(f"{name:6}{med[name][0]:>10.1f}{med[name][1]:>14.1f}")
    print(f"ratio WS/SSE: decode {med['ws'][1] / med['sse'][1]:.3f}  "
          f"TTFT {med['ws'][0] / med['sse'][0]:.3f} (lower is better)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
