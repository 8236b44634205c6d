"""The usage ledger: tokens and requests by client, model and hour, kept in SQLite.

Counted where the engine finishes a generation (prompt and completion tokens, cancelled ones
included), added up in memory, and written by a thread of its own once a second in one
transaction: the event loop and the engine never wait for the disk. `close()` (SIGTERM) writes
what is left; a SIGKILL loses at most the last second.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from thoxd.access.database import AccessDb

logger = logging.getLogger("thoxd.access")

DAY = 86_400
HOUR = 3_600


@dataclass
class Tally:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0


@dataclass
class UsageRow:
    client: str
    model: str
    tokens: int
    requests: int


@dataclass
class _Pending:
    usage: dict[tuple[str, str, int], Tally] = field(default_factory=dict)
    last_used: dict[str, int] = field(default_factory=dict)


class UsageLedger:
    def __init__(
        self, db: AccessDb, *, every: float = 1.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = db
        self.every = every
        self.clock = clock
        self._lock = threading.Lock()
        self._pending = _Pending()
        self._day = -1  # the UTC day `_today` counts
        self._today: Counter[str] = Counter()  # tokens by client on that day, written or not
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._roll(int(self.clock()) // DAY, load=True)
        self._stop.clear()
        self._writer = threading.Thread(target=self._write_loop, name="thoxd-usage", daemon=True)
        self._writer.start()

    def close(self) -> None:
        """Stop the writer and write what is left."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        self.flush()

    def _write_loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.flush()
            except sqlite3.Error as exc:  # kept in memory and tried again next second
                logger.error("usage not written yet: %s", exc)

    # -- counting (any thread) ------------------------------------------------------------------

    def record(self, client: str, model: str, prompt: int, completion: int, requests: int) -> None:
        now = int(self.clock())
        with self._lock:
            if now // DAY != self._day:
                self._roll(now // DAY, load=False)
            tally = self._pending.usage.setdefault((client, model, now - now % HOUR), Tally())
            tally.prompt_tokens += prompt
            tally.completion_tokens += completion
            tally.requests += requests
            self._today[client] += prompt + completion

    def used(self, key_id: str) -> None:
        """A key was used now (its `last_used`)."""
        with self._lock:
            self._pending.last_used[key_id] = int(self.clock())

    def tokens_today(self, client: str) -> int:
        """Tokens `client` used since midnight UTC (for tokens_per_day)."""
        now = int(self.clock())
        with self._lock:
            if now // DAY != self._day:
                self._roll(now // DAY, load=False)
            return self._today[client]

    def _roll(self, day: int, *, load: bool) -> None:
        self._day = day
        self._today = Counter()
        if load:
            with self.db.connect() as db:
                rows = db.execute(
                    "SELECT client, sum(prompt_tokens + completion_tokens) FROM usage"
                    " WHERE hour >= ? GROUP BY client",
                    (day * DAY,),
                ).fetchall()
            self._today.update(dict(rows))

    # -- writing and reading ----------------------------------------------------------------------

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, _Pending()
        if not pending.usage and not pending.last_used:
            return
        try:
            with self.db.connect() as db:
                db.executemany(
                    "INSERT INTO usage (client, model, hour, prompt_tokens, completion_tokens,"
                    " requests) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (client, model, hour) DO"
                    " UPDATE SET prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                    " completion_tokens = completion_tokens + excluded.completion_tokens,"
                    " requests = requests + excluded.requests",
                    [
                        (client, model, hour, t.prompt_tokens, t.completion_tokens, t.requests)
                        for (client, model, hour), t in pending.usage.items()
                    ],
                )
                db.executemany(
                    "UPDATE keys SET last_used = max(coalesce(last_used, 0), ?) WHERE id = ?",
                    [(at, key_id) for key_id, at in pending.last_used.items()],
                )
        except sqlite3.Error:
            self._restore(pending)
            raise

    def _restore(self, pending: _Pending) -> None:
        """Put back what could not be written, so nothing counted is lost."""
        with self._lock:
            for slot, tally in pending.usage.items():
                mine = self._pending.usage.setdefault(slot, Tally())
                mine.prompt_tokens += tally.prompt_tokens
                mine.completion_tokens += tally.completion_tokens
                mine.requests += tally.requests
            for key_id, at in pending.last_used.items():
                self._pending.last_used[key_id] = max(at, self._pending.last_used.get(key_id, 0))

    def report(self, start: int, end: int, client: str | None = None) -> list[UsageRow]:
        """Tokens and requests by client and model in the hours from `start` to `end` (unix
        seconds, inclusive; the hour holding `start` counts whole). Blocking: call it from a
        worker thread."""
        self.flush()
        query = (
            "SELECT client, model, sum(prompt_tokens + completion_tokens), sum(requests)"
            " FROM usage WHERE hour >= ? AND hour <= ?"
        )
        args: list[object] = [start - start % HOUR, end]
        if client is not None:
            query += " AND client = ?"
            args.append(client)
        with self.db.connect() as db:
            rows = db.execute(query + " GROUP BY client, model ORDER BY client, model", args)
            return [UsageRow(*row) for row in rows.fetchall()]
