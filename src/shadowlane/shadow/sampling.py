"""Which requests get a shadow copy: random, or consistent by a key (user, tenant, client).

Consistent sampling hashes the key to a fixed bucket in [0, 10000) and samples it when the
bucket is below `percent * 100`. The bucket depends only on the key (no per-shadow salt), so:
the same key always gets the same decision; raising the percent only adds keys; and the same
users are shadowed on every route and shadow that samples by the same key, which keeps a
user's session whole across endpoints. A request without the key falls back to a random draw,
so keyless traffic is still shadowed at the configured rate.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from shadowlane.wire.messages import Request

KeyFn = Callable[[Request], str | None]


def key_function(kind: str, name: str) -> KeyFn:
    """Extract a key from a request: header:NAME, cookie:NAME, query:NAME, client_ip, path."""
    if kind == "header":
        lname = name.lower()
        return lambda req: req.header(lname)
    if kind == "cookie":
        return lambda req: req.cookie(name)
    if kind == "query":
        return lambda req: req.query_arg(name)
    if kind == "client_ip":
        return lambda req: req.client_addr or None
    if kind == "path":
        return lambda req: req.path
    raise ValueError(f"unknown key kind {kind!r}")


def bucket(key: str) -> int:
    """Stable bucket in [0, 10000) for a key (same across processes and restarts)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10000


class Sampler:
    """Decides per request; runtime control changes `percent` with `set_percent`."""

    __slots__ = ("_key", "percent")

    def __init__(self, percent: float, key: KeyFn | None = None) -> None:
        self.percent = percent
        self._key = key

    def set_percent(self, percent: float) -> None:
        """Runtime control's way in: the next request is decided on the new percent, while the
        shadow's config keeps the file's value (a reload goes back to it)."""
        self.percent = percent

    def sampled(self, req: Request) -> bool:
        percent = self.percent
        if percent >= 100.0:
            return True
        if percent <= 0.0:
            return False
        if self._key is not None:
            key = self._key(req)
            if key is not None:
                return bucket(key) < percent * 100
        return random.random() * 100.0 < percent
