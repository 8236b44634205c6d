"""A thin, typed layer over llama-cpp-python's low-level C API.

Only this package imports `llama_cpp`. Each object here owns one C resource and frees it exactly
once; callers above deal in Python ints, bytes and lists, never in ctypes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from thoxd.engine.devices import repacks_safely

logger = logging.getLogger("thoxd.llama")

# ggml_log_level -> logging level. llama.cpp's INFO chatter goes to DEBUG: it is for developers.
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_LOG_CONT = 5


class LlamaLogRouter:
    """Routes llama.cpp's log lines into `logging` instead of stderr.

    llama.cpp's log callback is process-wide and is called from any context, even while one is
    being freed, so the router must outlive them all: use `route_llama_logs()`, which installs
    one router for the life of the process (a collected ctypes callback crashes the process).
    """

    def __init__(self) -> None:
        self._level = logging.DEBUG
        self._buffer = ""
        self._callback = llama_cpp.llama_log_callback(self._on_log)

    def install(self) -> None:
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, _user: Any) -> None:
        if level != _LOG_CONT:
            self._level = _LOG_LEVELS.get(level, logging.DEBUG)
        self._buffer += text.decode("utf-8", errors="replace")
        if self._buffer.endswith("\n"):
            line, self._buffer = self._buffer.rstrip(), ""
            if line:
                logger.log(self._level, "%s", line)


@functools.cache
def route_llama_logs() -> LlamaLogRouter:
    """Install the process's one log router (idempotent)."""
    router = LlamaLogRouter()
    router.install()
    return router


class LlamaLoadError(Exception):
    """llama.cpp refused a model or a context (the reason is in the log)."""


def probe_model(path: Path) -> None:
    """Let llama.cpp read a file's hyperparameters and vocabulary, not its weights (~0.3 s for
    Gemma 3): an architecture it does not know fails here, before anything is evicted for it."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not ptr:
        raise LlamaLoadError("llama.cpp could not read the model file")
    llama_cpp.llama_model_free(ptr)


class LlamaModel:
    """Weights and vocabulary of one GGUF file."""

    def __init__(self, path: Path, *, n_gpu_layers: int = 0, devices: Sequence[int] = ()) -> None:
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = repacks_safely()
        params.n_gpu_layers = n_gpu_layers
        if devices:  # where the offloaded layers go (RPC servers: thoxd/engine/rpc.py)
            listed = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
            params.devices = ctypes.cast(listed, ctypes.c_void_p)
        ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise LlamaLoadError("llama.cpp could not load the model file")
        self.ptr = ptr
        self.vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train: int = llama_cpp.llama_model_n_ctx_train(ptr)
        self.n_embd: int = llama_cpp.llama_model_n_embd(ptr)
        self.size_bytes: int = llama_cpp.llama_model_size(ptr)
        self.add_bos: bool = llama_cpp.llama_vocab_get_add_bos(self.vocab)
        self.bos: int = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos: int = llama_cpp.llama_vocab_eos(self.vocab)
        fim = (
            llama_cpp.llama_vocab_fim_pre(self.vocab),
            llama_cpp.llama_vocab_fim_suf(self.vocab),
            llama_cpp.llama_vocab_fim_mid(self.vocab),
        )
        # Fill-in-the-middle: (prefix, suffix, middle) token ids, when the vocabulary has them.
        self.fim: tuple[int, int, int] | None = fim if min(fim) >= 0 else None
        # A recurrent state cannot drop its last positions, so rejected drafts could not be
        # taken back out of the cache (thoxd.engine.drafts).
        self.rewindable: bool = not (
            llama_cpp.llama_model_is_recurrent(ptr) or llama_cpp.llama_model_is_hybrid(ptr)
        )
        # Positions a sliding-window layer attends back over (0: every layer sees everything).
        self.n_swa: int = llama_cpp.llama_model_n_swa(ptr)
        self._eog = {t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)}

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        # A token is never shorter than one byte, plus room for BOS/EOS.
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, add_special, parse_special
        )
        if n < 0:  # pragma: no cover - capacity is always enough
            raise LlamaLoadError("tokenizer buffer too small")
        return list(tokens[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token as text (control tokens render as nothing)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        """A token's text as the vocabulary spells it, control tokens included ("<bos>")."""
        if token < 0:
            return ""
        text = llama_cpp.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return token in self._eog


@dataclass(frozen=True)
class ContextConfig:
    n_ctx: int  # the KV cache size in tokens, shared by every sequence (unified)
    n_seq_max: int
    n_batch: int
    n_threads: int
    n_ubatch: int = 0  # 0: n_batch
    # Most output rows (logits) in one step, and for one sequence: one per running sequence,
    # plus the drafts speculative decoding checks (thoxd.engine.drafts).
    max_outputs: int = 0  # 0: n_seq_max
    max_outputs_per_seq: int = 1
    embeddings: bool = False


