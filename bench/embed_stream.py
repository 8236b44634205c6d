"""A long embedding beside a running stream: how each slows the other.

One thoxd daemon (started here on a free loopback port, unless --url names a running one). Side by
side in one run: a greedy counting stream alone, an embedding of --words words alone, then both at
once. Prints the stream's tok/s and its longest gap between tokens, and the embedding's time, with
the ratios of "together" to "alone". Embeddings run a chunk at a time between generation steps
(thoxd/engine/embed.py): the gap a stream sees is about one chunk.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
STREAM = {
    "model": "gemma-3-270m",
    "prompt": "1, 2, 3, 4, 5,",
    "temperature": 0,
    "repeat_penalty": 1.0,
    "stream": True,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stream(url: str, tokens: int, arrivals: list[float]) -> None:
    body = {**STREAM, "max_tokens": tokens}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())


def embed(url: str, words: int) -> float:
    started = time.monotonic()
    body = {"model": "gemma-3-270m", "input": "word " * words}
    httpx.post(url + "/v1/embeddings", json=body, timeout=300).raise_for_status()
    return time.monotonic() - started


def stream_figures(arrivals: list[float], start: float, end: float) -> tuple[float, float]:
    """tok/s and the longest gap (ms) of the tokens that arrived between start and end."""
    inside = [t for t in arrivals if start <= t <= end]
    gaps = [b - a for a, b in itertools.pairwise(inside)]
    span = inside[-1] - inside[0] if len(inside) > 1 else 0.0
    return ((len(inside) - 1) / span if span else 0.0), (max(gaps) * 1000 if gaps else 0.0)


def run(url: str, words: int, tokens: int) -> None:
    alone: list[float] = []
    stream(url, tokens, alone)
    rate_alone, gap_alone = stream_figures(alone, alone[0], alone[-1])
    embed_alone = embed(url, words)

    together: list[float] = []
    worker = threading.Thread(target=stream, args=(url, tokens * 4, together))
    worker.start()
    while len(together) < 5:
        time.sleep(0.01)
    started = time.monotonic()
    embed_together = embed(url, words)
    ended = time.monotonic()
    worker.join()
    rate_together, gap_together = stream_figures(together, started, ended)

    print(f"stream alone:      {rate_alone:6.1f} tok/s, longest gap {gap_alone:6.0f} ms")
    print(f"stream beside it:  {rate_together:6.1f} tok/s, longest gap {gap_together:6.0f} ms")
    print(f"embedding alone:   {embed_alone:6.2f} s;  beside the stream: {embed_together:6.2f} s")
    print(
        f"ratios (together/alone): stream tok/s {rate_together / rate_alone:.2f}, "
        f"embedding time {embed_together / embed_alone:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="a running daemon (default: start one here)")
    parser.add_argument("--words", type=int, default=3000, help="words in the embedded text")
    parser.add_argument("--tokens", type=int, default=200, help="tokens of the lone stream")
    args = parser.parse_args()
    if args.url:
        run(args.url, args.words, args.tokens)
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        models = os.environ.get("THOXD_TEST_MODELS", str(Path.home() / ".cache" / "thoxd-test"))
        cmd = [
            sys.executable, "-m", "thoxd", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--state-dir", tmp, "--models-dir", models, "--mdns", "false",
        ]  # fmt: skip
        daemon = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("thoxd did not become ready")
                time.sleep(0.2)
            run(url, args.words, args.tokens)
        finally:
            daemon.terminate()
            daemon.wait(30)


if __name__ == "__main__":
    main()
