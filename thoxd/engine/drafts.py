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
how far a sequence's guesses have come true (scored every step, drafted or not), and
`StepCosts.plan` picks the drafts that give the most expected tokens per millisecond, which is
often none.
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
    """How far a sequence's guesses come true: for each depth j, how often the j-th guessed
    token was the one sampled, given the ones before it were.

    Each depth's rate is a moving average over about the last `window` observations, from
    `prior`: trust comes slowly (a running mean from the prior, which trusts a text being copied
    within three guess lists, let a lone counting stream draft at a loss: bench/RESULTS.md, run
    F), and a change of pattern still shows. Guesses are scored whether or not they were
    checked as drafts: a guess list stays open while the tokens sampled after it match it, one
    at a time, and the next list opens when it misses or runs out. So a sequence's record is
    known before drafting pays, and depths are told apart: counting guesses a number's first
    digits far more often than its last, and one rate for all made a lone counting stream draft
    long runs that were mostly rejected (runs A and E)."""

    def __init__(self, depth: int, prior: float = 0.5, window: int = 8) -> None:
        self.rates = [prior] * depth
        self._weight = 1.0 / window
        self._open: list[int] = []
        self._at = 0

    def expect(self, guesses: list[int]) -> None:
        """This step's guesses at the sequence's next tokens; scored unless a list is open."""
        if not self._open:
            self._open, self._at = guesses[: len(self.rates)], 0

    def score(self, token: int) -> None:
        """The token the sequence sampled next."""
        if not self._open:
            return
        at = self._at
        hit = token == self._open[at]
        self.rates[at] += self._weight * (float(hit) - self.rates[at])
        self._at += 1
        if not hit or self._at == len(self._open):
            self._open = []

    def gains(self, n: int) -> list[float]:
        """For j = 1..n: the chance that the j-th draft yields a token (it and all before it
        are right), so the list never increases."""
        out, chance = [], 1.0
        for rate in self.rates[:n]:
            chance *= rate
            out.append(chance)
        return out


# A real step within this ratio of the load's figure for its size: the load's figures hold.
TRUST_LOAD = (0.7, 1.43)


class StepCosts:
    """Milliseconds a step takes with n output rows, measured at load and kept up to date by
    the steps that run (`observe`): a machine busy at load measures costs that are all wrong,
    and one that gets busy later changes them, and either would leave the plan drafting where
    drafts do not pay (measured: bench/drafts.py --loaded-calibration).

    A real step's time replaces the load's for its size, then a running mean of the last
    ~1/LEARN steps follows it. `sizes` are the row counts worth knowing: those no real step has
    measured yet are tried with real drafts now and then (every EXPLORE_EVERY plans, when the
    drafts at hand reach them), so that a size the load did not measure before its time budget
    ran out is not left unused for good, nor, when the first real step shows the load's figures
    were off, a size it measured too dear. (Trying every size whatever the load measured cost a
    lone counting stream ~5% on an idle machine: hence TRUST_LOAD.)"""

    LEARN = 1 / 16
    EXPLORE_EVERY = 32

    def __init__(self, ms: dict[int, float], sizes: Sequence[int] = (), learn: bool = True) -> None:
        self.ms = dict(ms)
        self.max_rows = max([*ms, *sizes], default=0)
        self._learn = learn
        self._seen: dict[int, int] = {}  # real steps observed, by size
        self._untried = sorted(set(sizes) | set(ms)) if learn else []
        self._judged = not ms  # whether the load's figures were checked against a real step
        self._plans = 0

    def observe(self, rows: int, ms: float) -> None:
        """A real step of `rows` output rows (no prefill) took `ms`."""
        if not self._learn:
            return
        seen = self._seen[rows] = self._seen.get(rows, 0) + 1
        old = self.ms.get(rows, ms)
        if not self._judged and rows in self.ms:
            # The first real step of a size the load measured: if they agree within a third,
            # the load's other figures are trusted, and only the sizes it missed are tried.
            self._judged = True
            if TRUST_LOAD[0] <= ms / max(old, 1e-3) <= TRUST_LOAD[1]:
                self._untried = [n for n in self._untried if n not in self.ms]
        self.ms[rows] = old + max(1 / seen, self.LEARN) * (ms - old)
        if rows in self._untried:
            self._untried.remove(rows)

    def plan(self, base: int, gains: Sequence[Sequence[float]]) -> list[int]:
        """How many drafts to check for each sequence this step.

        `base` is the step's rows without drafts; `gains` holds, for each sequence, the chance
        that its j-th draft yields a token (never increasing in j). So the best plan for any
        total takes the likeliest drafts first; the total chosen is the one with the most
        expected tokens per measured millisecond (sizes not measured are skipped: the kernels'
        cost is not monotonic in the row count)."""
        counts = [0] * len(gains)
        base_ms = self.ms.get(base)
        if base_ms is None:
            return counts
        ranked = sorted(((g, i) for i, seq in enumerate(gains) for g in seq), reverse=True)
        ranked = ranked[: max(self.max_rows - base, 0)]
        best, best_rate, expected = 0, base / base_ms, float(base)
        for k, (gain, _) in enumerate(ranked, start=1):
            expected += gain
            ms = self.ms.get(base + k)
            if ms is not None and expected / ms > best_rate:
                best, best_rate = k, expected / ms
        best = max(best, self._explore(base, [gain for gain, _ in ranked]))
        for _, i in ranked[:best]:
            counts[i] += 1
        return counts

    def _explore(self, base: int, gains: list[float]) -> int:
        """Drafts that make this step the smallest size no real step has measured yet, every
        EXPLORE_EVERY plans while some are left and within reach of drafts expected to be
        right half the time (so the step tried mostly pays for itself); else 0."""
        if not self._untried:
            return 0
        self._plans += 1
        if self._plans % self.EXPLORE_EVERY:
            return 0
        reach = [
            n
            for n in self._untried
            if base < n <= base + len(gains) and sum(gains[: n - base]) >= (n - base) / 2
        ]
        return reach[0] - base if reach else 0


