"""What a model costs in memory before it is loaded, from its GGUF header alone.

The estimate follows what llama.cpp allocates for the contexts thoxd creates (checked against
its own "buffer size" log lines for Gemma 3 270M: weights 235 MiB, KV 576 MiB, compute 41 MiB,
output 4 MiB; the process' RSS came to within 10% of their sum):

- weights: the tensor bytes of the file (mapped, and resident once used);
- KV cache: f16 K and V for every layer over n_ctx x slots cells (unified, full-size SWA), plus
  up to n_ctx tokens of idle slots parked in host memory (thoxd.engine.scheduler), plus the
  embeddings context's n_ctx cells when the model makes embeddings;
- compute: per ubatch, the attention masks, activations and logits of the batch.
"""

from __future__ import annotations

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

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total,
            "weights_bytes": self.weights,
            "kv_cache_bytes": self.kv_cache,
            "compute_bytes": self.compute,
            "estimated": True,
        }

    def describe(self) -> str:
        return (
            f"about {format_bytes(self.total)} (weights {format_bytes(self.weights)}, "
            f"KV cache {format_bytes(self.kv_cache)}, compute {format_bytes(self.compute)})"
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
) -> MemoryEstimate:
    shape = Shape.of(info)
    cells = n_ctx * slots
    kv = (cells + n_ctx) * shape.kv_per_token  # the cache, and what may be parked beside it
    # Generation: a step's output rows (one per slot, or drafts being checked) in the worst
    # ubatch, and the buffer their logits are copied to.
    compute = shape.compute(cells, batch_size, outputs) + outputs * shape.n_vocab * _F32
    if embeddings:
        kv += n_ctx * shape.kv_per_token
        compute += shape.compute(n_ctx, embed_batch, embed_batch)
    return MemoryEstimate(weights=info.tensor_bytes, kv_cache=kv, compute=compute)


def budget_bytes(setting: str, available: int) -> int:
    """The memory_budget setting in bytes: absolute, or a share of `available`."""
    absolute, share = parse_size(setting)
    return absolute if absolute is not None else int(available * (share or 1.0))
