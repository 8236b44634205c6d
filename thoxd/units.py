"""Durations and sizes as people write them in models.toml, settings and requests.

A duration is seconds (a number) or text like "90s", "5m", "1h30m"; negative or "forever" means
no limit (Ollama's keep_alive convention), returned as math.inf. A size is bytes, "512MiB",
"6GB", or a share of memory such as "80%" (resolved by the caller, who knows the whole).
"""

from __future__ import annotations

import math
import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?$", re.IGNORECASE)
_FOREVER = frozenset({"forever", "never", "inf", "infinite"})


def parse_duration(value: object) -> float:
    """Seconds, math.inf for "no limit". Raises ValueError on anything else."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in _FOREVER:
            return math.inf
        seconds = (
            -_parse_duration_text(text[1:])
            if text.startswith("-")
            else (_parse_duration_text(text))
        )
    else:
        raise ValueError("a duration is a number of seconds or text like '5m'")
    if math.isnan(seconds):
        raise ValueError("a duration must be a number")
    return math.inf if seconds < 0 else seconds


def _parse_duration_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    if not text or _DURATION_PART.sub("", text):
        raise ValueError(f"'{text[:32]}' is not a duration (use seconds, or e.g. 90s, 5m, 1h30m)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


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
        text = value.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                percent = math.nan
            if not 0 < percent <= 100:
                raise ValueError("a share of memory is between 0% and 100%")
            return None, percent / 100.0
        match = _SIZE.match(text)
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
