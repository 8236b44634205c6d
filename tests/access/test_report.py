from __future__ import annotations

import pytest

from thoxd.access import AccessDb, UsageLedger
from thoxd.access.report import iso, month_of, parse_time, usage_report


def test_month_of_gives_the_calendar_month() -> None:
    start, end = month_of(parse_time("2024-02-10T05:00:00Z", end=False))
    assert (iso(start), iso(end)) == ("2024-02-01T00:00:00Z", "2024-02-29T23:59:59Z")


@pytest.mark.parametrize(
    ("text", "end", "expected"),
    [
        ("1700000000", False, 1700000000),
        ("2024-01-31", False, parse_time("2024-01-31T00:00:00Z", end=False)),
        ("2024-01-31", True, parse_time("2024-01-31T23:59:59Z", end=False)),
        ("2024-01-31T12:00:00+02:00", False, parse_time("2024-01-31T10:00:00Z", end=False)),
        ("2024-01-31T10:00:00", False, parse_time("2024-01-31T10:00:00Z", end=False)),
    ],
)
def test_parse_time(text: str, end: bool, expected: int) -> None:
    assert parse_time(text, end=end) == expected


@pytest.mark.parametrize("text", ["yesterday", "2024-13-01", ""])
def test_parse_time_refuses_what_is_no_time(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text, end=False)


def test_the_report_has_the_rax_shape_and_a_part_per_key(database: AccessDb) -> None:
    ledger = UsageLedger(database)
    ledger.record("key_a", "m1", 10, 5, 1)
    ledger.record("key_a", "m2", 1, 1, 1)
    ledger.record("ip:192.168.1.5", "m1", 3, 0, 1)
    everyone = usage_report(ledger, 0, 4_000_000_000, names={"key_a": "alice"})
    assert everyone["object"] == "usage"
    assert (everyone["total_tokens"], everyone["total_requests"]) == (20, 3)
    assert everyone["breakdown"] == {
        "m1": {"tokens": 18, "requests": 2},
        "m2": {"tokens": 2, "requests": 1},
    }
    assert everyone["by_key"]["key_a"]["name"] == "alice"
    assert everyone["by_key"]["key_a"]["total_tokens"] == 17
    assert everyone["by_key"]["ip:192.168.1.5"]["name"] == "192.168.1.5"
    one = usage_report(ledger, 0, 4_000_000_000, client="key_a")
    assert one["key_id"] == "key_a" and one["total_tokens"] == 17 and "by_key" not in one
    assert one["period_start"] == "1970-01-01T00:00:00Z"
