"""Sampling fields shared by shadows and recordings: a percent, and a key to sample by.

A module of its own because two sections use them (`routes[].shadows[]` and `record:` on a route
or a shadow) and they must mean the same in both: the same users are shadowed and recorded when
both sample by the same key (see shadow/sampling.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator


def _key_spec(value: str, kinds: Iterable[str], bare: Iterable[str], what: str) -> str:
    """Validate `kind:NAME` / bare keywords; header names are lower-cased (case-insensitive)."""
    if value in bare:
        return value
    kind, sep, name = value.partition(":")
    if sep and kind in kinds and name:
        return f"{kind}:{name.lower()}" if kind == "header" else value
    raise ValueError(f"must be {what}, not {value!r}")


def _check_sample_by(value: str | None) -> str | None:
    if value is None:
        return None
    return _key_spec(
        value,
        ("header", "cookie", "query"),
        ("client_ip",),
        "header:NAME, cookie:NAME, query:NAME or client_ip",
    )


def _parse_percent(value: object) -> object:
    """Accept `10%` as well as `10`: people write percent signs in percent fields."""
    if isinstance(value, bool):
        raise ValueError("must be a number 0..100")
    if isinstance(value, str) and value.strip().endswith("%"):
        return value.strip()[:-1]
    return value


def _check_percent(value: float) -> float:
    if not 0.0 <= value <= 100.0:
        raise ValueError("must be 0..100")
    return value


Percent = Annotated[float, BeforeValidator(_parse_percent), AfterValidator(_check_percent)]
