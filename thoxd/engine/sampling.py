"""Per-request sampling: repetition penalties and greedy picks in numpy, everything else in
llama.cpp's C sampler chain.

llama.cpp's penalties sampler looks up every one of the vocabulary's tokens in a hash map on
every step (0.5 ms for Gemma 3's 262 144 tokens, measured), and its greedy sampler first copies
all logits into a candidate array (0.2 ms). Here the penalties touch only the at most
`penalty_last_n` tokens they apply to, in place in llama.cpp's logits buffer (same float32
formula, so the chain after them sees what llama.cpp's own penalties would give), and greedy is
an argmax over that buffer (first maximum, as llama.cpp's greedy sampler picks).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from thoxd.engine.llama import LlamaContext


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    penalty_last_n: int = 64
    seed: int | None = None


class Penalties:
    """Repeat, frequency and presence penalties over the last `penalty_last_n` sampled tokens,
    with llama.cpp's rules: a repeated token's logit is divided by `repeat_penalty` when
    positive and multiplied when not, then `count * frequency + presence` is subtracted."""

    def __init__(self, params: SamplingParams) -> None:
        self._last_n = max(params.penalty_last_n, 0)
        self._repeat = np.float32(params.repeat_penalty)
        self._frequency = np.float32(params.frequency_penalty)
        self._presence = np.float32(params.presence_penalty)
        self._window: deque[int] = deque()
        self._counts: dict[int, int] = {}

    @staticmethod
    def needed(params: SamplingParams) -> bool:
        neutral = (
            params.repeat_penalty == 1.0
            and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0
        )
        return params.penalty_last_n > 0 and not neutral

    def apply(self, logits: np.ndarray[Any, np.dtype[np.float32]]) -> None:
        if not self._counts:
            return
        ids = np.fromiter(self._counts, dtype=np.intp, count=len(self._counts))
        picked = logits[ids]
        picked = np.where(picked <= 0, picked * self._repeat, picked / self._repeat)
        if self._frequency or self._presence:
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(ids))
            picked -= counts * self._frequency + self._presence
        logits[ids] = picked

    def accept(self, token: int) -> None:
        if len(self._window) == self._last_n:
            old = self._window.popleft()
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        self._window.append(token)
        self._counts[token] = self._counts.get(token, 0) + 1


class Sampler:
    """One request's sampling state: its penalties window and, unless greedy, a llama_sampler
    chain (top-k, top-p, min-p, temperature, then a seeded draw)."""

    def __init__(self, params: SamplingParams) -> None:
        self._penalties = Penalties(params) if Penalties.needed(params) else None
        self._chain = None
        if params.temperature <= 0.0:
            return
        self._chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        if params.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            self._add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        self._add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def _add(self, sampler: object) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def sample(self, ctx: LlamaContext, batch_index: int) -> int:
        if self._penalties is not None:
            self._penalties.apply(ctx.logits(batch_index))
        if self._chain is None:
            token = int(ctx.logits(batch_index).argmax())
        else:
            token = int(llama_cpp.llama_sampler_sample(self._chain, ctx.ptr, batch_index))
        if self._penalties is not None:
            self._penalties.accept(token)
        return token

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
