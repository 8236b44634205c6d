"""A request's grammar: llama.cpp's grammar sampler, used the cheap way round.

Checking a grammar against every vocabulary entry costs a pass over all of them (262 144 for
Gemma 3) each token. As in llama.cpp's common sampler, the token is sampled first without the
grammar and then checked alone; only when the grammar rejects it is the whole distribution masked
and sampled again. Once the model follows the format, most tokens cost one check.

`Candidates` is llama.cpp's candidate array over the whole vocabulary, in numpy, for that second
pass (and for log probabilities after the grammar).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np

from thoxd.engine.llama import LlamaModel

# llama_token_data: {int32 id; float logit; float p}, 12 bytes, no padding.
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class GrammarInvalid(ValueError):
    """llama.cpp could not parse the grammar."""


class Candidates:
    """Every token with its logit, as llama.cpp's samplers take them (llama_token_data_array)."""

    def __init__(
        self,
        logits: np.ndarray[Any, np.dtype[np.float32]],
        ids: np.ndarray[Any, np.dtype[np.int32]] | None = None,
    ) -> None:
        """Every token, or only `ids` (a shortlist) with their logits."""
        self._n_vocab = len(logits)
        if ids is None:
            ids = np.arange(len(logits), dtype=np.int32)
        self.data = np.empty(len(ids), dtype=TOKEN_DATA)
        self.data["id"] = ids
        self.data["logit"] = logits[ids] if len(ids) < len(logits) else logits
        self.data["p"] = 0.0
        self.raw = llama_cpp.llama_token_data_array(
            data=self.data.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=len(ids),
            selected=-1,
            sorted=False,
        )

    def apply(self, sampler: Any) -> None:
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(self.raw))

    def logits(self) -> np.ndarray[Any, np.dtype[np.float32]]:
        """The logits as the samplers left them, indexed by token id."""
        out = np.full(self._n_vocab, -np.inf, dtype=np.float32)
        view = self._view()
        out[view["id"]] = view["logit"]
        return out

    def selected(self) -> int:
        return int(self._view()[self.raw.selected]["id"])

    def best(self) -> int:
        view = self._view()
        return int(view["id"][int(np.argmax(view["logit"]))])

    def _view(self) -> np.ndarray[Any, np.dtype[Any]]:
        # A sampler may point `data` elsewhere and shrink `size` (top-k does): read what it says.
        if self.raw.size == 0:
            return self.data[:0]
        start = ctypes.cast(self.raw.data, ctypes.POINTER(ctypes.c_uint8))
        raw: np.ndarray[Any, np.dtype[np.uint8]] = np.ctypeslib.as_array(
            start, shape=(self.raw.size * TOKEN_DATA.itemsize,)
        )
        return raw.view(TOKEN_DATA)


class Grammar:
    """A GBNF grammar over one model's vocabulary, advanced by each accepted token.

    `lazy_patterns`: the grammar applies only from the first match of one of these regular
    expressions in the output (a tool call's opening tag, say); before it, anything goes."""

    def __init__(self, model: LlamaModel, gbnf: str, lazy_patterns: Sequence[str] = ()) -> None:
        if lazy_patterns:
            patterns = (ctypes.c_char_p * len(lazy_patterns))(*(p.encode() for p in lazy_patterns))
            ptr = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                model.vocab, gbnf.encode(), b"root", patterns, len(lazy_patterns), None, 0
            )
        else:
            ptr = llama_cpp.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
        if not ptr:
            raise GrammarInvalid("llama.cpp could not parse the grammar")
        self._ptr = ptr
        self._one = np.zeros(1, dtype=TOKEN_DATA)
        self._one_raw = llama_cpp.llama_token_data_array(
            data=self._one.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=1,
            selected=-1,
            sorted=False,
        )

    def allows(self, token: int) -> bool:
        """Whether the grammar lets `token` come next (one check, not a pass over the vocab)."""
        self._one[0] = (token, 0.0, 0.0)
        self._one_raw.size = 1
        llama_cpp.llama_sampler_apply(self._ptr, ctypes.byref(self._one_raw))
        return bool(np.isfinite(self._one[0]["logit"]))

    def mask(self, candidates: Candidates) -> None:
        """Set every token the grammar does not allow next to -inf."""
        candidates.apply(self._ptr)

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self._ptr, token)

    def close(self) -> None:
        if self._ptr:
            llama_cpp.llama_sampler_free(self._ptr)
            self._ptr = None
