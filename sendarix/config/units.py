"""Parsing of the human units used in configuration: durations, sizes and rates.

Each parser takes the raw TOML value and the dotted key it came from, so a bad value
fails with a :class:`~sendarix.config.errors.ConfigError` that names the key.
"""

from __future__ import annotations

import math
import re

from sendarix.config.errors import ConfigError

# Seconds per duration unit.
DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0, "sec": 1.0,
    "m": 60.0, "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}  # fmt: skip

# Bytes per size unit: decimal KB/MB/GB, binary KiB/MiB/GiB.
SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}  # fmt: skip

# Seconds per rate period.
RATE_UNITS: dict[str, float] = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0,
    "d": 86400.0, "day": 86400.0,
}  # fmt: skip

_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*([A-Za-z]+)\s*")


def _is_number(value: object) -> bool:
    # bool is an int subclass, but `true` is never a sensible duration or size.
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_duration(value: object, key: str) -> float:
    """Seconds from a number of seconds or a string like ``"500ms"``, ``"1.5h"``, ``"30"``."""
    expected = 'a duration like "30s", "5m", "4h", "5d" or a number of seconds'
    if _is_number(value):
        seconds = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str):
        m = _NUMBER_UNIT.fullmatch(value)
        unit = m.group(2).lower() if m else ""
        if m is None or (unit and unit not in DURATION_UNITS):
            raise ConfigError(key, f"expected {expected}, got {value!r}")
        seconds = float(m.group(1)) * DURATION_UNITS.get(unit, 1.0)
    else:
        raise ConfigError(key, f"expected {expected}, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(key, f"expected {expected}, got {value!r}")
    return seconds


def parse_size(value: object, key: str) -> int:
    """Bytes from an integer or a string like ``"50MiB"``, ``"10MB"``, ``"512KiB"``, ``"100"``."""
    expected = 'a size like "50MiB", "10MB", "512KiB" or a number of bytes'
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        m = _NUMBER_UNIT.fullmatch(value)
        unit = m.group(2).lower() if m else ""
        if m is None or (unit and unit not in SIZE_UNITS):
            raise ConfigError(key, f"expected {expected}, got {value!r}")
        amount = float(m.group(1)) * SIZE_UNITS.get(unit, 1)
        if not math.isfinite(amount):
            raise ConfigError(key, f"expected {expected}, got {value!r}")
        size = round(amount)
    else:
        raise ConfigError(key, f"expected {expected}, got {value!r}")
    if size < 0:
        raise ConfigError(key, f"expected {expected}, got {value!r}")
    return size


def parse_rate(value: object, key: str) -> tuple[float, float]:
    """``(count, period_seconds)`` from ``"N/s"``, ``"N/min"``, ``"N/h"`` or ``"N/day"``.

    The pair matches :meth:`sendarix.ingress.ratelimit.RateLimiter.allow` (``rate``, ``period``).
    """
    expected = 'a rate like "10/s", "600/min", "5000/h" or "100000/day"'
    m = _RATE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ConfigError(key, f"expected {expected}, got {value!r}")
    unit = m.group(2).lower()
    if len(unit) > 2 and unit.endswith("s"):  # plurals: "mins", "hours", "days"
        unit = unit[:-1]
    count = float(m.group(1))
    if unit not in RATE_UNITS or count <= 0:
        raise ConfigError(key, f"expected {expected}, got {value!r}")
    return count, RATE_UNITS[unit]


def format_duration(seconds: float) -> str:
    """The shortest exact unit string for ``seconds`` (``300`` -> ``"5m"``), for messages
    and ``config check`` output; ``parse_duration`` reads it back."""
    for unit in ("w", "d", "h", "m", "s"):
        scale = DURATION_UNITS[unit]
        if seconds >= scale and float(seconds / scale).is_integer():
            return f"{int(seconds // scale)}{unit}"
    millis = seconds * 1000
    if millis.is_integer():
        return f"{int(millis)}ms"
    return f"{seconds!r}s"


def format_size(size: int) -> str:
    """``52428800`` -> ``"50MiB"``; sizes that are not a whole number of a unit stay bytes."""
    for unit in ("GiB", "MiB", "KiB", "GB", "MB", "KB"):
        scale = SIZE_UNITS[unit.lower()]
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)
