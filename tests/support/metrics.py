"""The proxy's ``/metrics``, scraped over HTTP and parsed by prometheus_client's own parser.

Why one module: a test that reads a counter must read it the way Prometheus does. A regex over
the exposition skips what it does not expect (an escaped label value, a timestamp) and sums the
wrong thing without a word; prometheus_client's text parser is the reference reader of the
format, and it is third-party code, not shadowlane's (``support`` imports nothing from the
proxy it judges). Every scrape goes through :func:`fetch_text`, so a non-200 answer fails the
test the same way everywhere.

- :func:`scrape` -> :class:`Scrape`: one exposition, queried by sample name and a subset of
  labels (``sum``, ``by``, ``select``).
- :func:`outcomes`: ``shadowlane_shadow_requests_total`` of one (route, target), outcome ->
  count; :func:`settle` waits (bounded) until ``n`` more requests of it ended.
- :data:`SHADOW_TERMINAL`, :data:`SHADOW_OUTCOMES`: the outcomes as docs/metrics.md defines
  them, written down here rather than imported from the proxy.
"""

from __future__ import annotations

import http.client
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from .wait import wait_until

if TYPE_CHECKING:
    from .proxy import ProxyProcess

#: every outcome that ends a request's story for one shadow target (docs/metrics.md): each
#: request of a route is counted in exactly one of them per target
SHADOW_TERMINAL = (
    "sampled_out",
    "skipped_body",
    "skipped_loop",
    "skipped_status",
    "skipped_answer",
    "skipped_upgrade",
    "skipped_primary",
    "shed",
    "dropped",
    "aborted",
    "ok",
    "error",
    "timeout",
)
#: all outcome series of a (route, target): "sent" counts an attempt, not an end
SHADOW_OUTCOMES = ("sent", *SHADOW_TERMINAL)
SHADOW_REQUESTS = "shadowlane_shadow_requests_total"


def fetch_text(admin_url: str, timeout: float = 5.0) -> str:
    """``GET /metrics`` on the admin listener at ``admin_url`` (``http://host:port``).

    Fails the test (AssertionError with the body) on any answer but 200: a scrape that errors
    must not read as "all counters zero".
    """
    url = urllib.parse.urlsplit(admin_url)
    assert url.hostname is not None and url.port is not None, admin_url
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body)
        return body.decode()
    finally:
        conn.close()


def _matches(sample: Sample, name: str, labels: Mapping[str, str]) -> bool:
    return sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())


class Scrape:
    """One parsed exposition. Queries match a sample's full name (``..._total``,
    ``..._bucket``) and a *subset* of its labels; series not asked about are summed over."""

    def __init__(self, text: str) -> None:
        self.text = text
        #: every sample, in exposition order (prometheus_client ``Sample`` tuples)
        self.samples: list[Sample] = [
            s for fam in text_string_to_metric_families(text) for s in fam.samples
        ]

    def select(self, name: str, **labels: str) -> list[Sample]:
        """The samples named ``name`` whose labels include ``labels``."""
        return [s for s in self.samples if _matches(s, name, labels)]

    def sum(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(s.value for s in self.select(name, **labels))

    def by(self, key: str, name: str, **labels: str) -> dict[str, float]:
        """Like :meth:`sum`, grouped by the value of label ``key``: ``value -> sum``."""
        out: dict[str, float] = {}
        for s in self.select(name, **labels):
            k = s.labels.get(key)
            if k is not None:
                out[k] = out.get(k, 0.0) + s.value
        return out

    def outcomes(self, route: str, target: str) -> dict[str, float]:
        """``shadowlane_shadow_requests_total`` of (route, target): outcome -> count."""
        return self.by("outcome", SHADOW_REQUESTS, route=route, target=target)


def scrape(proxy: ProxyProcess | str, timeout: float = 5.0) -> Scrape:
    """Scrape a proxy (a :class:`ProxyProcess`, or its admin URL) and parse what it said."""
    admin_url = proxy if isinstance(proxy, str) else proxy.admin_url
    return Scrape(fetch_text(admin_url, timeout))


def outcomes(
    proxy: ProxyProcess | str,
    route: str,
    target: str,
    *,
    complete: bool = False,
    timeout: float = 5.0,
) -> dict[str, float]:
    """Shadow outcome counts of (route, target), now: outcome -> count ({} if no series yet).

    ``complete=True`` asserts that the series exist with every outcome: the proxy declares all
    of a pair's series at zero at once (so ``rate()`` sees the first increment), and a test
    that relies on it says so.
    """
    found = scrape(proxy, timeout).outcomes(route, target)
    if complete:
        assert found, f"no {SHADOW_REQUESTS} series for {route}/{target}"
        missing = set(SHADOW_OUTCOMES) - set(found)
        assert not missing, f"missing outcomes: {missing}"
    return found


def settle(
    proxy: ProxyProcess | str,
    route: str,
    target: str,
    n: int,
    since: Mapping[str, float] | None = None,
    timeout: float = 10.0,
    *,
    complete: bool = False,
) -> dict[str, float]:
    """Wait until ``n`` more requests of (route, target) than in ``since`` have a terminal
    outcome; return the counts since ``since`` (or since zero).

    Why this is the way to wait for shadow copies: ``ok`` is only counted once the shadow has
    answered, and every request ends in exactly one terminal outcome, so once ``n`` ended every
    copy that will ever arrive has arrived, and "no copy came" can be asserted without a sleep.
    More than ``n`` fails: something was counted twice, or a request the test did not send was
    seen. A timeout says what was counted meanwhile.
    """
    base = dict(since or {})

    def delta() -> dict[str, float]:
        got = outcomes(proxy, route, target, complete=complete)
        return {o: v - base.get(o, 0.0) for o, v in got.items()}

    def ended(d: Mapping[str, float]) -> float:
        return sum(d.get(o, 0.0) for o in SHADOW_TERMINAL)

    def done() -> dict[str, float] | None:
        d = delta()
        return d if d and ended(d) >= n else None

    try:
        got = wait_until(done, timeout, f"{n} terminal shadow outcomes for {route}/{target}")
    except TimeoutError as err:
        now = {o: v for o, v in delta().items() if v}
        raise TimeoutError(f"{err}; counted since: {now or 'nothing'}") from None
    assert ended(got) == n, f"more outcomes than requests: {got}"
    return got


__all__ = [
    "SHADOW_OUTCOMES",
    "SHADOW_REQUESTS",
    "SHADOW_TERMINAL",
    "Scrape",
    "fetch_text",
    "outcomes",
    "scrape",
    "settle",
]
