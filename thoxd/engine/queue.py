"""What waits for a model's engine thread: generations for a slot, and embeddings requests.

Both are bounded. Generations are taken fairly between clients (FIFO within one client),
embeddings FIFO. A request is one entry however many prompts it has (a completion with a
list of prompts is one request to its client), and a cancelled request stops counting against
the bound at once, before the engine thread has taken it out. Past the bound: QueueFull (503 with
Retry-After).

Not thread-safe on its own: the scheduler calls it under its lock.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping, Sequence

from thoxd.engine.request import Embedding, Finished, Generation, Timings
from thoxd.errors import QueueFull


class WaitQueue:
    def __init__(self, size: int, cap: int = 0) -> None:
        self.size = size
        self.cap = cap  # most slots one client holds while others are served (0: no cap)
        self._entries: deque[list[Generation]] = deque()  # each: a request's waiting prompts
        self._embeds: deque[Embedding] = deque()  # the first one is being worked on

    def __bool__(self) -> bool:
        return bool(self._entries or self._embeds)

    def waiting(self) -> int:
        """Generations and embeddings requests not yet running (cancelled ones included until
        the engine thread has taken them out)."""
        return sum(len(entry) for entry in self._entries) + len(self._embeds)

    def add(self, gens: Sequence[Generation], idle_slots: int) -> None:
        """One request's generations, all or none; `idle_slots` of them start at once."""
        queued = sum(1 for entry in self._entries if not all(g.cancelled for g in entry))
        if queued >= self.size + idle_slots:
            raise QueueFull(queued)
        self._entries.append(list(gens))

    def add_embedding(self, job: Embedding) -> None:
        """One runs and `size` may wait."""
        queued = sum(1 for e in self._embeds if not e.cancelled)
        if queued > self.size:
            raise QueueFull(queued - 1)
        self._embeds.append(job)

    def take(self, n: int, running: Mapping[str, int] | None = None) -> list[Generation]:
        """Up to `n` generations, after the cancelled ones have left (told so). Fair between
        clients: each comes from the oldest request of the client holding the fewest slots
        (`running`, plus what this call took), so one client's backlog waits behind another's
        single request, not in front of it. FIFO within a client, and between equal shares.
        `cap`: a client holding that many slots takes no more while another client
        holds a slot or waits, so a newcomer finds a slot free instead of waiting for one of a
        flood's generations to end; a client alone on the model may use every slot."""
        for entry in self._entries:
            for gen in [g for g in entry if g.cancelled]:
                entry.remove(gen)
                gen.push(Finished("cancelled", len(gen.prompt), 0, Timings()))
        entries = [entry for entry in self._entries if entry]
        held = Counter(running or {})
        taken: list[Generation] = []
        while entries and len(taken) < n:
            allowed = [k for k in range(len(entries)) if self._may_take(entries, k, held, self.cap)]
            if not allowed:
                break
            i = min(allowed, key=lambda k: (held[entries[k][0].client], k))
            gen = entries[i].pop(0)
            taken.append(gen)
            held[gen.client] += 1
            if not entries[i]:
                del entries[i]
        self._entries = deque(entries)
        return taken

    @staticmethod
    def _may_take(entries: list[list[Generation]], k: int, held: Counter[str], cap: int) -> bool:
        client = entries[k][0].client
        if not cap or held[client] < cap:
            return True
        return not any(c != client and n > 0 for c, n in held.items()) and all(
            entry[0].client == client for entry in entries
        )

    def embedding(self) -> Embedding | None:
        """The embeddings request to work on now; cancelled ones are dropped first."""
        while self._embeds and self._embeds[0].cancelled:
            self._embeds.popleft().drop()
        return self._embeds[0] if self._embeds else None

    def embedding_done(self, job: Embedding) -> None:
        self._embeds.remove(job)

    def drain(self) -> tuple[list[Generation], list[Embedding]]:
        """Everything still waiting, taken out (at shutdown, or when the model fails)."""
        gens = [g for entry in self._entries for g in entry]
        embeds = list(self._embeds)
        self._entries.clear()
        self._embeds.clear()
        return gens, embeds
