"""What a model costs in memory before it is loaded, from its GGUF header alone.

The estimate follows what llama.cpp allocates for the contexts thoxd creates (checked against
its own "buffer size" log lines for Gemma 3 270M: weights 235 MiB, KV 576 MiB, compute 41 MiB,
output 4 MiB; the process' RSS came to within 10% of their sum):

- weights: the tensor bytes of the file (mapped, and resident once used);
- KV cache: f16 K and V for every layer over n_ctx x slots cells (unified, full-size SWA), plus
  up to n_ctx tokens held in host memory (idle slots' parked cells and shared prefixes'
  copies: thoxd.engine.placement), plus the embeddings context's n_ctx cells when the model
  makes embeddings;
- compute: per ubatch, the attention masks, activations and logits of the batch.

With layers offloaded to a GPU, llama.cpp (llama_model::load_tensors) counts n_gpu_layers from
the end: 1 is the output layer (with tied embeddings, a copy of the token embeddings), k adds the
last k - 1 repeating layers, n_layer + 1 (or -1) is all of them; the input embeddings always stay
in host memory. A layer's K and V live beside its weights; the step's compute buffer lives on
the GPU, with one in host memory too (the whole graph while some layers stay there, else the
logits copied back). Parked tokens stay in host memory. bench/offload_estimate.py checks this
against what llama.cpp allocates on an RPC device, which it places layers on as on a GPU: for a
model split over RPC servers that share is `remote`, held on the servers, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thoxd.catalog.gguf import GGUFInfo
from thoxd.units import format_bytes, parse_size

_F16 = 2
_F32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int
    gpu: int = 0  # of the whole, the bytes in GPU memory
    gpu_layers: int = 0  # the n_gpu_layers it is for
    remote: int = 0  # of the whole, the bytes on the RPC servers a split model's layers are on

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    @property
    def host(self) -> int:
        return self.total - self.gpu - self.remote

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total,
            "weights_bytes": self.weights,
            "kv_cache_bytes": self.kv_cache,
            "compute_bytes": self.compute,
            "gpu_bytes": self.gpu,
            "gpu_layers": self.gpu_layers,
            "remote_bytes": self.remote,
            "estimated": True,
        }

    def describe(self) -> str:
        where = f"; {format_bytes(self.gpu)} of it on the GPU" if self.gpu else ""
        if self.remote:
            where += f"; {format_bytes(self.remote)} of it on its RPC servers"
        return (
            f"about {format_bytes(self.total)} (weights {format_bytes(self.weights)}, "
            f"KV cache {format_bytes(self.kv_cache)}, compute {format_bytes(self.compute)}{where})"
        )


@dataclass(frozen=True)
class Shape:
    """The model dimensions that size its buffers."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    kv_per_token: int  # bytes of K and V for one token over every layer
    sliding_window: bool

    @classmethod
    def of(cls, info: GGUFInfo) -> Shape:
        meta, arch = info.metadata, info.architecture

        def number(key: str, default: int) -> int:
            value = meta.get(f"{arch}.{key}")
            # Per-layer arrays (only their length is kept) fall back to the default.
            return value if isinstance(value, int) and value > 0 else default

        n_embd = number("embedding_length", 4096)
        n_head = number("attention.head_count", 32)
        n_head_kv = number("attention.head_count_kv", n_head)
        head_dim = n_embd // n_head
        k_len = number("attention.key_length", head_dim)
        v_len = number("attention.value_length", head_dim)
        n_layer = number("block_count", 32)
        tokens = meta.get("tokenizer.ggml.tokens")
        n_vocab = tokens.get("len", 32000) if isinstance(tokens, dict) else 32000
        return cls(
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=number("feed_forward_length", 4 * n_embd),
            n_vocab=int(n_vocab),
            kv_per_token=n_layer * n_head_kv * (k_len + v_len) * _F16,
            sliding_window=f"{arch}.attention.sliding_window" in meta,
        )

    def compute(self, n_cells: int, n_ubatch: int, n_outputs: int) -> int:
        masks = 2 if self.sliding_window else 1
        mask = n_cells * n_ubatch * _F16 * masks
        activations = n_ubatch * (8 * self.n_embd + 3 * self.n_ff) * _F32
        logits = n_outputs * self.n_vocab * _F32
        return mask + activations + logits


def estimate_memory(
    info: GGUFInfo,
    *,
    n_ctx: int,
    slots: int,
    outputs: int,
    batch_size: int,
    embeddings: bool,
    embed_batch: int,
    gpu_layers: int = 0,
) -> MemoryEstimate:
    shape = Shape.of(info)
    cells = n_ctx * slots + (n_ctx if embeddings else 0)  # the embeddings context's too
    kv = (cells + n_ctx) * shape.kv_per_token  # the caches, and what may be parked beside them
    # Generation: a step's output rows (one per slot, or drafts being checked) in the worst
    # ubatch; and the host buffer their logits are copied to.
    graph = shape.compute(n_ctx * slots, batch_size, outputs)
    if embeddings:
        graph += shape.compute(n_ctx, embed_batch, embed_batch)
    logits = outputs * shape.n_vocab * _F32
    n = min(gpu_layers if gpu_layers >= 0 else shape.n_layer + 1, shape.n_layer + 1)
    if n == 0:
        return MemoryEstimate(weights=info.tensor_bytes, kv_cache=kv, compute=graph + logits)
    blocks = min(n - 1, shape.n_layer)  # repeating layers offloaded: the last ones
    sizes = info.tensor_sizes
    # The last blocks, the output layer's tensors (all but the input embeddings outside blocks)
    # and, when the output is tied to the input embeddings, llama.cpp's copy of those.
    tied = 0 if "output.weight" in sizes else sizes.get("token_embd.weight", 0)
    on_gpu = tied + sum(
        v
        for k, v in sizes.items()
        if _block(k) >= shape.n_layer - blocks
        or (_block(k) < 0 and not k.startswith("token_embd."))
    )
    # The host's own graph: the whole one while some layers stay here, else the logits it
    # takes back (bench/offload_estimate.py: 17 MiB logged for Gemma's 16 rows of 262144).
    host_graph = graph if blocks < shape.n_layer else logits
    return MemoryEstimate(
        weights=info.tensor_bytes + tied,
        kv_cache=kv,
        compute=graph + host_graph + logits,
        gpu=on_gpu + cells * shape.kv_per_token * blocks // shape.n_layer + graph,
        gpu_layers=n,
    )


def fit_layers(estimate: Callable[[int], MemoryEstimate], n_layer: int, room: int) -> int:
    """The most layers (n_gpu_layers) whose estimate fits `room` bytes of GPU memory."""
    for n in range(n_layer + 1, 0, -1):
        if estimate(n).gpu <= room:
            return n
    return 0


def _block(name: str) -> int:
    """The repeating layer a tensor belongs to ("blk.N."), or -1."""
    if not name.startswith("blk."):
        return -1
    index = name[4:].partition(".")[0]
    return int(index) if index.isdigit() else -1


def budget_bytes(setting: str, available: int) -> int:
    """The memory_budget setting in bytes: absolute, or a share of `available`."""
    absolute, share = parse_size(setting)
    return absolute if absolute is not None else int(available * (share or 1.0))
