"""Value checks for configuration fields: `field(metadata={"check": seconds})`.

Each returns a problem to report, or None when the value is fine.
"""

from __future__ import annotations

# A day: longer timeouts and intervals are mistakes, and infinite ones crash the waits on them.
MAX_SECONDS = 86400.0


def seconds(value: float) -> str | None:
    """A timeout or an interval: positive and finite, at most a day."""
    if 0 < value <= MAX_SECONDS:
        return None
    return f"must be greater than 0 and at most {MAX_SECONDS:g} seconds, got {value!r}"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value!r}"


def port_range(value: str) -> str | None:
    low, sep, high = value.partition("-")
    if sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535:
        return None
    return f"expected a port range like 1024-65535, got {value!r}"