class LlamaContext:
    """One llama.cpp context (KV cache + compute buffers) over a loaded model."""

    def __init__(self, model: LlamaModel, config: ContextConfig) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = config.n_ctx
        params.n_batch = config.n_batch
        params.n_ubatch = min(config.n_ubatch or config.n_batch, config.n_batch)
        params.n_seq_max = config.n_seq_max
        params.n_threads = config.n_threads
        params.n_threads_batch = config.n_threads
        # Unified KV: any one sequence may use the whole cache, no per-slot split.
        params.kv_unified = True
        # Full-size SWA cache keeps cached prefixes reusable on sliding-window models (Gemma 3).
        params.swa_full = True
        params.no_perf = True
        # Only the rows that are sampled: sizing the logits buffer for n_batch outputs would
        # cost n_batch x n_vocab floats (512 MiB for Gemma 3) for nothing.
        params.n_outputs_max = config.max_outputs or config.n_seq_max
        params.n_outputs_max_per_seq = config.max_outputs_per_seq
        if config.embeddings:
            # Per-token embeddings, pooled by the caller chunk by chunk. llama.cpp's own pooling
            # needs the whole input in one ubatch, and the graph still computes logits for every
            # token: n_tokens x n_vocab floats (8 GiB for 8192 tokens of Gemma 3).
            params.n_outputs_max = config.n_batch
            params.n_outputs_max_per_seq = config.n_batch
            params.embeddings = True
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        self.model = model
        self._params = params
        self.ptr = None
        self._create()
        self.n_ctx: int = llama_cpp.llama_n_ctx(self.ptr)
        self.n_batch: int = llama_cpp.llama_n_batch(self.ptr)

    def _create(self) -> None:
        ptr = llama_cpp.llama_init_from_model(self.model.ptr, self._params)
        if not ptr:
            raise LlamaLoadError("llama.cpp could not create a context")
        self.ptr = ptr
        self.memory = llama_cpp.llama_get_memory(ptr)

    def recreate(self) -> None:
        """Free this context and make it again with the same parameters: after a failed step,
        nothing of what llama.cpp held (cache cells, compute state) is trusted any more."""
        self.close()
        self._create()

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def decode(self, batch: Batch) -> int:
        """0 on success, 1 when the KV cache has no room, < 0 on error."""
        return int(llama_cpp.llama_decode(self.ptr, batch.raw))

    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Give `dst` the cells of `src` at positions [p0, p1) (shared, not duplicated, in a
        unified cache)."""
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def clear(self, *, data: bool = True) -> None:
        """Empty the cache; the next cells are taken from cell 0 on. With `data` False only
        the cells' bookkeeping is reset, not their contents (masked out until written again)."""
        llama_cpp.llama_memory_clear(self.memory, data)

    def seq_save(self, seq_id: int) -> bytes:
        """A copy of one sequence's cache cells (keys, values, positions), to restore later."""
        size = llama_cpp.llama_state_seq_get_size(self.ptr, seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ptr, buf, size, seq_id)
        return ctypes.string_at(buf, written)

    def seq_restore(self, seq_id: int, data: bytes) -> bool:
        """Put a saved sequence back into (empty) `seq_id`; False if the cache had no room."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return bool(llama_cpp.llama_state_seq_set_data(self.ptr, buf, len(data), seq_id))

    @property
    def sliding_window(self) -> bool:
        """Whether some layers attend over a window only (Gemma 3): see seq_covers."""
        return bool(self.model.n_swa)

    def seq_covers(self, seq_id: int, n: int) -> bool:
        """Whether the sequence's cells hold everything a token at position `n` attends to
        before it. A sliding-window model's saved state keeps only the last window's cells of
        its window layers, so a restored sequence cut back below its end may lack some."""
        pos_min = int(llama_cpp.llama_memory_seq_pos_min(self.memory, seq_id))
        # llama-server's threshold: its window reaches back to n - n_swa.
        return pos_min <= max(0, n - self.model.n_swa) if self.model.n_swa else pos_min <= 0

    def logits(self, batch_index: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        """A writable view of one output's logits in llama.cpp's buffer, valid until the next
        decode; samplers read the same buffer, so changes made here are what they see."""
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, batch_index)
        if not ptr:
            raise LlamaLoadError("no logits for that batch index")
        view: np.ndarray[Any, np.dtype[np.float32]] = np.ctypeslib.as_array(
            ptr, shape=(self.model.n_vocab,)
        )
        return view

    def token_embeddings_sum(self, n_outputs: int) -> np.ndarray[Any, np.dtype[np.float64]]:
        """The sum of the last decode's `n_outputs` token embeddings (an embeddings context)."""
        ptr = llama_cpp.llama_get_embeddings(self.ptr)
        if not ptr:
            raise LlamaLoadError("no embeddings were produced")
        rows = np.ctypeslib.as_array(ptr, shape=(n_outputs, self.model.n_embd))
        total: np.ndarray[Any, np.dtype[np.float64]] = rows.sum(axis=0, dtype=np.float64)
        return total


class Batch:
    """A reusable llama_batch of up to `capacity` tokens, each on one sequence."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.n_tokens = 0

    def close(self) -> None:
        if self.capacity:
            llama_cpp.llama_batch_free(self.raw)
            self.capacity = 0

    def clear(self) -> None:
        self.n_tokens = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, *, logits: bool) -> int:
        """Append one token; returns its index in the batch (for sampling its logits)."""
        i = self.n_tokens
        if i >= self.capacity:  # llama_batch's arrays end here: never write past them
            raise IndexError(f"batch full ({self.capacity} tokens)")
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq_id
        raw.logits[i] = logits
        self.n_tokens = raw.n_tokens = i + 1
        return i

    def add_sequence(self, tokens: Sequence[int], start: int, seq_id: int) -> None:
        """Append prompt tokens at positions start.. on one sequence, without logits."""
        for k, token in enumerate(tokens):
            self.add(token, start + k, seq_id, logits=False)

    @property
    def room(self) -> int:
        return self.capacity - self.n_tokens


def backend_init() -> None:
    llama_cpp.llama_backend_init()


def system_info() -> str:
    return bytes(llama_cpp.llama_print_system_info()).decode("utf-8", errors="replace")
