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

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from thoxd.engine.grammar import Candidates, Grammar
from thoxd.engine.llama import LlamaContext, LlamaModel


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
    # (token id, bias) pairs added to the logits before anything else; -100 bans the token.
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match: a GBNF grammar, applied from the start, or from the
    first match of one of `lazy_patterns` (a tool call's opening, in a model's own format)."""

    gbnf: str
    lazy_patterns: tuple[str, ...] = ()


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


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log probability, and the likeliest tokens in its place."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


# When the grammar rejects a sample, the tokens checked first (see Sampler._shortlist): those
# within 16, then 32 logits of the likeliest, about 4096, then 32768 of them at most.
SHORTLIST = ((16.0, 4096), (32.0, 32768))


# Top-k candidates are cut from a strided sample of the logits when the vocabulary has at least
# CUT_SAMPLE * 8 entries; about CUT_SPARE times k of them pass the cut.
CUT_SAMPLE = 8192
CUT_SPARE = 4


def _top_candidates(
    logits: np.ndarray[Any, np.dtype[np.float32]], k: int
) -> np.ndarray[Any, np.dtype[np.int32]] | None:
    """The ids of every token at or above a cut that at least `k` tokens reach (so the top k
    are among them), or None when no cheap cut exists (a small vocabulary, a large k, or too
    few tokens passing the estimated cut)."""
    n = len(logits)
    if n < CUT_SAMPLE * 8 or k * CUT_SPARE * 8 > n:
        return None
    sample = logits[:: n // CUT_SAMPLE]
    keep = max(2, k * CUT_SPARE * len(sample) // n)
    cut = np.partition(sample, len(sample) - keep)[len(sample) - keep]
    ids: np.ndarray[Any, np.dtype[np.int32]] = np.flatnonzero(logits >= cut).astype(np.int32)
    return ids if len(ids) >= k else None


class GrammarExhausted(Exception):
    """The grammar allows no token at all: the request ends where it is."""


class Sampler:
    """One request's sampling state: its penalties window, unless greedy a llama_sampler chain
    (top-k, top-p, min-p, temperature, then a seeded draw), its grammar if it has one
    (thoxd.engine.grammar: sampled first, checked after), and whether to report log
    probabilities (`logprobs` alternatives; 0 for the sampled token's own only)."""

    def __init__(
        self,
        params: SamplingParams,
        *,
        model: LlamaModel | None = None,
        grammar: GrammarSpec | None = None,
        logprobs: int | None = None,
    ) -> None:
        self._penalties = Penalties(params) if Penalties.needed(params) else None
        self._bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.intp)
        self._bias = np.array(
            [-np.inf if b <= -100 else b for _, b in params.logit_bias], dtype=np.float32
        )
        self._chain = None
        self._grammar = None
        self._model = model
        self._logprobs = logprobs
        self._top_k = params.top_k
        self._min_p = params.min_p
        self.last: TokenLogprob | None = None  # of the token `sample` returned, if asked for
        if grammar is not None:
            assert model is not None
            self._grammar = Grammar(model, grammar.gbnf, grammar.lazy_patterns)
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
        logits = ctx.logits(batch_index)
        if len(self._bias):  # first, as llama.cpp's own logit-bias sampler heads its chain
            logits[self._bias_ids] += self._bias
        if self._penalties is not None:
            self._penalties.apply(logits)
        if self._chain is None:
            token = int(logits.argmax())
        else:
            token = self._draw(ctx, logits, batch_index)
        seen: np.ndarray[Any, np.dtype[np.float32]] = logits  # what log probabilities read
        if self._grammar is not None:
            if self._logprobs is not None:
                # Probabilities "after the grammar" need the whole vocabulary masked.
                candidates = self._masked(Candidates(logits))
                seen = candidates.logits()
                if not np.isfinite(seen[token]):
                    token = self._resample(candidates)
            elif not self._grammar.allows(token):
                token = self._resample(self._shortlist(logits) or self._masked(Candidates(logits)))
            self._grammar.accept(token)
        if self._logprobs is not None:
            self.last = self._logprob(seen, token)
        if self._penalties is not None:
            self._penalties.accept(token)
        return token

    def _draw(
        self, ctx: LlamaContext, logits: np.ndarray[Any, np.dtype[np.float32]], batch_index: int
    ) -> int:
        """The chain's draw. Top-k heads it, so only tokens that can be among the top k need
        to reach it: llama.cpp would copy and partially sort all 262 144 of Gemma 3's (0.35 ms
        a token, measured: a tenth of thoxd's overhead per token at one stream); the few hundred
        at or above a cut estimated from every 32nd logit take 0.1 ms. Same tokens, same
        seeded draw."""
        ids = _top_candidates(logits, self._top_k) if self._top_k > 0 else None
        if ids is None:
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx.ptr, batch_index))
        candidates = Candidates(logits, ids)
        candidates.apply(self._chain)
        token = candidates.selected()
        llama_cpp.llama_sampler_accept(self._chain, token)  # as llama_sampler_sample does
        return token

    def _resample(self, candidates: Candidates) -> int:
        """Sample again among `candidates`, the grammar's mask applied."""
        if self._chain is None:
            return candidates.best()
        candidates.apply(self._chain)
        return candidates.selected()

    def _shortlist(self, logits: np.ndarray[Any, np.dtype[np.float32]]) -> Candidates | None:
        """The likeliest tokens with the grammar applied, when they decide the draw as the whole
        vocabulary would; else None, and the whole vocabulary is masked. A rejected token then
        costs a check of a few thousand tokens instead of all of them (262 144 for Gemma 3:
        ~25 ms). They decide it when
        - greedy: one of them is allowed (the likeliest allowed token is among them);
        - top-k: `top_k` of them are allowed (the top-k of the allowed tokens, all the chain
          ever sees, are among them);
        - min-p: an allowed one is likelier than every token left out by more than min-p's
          ratio, so min-p would drop every token left out (they only miss from the softmax
          that top-p reads, and by less than min-p of the likeliest each).
        Tries the tokens within each of SHORTLIST's spans of the likeliest, at most about
        `most` of them (a cut estimated from every 32nd logit: one pass over the logits, no
        sort)."""
        top = float(logits.max())
        sample = logits[:: max(1, len(logits) // 8192)]
        for span, most in SHORTLIST:
            keep = max(1, len(sample) * most // len(logits))
            cut = float(np.partition(sample, len(sample) - keep)[len(sample) - keep])
            floor = max(top - span, cut)  # every token left out is below this
            ids: np.ndarray[Any, np.dtype[np.int32]] = np.flatnonzero(logits >= floor).astype(
                np.int32
            )
            if len(ids) >= len(logits) // 2:
                return None
            candidates = self._decides(logits, ids, floor)
            if candidates is not None:
                return candidates
        return None

    def _decides(
        self,
        logits: np.ndarray[Any, np.dtype[np.float32]],
        ids: np.ndarray[Any, np.dtype[np.int32]],
        floor: float,
    ) -> Candidates | None:
        candidates = Candidates(logits, ids)
        assert self._grammar is not None
        self._grammar.mask(candidates)
        kept = candidates.data["logit"]
        allowed = np.isfinite(kept)
        if not allowed.any():
            return None
        if self._chain is None or (0 < self._top_k <= int(allowed.sum())):
            return candidates
        if self._min_p > 0 and float(kept[allowed].max()) - floor > -math.log(self._min_p):
            return candidates
        return None

    def _masked(self, candidates: Candidates) -> Candidates:
        """`candidates` with the grammar applied; GrammarExhausted if none is left."""
        assert self._grammar is not None
        self._grammar.mask(candidates)
        if not np.isfinite(candidates.data["logit"]).any():
            raise GrammarExhausted
        return candidates

    def _logprob(self, logits: np.ndarray[Any, np.dtype[np.float32]], token: int) -> TokenLogprob:
        """Log probabilities from the logits the sampler saw (penalties applied, and the
        grammar's mask when there is one), before temperature and truncation."""
        assert self._model is not None
        values = logits.astype(np.float64)
        top = values.max()
        log_total = top + float(np.log(np.exp(values - top).sum()))
        best: list[tuple[bytes, float]] = []
        if n := min(self._logprobs or 0, len(values)):
            ids = np.argpartition(-values, n - 1)[:n]
            ids = ids[np.argsort(-values[ids], kind="stable")]
            # Tokens the grammar ruled out are no alternatives (and -inf is not JSON).
            best = [
                (self._model.piece(int(i)), float(values[i] - log_total))
                for i in ids
                if np.isfinite(values[i])
            ]
        return TokenLogprob(self._model.piece(token), float(values[token] - log_total), tuple(best))

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            self._grammar.close()
            self._grammar = None