def propose(
    costs: StepCosts | None, sequences: Sequence[tuple[Lookup, Acceptance, int]]
) -> list[tuple[list[int], int]]:
    """For each sequence (its lookup, its record, and the most drafts it may take): the
    lookup's guesses at its next tokens, and how many of them this step checks as drafts (none
    without `costs`). Guesses are made, and handed to the record, even when none is checked."""
    guesses = []
    for lookup, acceptance, n in sequences:
        guesses.append(lookup.draft(max(n, 0) + 1))
        acceptance.expect(guesses[-1])
    if costs is None:
        return [(g, 0) for g in guesses]
    gains = [a.gains(min(n, len(g))) for (_, a, n), g in zip(sequences, guesses, strict=True)]
    return list(zip(guesses, costs.plan(len(sequences), gains), strict=True))


def row_counts(slots: int, max_rows: int) -> list[int]:
    """The row counts worth measuring: every count up to the slots (a step without drafts has
    one row per running sequence), the small ones, and multiples of four (llama.cpp's multi-row
    kernels work in tiles of four; other counts cost up to a tile more, measured)."""
    sizes = set(range(1, min(slots, max_rows) + 1)) | set(range(1, min(4, max_rows) + 1))
    sizes |= set(range(4, max_rows + 1, 4))
    return sorted(sizes)


def measure_step_costs(
    ctx: LlamaContext,
    batch: Batch,
    sizes: Sequence[int],
    seq_id: int,
    token: int,
    budget_s: float = 1.0,
) -> StepCosts:
    """Time one decode step for each row count, smallest first (best of two, after a warm-up
    step), on `seq_id`, which must be empty, and leave it empty. Counts still unmeasured when
    `budget_s` is spent are learned later from real steps (`StepCosts`): a large model on a
    small CPU does not hold its first request back for long (Gemma 3 270M measures them all in
    ~0.5 s here)."""
    ms: dict[int, float] = {}
    deadline = time.perf_counter() + budget_s
    for n in [sizes[0], *sizes, *sizes]:
        if time.perf_counter() > deadline:
            break
        batch.clear()
        for pos in range(n):
            batch.add(token, pos, seq_id, logits=True)
        t0 = time.perf_counter()
        rc = ctx.decode(batch)
        elapsed = (time.perf_counter() - t0) * 1000.0
        ctx.seq_rm(seq_id, 0)
        if rc != 0:
            return StepCosts({}, learn=False)
        ms[n] = min(ms.get(n, elapsed), elapsed)
    batch.clear()
    logger.info("step ms by output rows: %s", ", ".join(f"{n}: {ms[n]:.1f}" for n in sorted(ms)))
    return StepCosts(ms, sizes)
