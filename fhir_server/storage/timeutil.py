"""FHIR date/dateTime/instant values <-> naive-UTC ranges, and instant formatting.

A FHIR date has a precision (year, month, day, minute, second...). Search treats a value as the
range it covers, so `2024` is [2024-01-01T00:00, 2024-12-31T23:59:59.999999]. Values without a
time zone are read as UTC: the server has no better local zone to assume.
"""

from __future__ import annotations

import calendar
import re
from datetime import datetime, timedelta, timezone

_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})"
    r"(T(?P<H>\d{2}):(?P<M>\d{2})(:(?P<S>\d{2})(?P<f>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)

_TICK = timedelta(microseconds=1)


class DateParseError(ValueError):
    pass


def utcnow() -> datetime:
    """Now as naive UTC, truncated to milliseconds so stored and rendered values agree."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return now.replace(microsecond=(now.microsecond // 1000) * 1000)


def format_instant(value: datetime) -> str:
    """Naive UTC -> FHIR instant text, e.g. 2026-01-02T03:04:05.678+00:00."""
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}+00:00"


def http_date(value: datetime) -> str:
    """Naive UTC -> RFC 7231 date for Last-Modified."""
    return value.replace(tzinfo=timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")


def to_naive_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def parse_range(text: str) -> tuple[datetime, datetime]:
    """A FHIR date/dateTime/instant -> inclusive (low, high) in naive UTC."""
    match = _DATE_RE.match(text.strip())
    if not match:
        raise DateParseError(f"not a FHIR date/dateTime: {text!r}")
    g = match.groupdict()
    try:
        year = int(g["y"])
        if g["m"] is None:
            low = datetime(year, 1, 1)
            return low, datetime(year + 1, 1, 1) - _TICK if year < 9999 else datetime.max
        month = int(g["m"])
        if g["d"] is None:
            low = datetime(year, month, 1)
            last = calendar.monthrange(year, month)[1]
            return low, datetime(year, month, last) + timedelta(days=1) - _TICK
        day = int(g["d"])
        if g["H"] is None:
            low = datetime(year, month, day)
            return low, low + timedelta(days=1) - _TICK
        hour, minute = int(g["H"]), int(g["M"])
        if g["S"] is None:
            low, span = datetime(year, month, day, hour, minute), timedelta(minutes=1)
        elif g["f"] is None:
            low, span = datetime(year, month, day, hour, minute, int(g["S"])), timedelta(seconds=1)
        else:
            digits = g["f"][1:]
            micro = int((digits + "000000")[:6])
            low = datetime(year, month, day, hour, minute, int(g["S"]), micro)
            span = timedelta(microseconds=10 ** max(0, 6 - len(digits)))
    except ValueError as exc:  # e.g. month 13, day 31 in April
        raise DateParseError(f"not a valid date: {text!r} ({exc})") from exc
    tz = g["tz"]
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        offset = timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
        low = low - sign * offset
    return low, low + span - _TICK
