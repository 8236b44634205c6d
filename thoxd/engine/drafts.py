"""Speculative decoding by prompt lookup: draft a sequence's next tokens from an earlier
occurrence of its last few tokens, and check the drafts in the same step as its next token.

Why it pays on this engine: a step's cost is mostly the output layer (for Gemma 3 270M a
262 144 x 640 matrix), and past the first row llama.cpp computes further output rows for much
less than a step of their own (bench/RESULTS.md, `ceiling.py --step-cost`). A drafted token costs
one more row; when the model's own pick at the previous row equals it, the next row's pick is a
token gained without a step. Each row is sampled in order with the request's own sampler and the
drafts are accepted only while they equal what it picked, so the text is what sampling one token
per step would give (for greedy, up to the float rounding of the multi-row kernel).

Whether drafting pays depends on the machine and on how often drafts are right, so each step is
planned: `StepCosts` holds what a step with n output rows was measured to cost, `Acceptance`
how often a sequence's lookup has guessed its next token (observed every step, drafted or not),
and `StepCosts.plan` picks the number of drafts that gives the most expected tokens per
millisecond, which is often none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

from thoxd.engine.llama import Batch, LlamaContext

logger = logging.getLogger("thoxd.engine")

# Longest n-gram first: a longer match is a more specific context, so its continuation is more
# often right (94% against 90% on code being rewritten, measured); 2-grams find more matches.
NGRAMS = (3, 2)


class Lookup:
    """One sequence's tokens (prompt and output so far), indexed by every n-gram in NGRAMS to
    the position just after its latest occurrence."""

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self._tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        tokens = self._tokens
        end = len(tokens)
        for n in NGRAMS:
            if end >= n:
                self._after[tuple(tokens[end - n :])] = end
        tokens.append(token)

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the last n."""
        tokens = self._tokens
        for n in NGRAMS:
            if len(tokens) > n:
                start = self._after.get(tuple(tokens[-n:]))
                if start is not None:
                    return tokens[start : start + limit]
        return []


class Acceptance:
    """How often a lookup's next token turned out to be the one sampled: a moving average over
    the last ~`window` guesses, starting from `prior`."""

    def __init__(self, prior: float, window: int = 8) -> None:
        self.rate = prior
        self._weight = 1.0 / window

    def observe(self, hit: bool) -> None:
        self.rate += self._weight * (float(hit) - self.rate)


class StepCosts:
    """Milliseconds a step takes with n output rows, for the n that were measured."""

    def __init__(self, ms: dict[int, float]) -> None:
        self.ms = dict(ms)
        self.max_rows = max(ms, default=0)

    def plan(self, base: int, guesses: Sequence[tuple[float, int]]) -> list[int]:
        """How many drafts to check for each sequence this step.

        `base` is the step's rows without drafts; `guesses` holds each sequence's acceptance
        rate and how many drafts it has. A sequence's j-th draft yields a token with probability
        rate**j (every draft before it must be right too), so the best plan for any total takes
        the most likely drafts first; the total chosen is the one with the most expected tokens
        per measured millisecond (sizes not measured are skipped: the kernels' cost is not
        monotonic in the row count)."""
        counts = [0] * len(guesses)
        base_ms = self.ms.get(base)
        if base_ms is None:
            return counts
        ranked = sorted(
            ((rate**j, i) for i, (rate, n) in enumerate(guesses) for j in range(1, n + 1)),
            reverse=True,
        )
        best, best_rate, expected = 0, base / base_ms, float(base)
        for k, (gain, _) in enumerate(ranked[: max(self.max_rows - base, 0)], start=1):
            expected += gain
            ms = self.ms.get(base + k)
            if ms is not None and expected / ms > best_rate:
                best, best_rate = k, expected / ms
        for _, i in ranked[:best]:
            counts[i] += 1
        return counts


def propose(
    costs: StepCosts | None, sequences: Sequence[tuple[Lookup, float, int]]
) -> list[tuple[list[int], int]]:
    """For each sequence (its lookup, acceptance rate, and the most drafts it may take): the
    lookup's guesses at its next tokens, and how many of them this step checks as drafts (none
    without `costs`). Guesses are made even when none is checked: scoring them is how a
    sequence's acceptance is known before drafting pays."""
    guesses = [lookup.draft(max(n, 0) + 1) for lookup, _, n in sequences]
    if costs is None:
        return [(g, 0) for g in guesses]
    wanted = [(rate, min(n, len(g))) for (_, rate, n), g in zip(sequences, guesses, strict=True)]
    return list(zip(guesses, costs.plan(len(sequences), wanted), strict=True))


def row_counts(slots: int, max_rows: int) -> list[int]:
    """The row counts worth measuring: every count up to the slots (a step without drafts has
    one row per running sequence), the small ones, and multiples of four (llama.cpp's multi-row
    kernels work in tiles of four; other counts cost up to a tile more, measured)."""
    sizes = set(range(1, min(slots, max_rows) + 1)) | set(range(1, min(4, max_rows) + 1))
    sizes |= set(range(4, max_rows + 1, 4))
    return sorted(sizes)


def measure_step_costs(
    ctx: LlamaContext, batch: Batch, sizes: Sequence[int], seq_id: int, token: int
) -> StepCosts:
    """Time one decode step for each row count (best of two, after one warm-up step) on
    `seq_id`, which must be empty, and leave it empty. About 0.5 s for Gemma 3 270M here."""
    ms: dict[int, float] = {}
    for n in [max(sizes), *sizes, *sizes]:
        batch.clear()
        for pos in range(n):
            batch.add(token, pos, seq_id, logits=True)
        t0 = time.perf_counter()
        rc = ctx.decode(batch)
        elapsed = (time.perf_counter() - t0) * 1000.0
        ctx.seq_rm(seq_id, 0)
        if rc != 0:
            return StepCosts({})
        ms[n] = min(ms.get(n, elapsed), elapsed)
    batch.clear()
    logger.info("step ms by output rows: %s", ", ".join(f"{n}: {ms[n]:.1f}" for n in sorted(ms)))
    return StepCosts(ms)
