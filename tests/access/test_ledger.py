from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from thoxd.access import AccessDb, UsageLedger
from thoxd.access.ledger import DAY, HOUR


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


NOON = 20_000 * DAY + 12 * HOUR


def test_usage_is_written_in_batches_and_read_back(database: AccessDb) -> None:
    clock = Clock(NOON)
    ledger = UsageLedger(database, clock=clock)
    ledger.record("key_a", "m1", 10, 5, 1)
    ledger.record("key_a", "m1", 3, 2, 1)
    ledger.record("key_b", "m2", 7, 0, 1)
    other = UsageLedger(AccessDb(database.path))
    assert other.report(0, NOON + DAY) == []  # nothing written before a flush
    ledger.flush()
    rows = {(r.client, r.model): (r.tokens, r.requests) for r in other.report(0, NOON + DAY)}
    assert rows == {("key_a", "m1"): (20, 2), ("key_b", "m2"): (7, 1)}
    assert [r.client for r in other.report(0, NOON + DAY, "key_b")] == ["key_b"]
    assert other.report(NOON + HOUR, NOON + DAY) == []  # the hour before `start`


def test_tokens_today_survive_a_restart_and_start_again_at_midnight(database: AccessDb) -> None:
    clock = Clock(NOON)
    ledger = UsageLedger(database, clock=clock)
    ledger.start()
    ledger.record("key_a", "m1", 100, 20, 1)
    ledger.close()
    restarted = UsageLedger(database, clock=clock)
    restarted.start()
    try:
        assert restarted.tokens_today("key_a") == 120
        clock.now = NOON + 12 * HOUR  # midnight UTC
        assert restarted.tokens_today("key_a") == 0
        restarted.record("key_a", "m1", 1, 1, 1)
        assert restarted.tokens_today("key_a") == 2
    finally:
        restarted.close()


def test_close_writes_what_is_left(database: AccessDb) -> None:
    ledger = UsageLedger(database, every=3600)  # the writer never wakes: close must write
    ledger.start()
    ledger.record("key_a", "m1", 4, 4, 1)
    ledger.used("key_a")
    ledger.close()
    assert [(r.tokens, r.requests) for r in UsageLedger(database).report(0, 2**40)] == [(8, 1)]


def test_a_failed_write_keeps_the_counts_for_the_next(
    database: AccessDb, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ledger = UsageLedger(database)
    ledger.record("key_a", "m1", 4, 4, 1)
    real = database.path
    monkeypatch.setattr(database, "path", tmp_path / "missing" / "access.db")  # cannot open
    with pytest.raises(sqlite3.Error):
        ledger.flush()
    ledger.record("key_a", "m1", 1, 1, 1)
    monkeypatch.setattr(database, "path", real)
    ledger.flush()
    assert [(r.tokens, r.requests) for r in ledger.report(0, 2**40)] == [(10, 2)]
