"""thoxd/units.py: durations and sizes as people write them, and back."""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

import pytest

import thoxd.units
from thoxd.units import MAX_TEXT, format_bytes, format_duration, parse_duration, parse_size

GIB = 1024**3
MIB = 1024**2

# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        ("0", 0.0),
        (30, 30.0),
        (2.5, 2.5),
        ("45", 45.0),
        ("1.5", 1.5),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("2d", 172800.0),
        ("250ms", 0.25),  # "ms" is milliseconds, not minutes then seconds
        ("1.5h", 5400.0),
        (" 5M ", 300.0),  # spaces around and case do not matter
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert result == pytest.approx(seconds)
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "value",
    [-1, -0.5, "-1", "-30", "-5m", "forever", "FOREVER", "never", "inf", "infinite", math.inf],
)
def test_negative_or_forever_means_no_limit(value: object) -> None:
    assert parse_duration(value) == math.inf


@pytest.mark.parametrize(
    "value",
    ["abc", "5x", "", "   ", "5 m", "m", "5m-", "h1", "nan", math.nan, True, False, None, [5]],
    ids=repr,
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_rejected_duration_message_is_short() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration("x" * 10_000)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("text", ["1" * 100_000 + "x", "1" * 100_000, "5m" * 50_000])
def test_long_duration_text_is_refused_by_its_length(text: str) -> None:
    # A backtracking scan took 43 s on 45 000 digits (the watchdog kills the daemon at 30 s):
    # the length is checked before anything parses the text.
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == f"a duration is at most 64 characters long, not {len(text)}"


def test_a_number_just_over_the_length_limit_is_refused() -> None:
    assert parse_duration("1" * MAX_TEXT) == float("1" * MAX_TEXT)
    with pytest.raises(ValueError, match="at most 64 characters"):
        parse_duration("1" * (MAX_TEXT + 1))
    with pytest.raises(ValueError, match="at most 64 characters"):
        parse_duration(" " * MAX_TEXT + "5m")  # the raw text counts, spaces too


class CountingPattern:
    """Wraps the duration part pattern; records where each match was tried."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.tried: list[int] = []

    def match(self, text: str, pos: int = 0) -> re.Match[str] | None:
        self.tried.append(pos)
        return self.pattern.match(text, pos)

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the duration parser used {name}(), not match() at one position")


@pytest.mark.parametrize(
    ("text", "tried"),
    [("1h30m", [0, 2]), ("1s" * 32, list(range(0, 64, 2))), ("1h30mx", [0, 2, 5]),
     ("1" * 63 + "x", [0])],
)  # fmt: skip
def test_duration_parts_are_scanned_once_from_left_to_right(
    monkeypatch: pytest.MonkeyPatch, text: str, tried: list[int]
) -> None:
    # Linear by construction: each part is matched where the previous one ended, once; no
    # search that restarts at every position.
    counting = CountingPattern(thoxd.units._DURATION_PART)
    monkeypatch.setattr(thoxd.units, "_DURATION_PART", counting)
    with contextlib.suppress(ValueError):
        parse_duration(text)
    assert counting.tried == tried


@pytest.mark.parametrize(
    "value",
    [10**400, -(10**400), "1e400", "-1e400"],
    ids=["10**400", "-10**400", "1e400", "-1e400"],
)
def test_numbers_no_float_holds_are_refused(value: object) -> None:
    # Not "forever": like Ollama, a number a float cannot hold is refused, either sign.
    with pytest.raises(ValueError, match="out of range"):
        parse_duration(value)


def test_the_largest_numbers_a_float_holds_are_durations() -> None:
    assert parse_duration(10**308) == 1e308
    assert parse_duration(-(10**308)) == math.inf  # negative: no limit
    assert parse_duration("-inf") == parse_duration("infinity") == math.inf


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (45, "45s"),
        (0.25, "0.25s"),
        (90, "90s"),  # not a whole minute: stays in seconds
        (59.6, "59.6s"),  # nor is this, though it rounds to one
        (60, "1m"),
        (300, "5m"),
        (3600, "1h"),
        (5400, "1h30m"),
        (math.inf, "forever"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", ["45s", "5m", "1h30m", "forever"])
def test_format_duration_round_trips(text: str) -> None:
    assert format_duration(parse_duration(text)) == text
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (123456789, 123456789),
        ("1024", 1024),
        ("1B", 1),
        ("1K", 1000),
        ("1KiB", 1024),
        ("512MiB", 512 * MIB),
        ("512 MiB", 512 * MIB),
        ("512mib", 512 * MIB),
        ("6GB", 6 * 10**9),
        ("6G", 6 * 10**9),
        ("1.5GiB", GIB + GIB // 2),
        ("2TiB", 2 * 1024**4),
    ],
)
def test_parse_size_absolute(value: object, expected: int) -> None:
    assert parse_size(value) == (expected, None)


@pytest.mark.parametrize(("text", "share"), [("80%", 0.8), ("100%", 1.0), ("0.5%", 0.005)])
def test_parse_size_share(text: str, share: float) -> None:
    absolute, fraction = parse_size(text)
    assert absolute is None
    assert fraction == pytest.approx(share)


@pytest.mark.parametrize(
    "value",
    [
        "0B",
        "0",
        "0%",
        "101%",
        "-5%",
        "nan%",
        "%",
        "lots",
        "",
        "5XB",
        "-1GiB",
        "0.5B",  # rounds down to nothing
        0,
        -1,
        -1024,
        True,
        False,
        1.5,
        None,
    ],
    ids=repr,
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize("text", ["9" * 400 + "TiB", "1" * 100_000, "1" * 64 + "B"])
def test_long_size_text_is_refused_by_its_length(text: str) -> None:
    # 400 nines overflowed to a float infinity and then int(): a traceback, not a message.
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == f"a size is at most 64 characters long, not {len(text)}"


def test_the_longest_size_text_is_parsed() -> None:
    assert parse_size("9" * 61 + "TiB") == (int(float("9" * 61) * 1024**4), None)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (246587904, "235.2 MiB"),
        (576 * MIB, "576.0 MiB"),
        (GIB + GIB // 2, "1.5 GiB"),
        (3 * 1024**4, "3072.0 GiB"),  # GiB is the largest unit
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text
