"""Durations and sizes as people write them in models.toml, settings and requests.

A duration is seconds (a number) or text like "90s", "5m", "1h30m"; negative or "forever" means
no limit (Ollama's keep_alive convention), returned as math.inf. A size is bytes, "512MiB",
"6GB", or a share of memory such as "80%" (resolved by the caller, who knows the whole).

Text comes from clients and files, so its length is checked before anything else looks at it
(MAX_TEXT), and what parses it reads each character once.
"""

from __future__ import annotations

import math
import re

MAX_TEXT = 64  # characters; "1h30m", "512MiB" and "forever" need far fewer
# One "<number><unit>" part, matched where the previous one ended: no scan of every position.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?", re.ASCII | re.IGNORECASE)
_FOREVER = frozenset({"forever", "never", "inf", "infinite", "infinity"})
_NOT_A_DURATION = "a duration is a number of seconds or text like '5m'"
_OUT_OF_RANGE = "the number is out of range for a duration (for no limit use -1 or 'forever')"


def _bounded(text: str, what: str) -> str:
    if len(text) > MAX_TEXT:
        raise ValueError(f"{what} is at most {MAX_TEXT} characters long, not {len(text)}")
    return text


def parse_duration(value: object) -> float:
    """Seconds, math.inf for "no limit". Raises ValueError on anything else."""
    if isinstance(value, bool):
        raise ValueError(_NOT_A_DURATION)
    if isinstance(value, int):
        try:
            seconds = float(value)
        except OverflowError:
            # Like Ollama (Go's float64): a number no float can hold is refused, either sign;
            # "forever" and -1 are the ways to say "no limit".
            raise ValueError(_OUT_OF_RANGE) from None
    elif isinstance(value, float):
        seconds = value
    elif isinstance(value, str):
        text = _bounded(value, "a duration").strip().lower()
        if text in _FOREVER:
            return math.inf
        seconds = _parse_duration_text(text)
    else:
        raise ValueError(_NOT_A_DURATION)
    if math.isnan(seconds):
        raise ValueError("a duration must be a number")
    return math.inf if seconds < 0 else seconds


def _parse_duration_text(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isinf(seconds) and "inf" not in text:  # "1e999" overflowed; "-inf" did not
            raise ValueError(_OUT_OF_RANGE)
        return seconds
    sign, at = (-1.0, 1) if text.startswith("-") else (1.0, 0)
    total, start = 0.0, at
    while at < len(text):
        part = _DURATION_PART.match(text, at)
        if part is None:
            break
        total += float(part[1]) * _DURATION_UNITS[part[2]]
        at = part.end()
    if at == start or at < len(text):
        raise ValueError(f"{text!r} is not a duration (use seconds, or e.g. 90s, 5m, 1h30m)")
    return sign * total


def format_duration(seconds: float) -> str:
    """The inverse, for messages and listings: "forever", "45s", "5m", "1h30m"."""
    if math.isinf(seconds):
        return "forever"
    whole = round(seconds)
    if whole < 60 or whole % 60 or whole != seconds:
        return f"{seconds:g}s"
    hours, minutes = divmod(whole // 60, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")


def parse_size(value: object) -> tuple[int | None, float | None]:
    """(bytes, None) for an absolute size, (None, fraction) for "NN%". Raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, None
    if isinstance(value, str):
        text = _bounded(value, "a size").strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                percent = math.nan
            if not 0 < percent <= 100:
                raise ValueError("a share of memory is between 0% and 100%")
            return None, percent / 100.0
        match = _SIZE.fullmatch(text)
        if match:
            number, unit = float(match[1]), (match[2] or "").upper()
            base = 1024 if "I" in unit else 1000
            scale = base ** ("BKMGT".index(unit[0])) if unit and unit[0] != "B" else 1
            if int(number * scale) > 0:
                return int(number * scale), None
    raise ValueError("a size is bytes, or text like '512MiB', '6GB' or '80%'")


def format_bytes(n: int) -> str:
    """Binary units, one decimal: "235.2 MiB", "1.5 GiB"."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
