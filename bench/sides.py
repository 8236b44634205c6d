"""The two sides of a side-by-side run: thoxd and llama-server on the same GGUF, threads, slots
and context (as bench/concurrency.py sets them), their common flags, and running a measurement
against each in turn, one server at a time (they would fight for the cores)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from concurrency import MODEL_FILE, MODEL_ID, N_CTX, ROOT, Server, free_port, no_repack


def add_server_args(p: argparse.ArgumentParser) -> None:
    version = importlib.metadata.version("llama-cpp-python")
    p.add_argument(
        "--llama-server",
        type=Path,
        default=ROOT / f"bench/.build/llama-build-{version}/bin/llama-server",
    )
    p.add_argument("--models-dir", type=Path, default=Path.home() / ".cache/thoxd-test")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--draft-max", type=int, help="thoxd --draft-max (0: drafts off)")


def commands(args: argparse.Namespace, port: int, state_dir: str) -> dict[str, list[str]]:
    t, n = str(args.threads), args.slots
    drafts = [] if args.draft_max is None else ["--draft-max", str(args.draft_max)]
    return {
        "thoxd": [sys.executable, "-m", "thoxd", "serve", "--host", "127.0.0.1",
                  "--port", str(port), "--models-dir", str(args.models_dir),
                  "--state-dir", state_dir, "--threads", t, "--slots", str(n),
                  "--log-level", "warning", "--default-model", MODEL_ID, *drafts],
        "llama-server": [str(args.llama_server), "-m", str(args.models_dir / MODEL_FILE),
                         "--host", "127.0.0.1", "--port", str(port), "-t", t, "-tb", t,
                         "-np", str(n), "-c", str(N_CTX * n), "--kv-unified", "--swa-full",
                         "--no-webui", *no_repack()],
    }  # fmt: skip


def each_side(args: argparse.Namespace, measure: Callable[[str], Any]) -> dict[str, Any]:
    """`measure(url)` against a ready thoxd, then a ready llama-server: their results by name."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="thoxd-sides-") as tmp:
        port = free_port()
        for name, cmd in commands(args, port, tmp).items():
            print(f"== {name}", flush=True)
            server = Server(name, cmd, port, Path(tmp) / f"{name}.log")
            try:
                server.wait_ready()
                results[name] = measure(server.url)
            finally:
                server.stop()
    return results


def report(lines: list[str], results: dict[str, Any], json_path: Path | None) -> int:
    """Print the table; with --json, save it and every number beside it."""
    print("\n".join(lines))
    if json_path:
        json_path.write_text(json.dumps({**results, "table": lines}, indent=1, default=str))
    return 0
