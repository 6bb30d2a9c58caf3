"""Scalar field types: durations, sizes, names, host:port, and their display forms.

These are the file's vocabulary, shared by every section (a timeout is written the same way on a
backend, a shadow and the listener), so they sit below all the models and know none of them.
Each is a plain function first and a pydantic type second, so that code without a model (the
summary, the listeners' `listen_addr`) uses the same parsing. A parser and its inverse sit side
by side so that `format_duration(parse_duration(x)) == x` stays true when a unit is added.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Strict

# `d` exists for retention-like settings (`retention: 7d`); no weeks or months, whose length
# people disagree on.
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|d|h|m|s))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(value: object) -> float:
    """Turn `250ms`, `5s`, `1m`, `1.5s`, `1m30s`, `7d` or a bare number (seconds) into seconds.

    Booleans are refused even though Python treats them as ints: `timeout: yes` is a mistake.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {str(value).lower()} (use e.g. 250ms, 5s, 1m)")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative: {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            return float(text)
        if _DURATION_FULL.fullmatch(text):
            return sum(
                float(num) * _DURATION_UNITS[unit] for num, unit in _DURATION_PART.findall(text)
            )
    raise ValueError(f"not a duration: {value!r} (use e.g. 250ms, 5s, 1m)")


_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", re.IGNORECASE)


def parse_size(value: object) -> int:
    """Turn `512`, `10KiB`, `1MiB`, `1GiB` or `1KB` (= 1000) into bytes.

    Units are case-insensitive but the `i` matters: KiB is 1024, KB is 1000, as in IEC 80000-13.
    A size must come out as a whole number of bytes (`1.5KiB` yes, `1.1B` no).
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {str(value).lower()} (use e.g. 512, 64KiB, 1MiB)")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative: {value!r}")
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m:
            mult = _SIZE_UNITS[(m.group(2) or "b").lower()]
            number = m.group(1)
            if "." not in number:
                return int(number) * mult
            total = float(number) * mult
            if total.is_integer():
                return int(total)
            raise ValueError(f"not a whole number of bytes: {value!r}")
    raise ValueError(f"not a size: {value!r} (use e.g. 512, 64KiB, 1MiB)")


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be > 0")
    return value


#: seconds, from `250ms` / `5s` / `1m` / a bare number; never negative
Duration = Annotated[float, BeforeValidator(parse_duration)]
#: a Duration that must be > 0 (timeouts: zero would fail every request)
Timeout = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
#: bytes, from `512` / `64KiB` / `1MB`; never negative
Size = Annotated[int, BeforeValidator(parse_size)]
# Strict so that `max_connections: yes` (a YAML bool) is an error instead of 1.
Int = Annotated[int, Strict()]

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_name(value: str) -> str:
    """Route and backend names become metric labels and admin API path segments."""
    if not _NAME.fullmatch(value):
        raise ValueError(f"bad name {value!r}: use letters, digits and _ . - only")
    return value


Name = Annotated[str, AfterValidator(_check_name)]


def parse_host_port(value: str) -> tuple[str, int]:
    """Split `host:port` / `[v6]:port` into a bind tuple; port 0 (ephemeral) is allowed.

    The host is required: binding every interface must be written out (`0.0.0.0:8080`), since an
    ingress that listens more widely than meant is a security problem, not a convenience.
    """
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"not host:port: {value!r} (IPv6 is written [::1]:8080)")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address: {host!r}") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"not host:port: {value!r} (e.g. 127.0.0.1:8080)")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets: {value!r} (e.g. [::1]:8080)")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad port in {value!r}: must be 0..65535")
    return host, int(port)


def _check_listen(value: str) -> str:
    parse_host_port(value)
    return value


Listen = Annotated[str, AfterValidator(_check_listen)]

#: an HTTP token (RFC 9110 5.6.2): what a method or a header name may be made of
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def format_duration(seconds: float) -> str:
    """Inverse of parse_duration for display: 0.25 -> 250ms, 90 -> 90s, 120 -> 2m."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds % 86400 == 0:
        return f"{seconds / 86400:g}d"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """Inverse of parse_size for display: the largest unit that divides exactly."""
    for unit, mult in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % mult == 0:
            return f"{size // mult}{unit}"
    for unit, mult in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if size and size % mult == 0:
            return f"{size // mult}{unit}"
    return f"{size}B"
