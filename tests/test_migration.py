"""A real migration through the real proxy: httpbin 0.7.0 (old) -> httpbin 0.10.4 (new).

The two releases, both from PyPI, are four years and a Flask/Werkzeug generation apart, and
differ in ways we know from running them side by side (and their changelogs):
- `/json` does not exist in 0.7.0 (404 HTML page) and returns a JSON slideshow in 0.10.4;
- redirects: Werkzeug >= 2.1 no longer makes `Location` absolute, and its HTML templates for
  redirects and error pages changed;
- 0.10.4 pretty-prints JSON, which changes the length `/response-headers` reports in its body.
Other fields are random in every answer of either version (noise): `/uuid`'s uuid, `/bytes`'s
body, `/cache`'s ETag and Last-Modified, the digest nonce in `WWW-Authenticate`. (One more is
left out on purpose: the order of `Allow` on a 405 follows Python's per-process string hashing
in 0.7.0, so it is noise only when the secondary process happens to hash differently.)

The proxy runs as a subprocess (`python -m shadowlane run`) with one route per kind of request,
all served by old (primary) and shadowed to new with `compare: {secondary: old-b}`, a second old
instance, so the proxy itself sends each request to the three, captures the answers, compares
them and writes a SQLite store. The client only talks to the proxy. When the store holds every
comparison the proxy is stopped (SIGTERM flushes the store) and `shadowlane report --format json`
must name exactly the real differences per route and none of the noisy ones.

`host_suffix: ""`: the copies keep the client's Host. httpbin 0.7.0 builds an absolute
`Location` from Host, so with the default `-shadow` suffix the secondary's Location would differ
from the primary's and hide the real Location change as noise.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import requests

from support.migration import (
    InstallError,
    WerkzeugService,
    comparison_results,
    get_json,
    install,
    run_report,
    wait_for_stored,
)
from support.proxy import ProxyProcess

OLD = ("httpbin==0.7.0", "flask<2.1", "werkzeug<2.1", "jinja2<3.1", "itsdangerous<2.1",
       "markupsafe<2.1")  # fmt: skip
NEW = ("httpbin==0.10.4",)
TARGET = "httpbin-new"

#: route -> requests (method, path, JSON body); each is sent REPEAT times
TRAFFIC: dict[str, list[tuple[str, str, Any]]] = {
    "echo": [
        ("GET", "/get?a=1", None),
        ("GET", "/anything/x?b=2", None),
        ("POST", "/post", {"order": 7, "items": [1, 2]}),
        ("GET", "/headers", None),
        ("GET", "/gzip", None),
        ("GET", "/deflate", None),
    ],
    "uuid": [("GET", "/uuid", None)],
    "bytes": [("GET", "/bytes/16", None)],
    "cache": [("GET", "/cache", None)],
    "digest": [("GET", "/digest-auth/auth/user/pass", None)],
    "json": [("GET", "/json", None)],
    "redirect": [("GET", "/redirect/1", None), ("GET", "/relative-redirect/1", None)],
    "errors": [("GET", "/no-such-page", None), ("GET", "/status/418", None)],
    "response-headers": [("GET", "/response-headers?k=v", None)],
}
REPEAT = 4
TOTAL = REPEAT * sum(len(reqs) for reqs in TRAFFIC.values())

#: the differences httpbin 0.7.0 -> 0.10.4 really has, per route (see the module docstring)
REAL = {
    "echo": set(),
    "uuid": set(),
    "bytes": set(),
    "cache": set(),
    "digest": set(),
    "json": {"status", "headers.content-type", "body"},
    "redirect": {"headers.location", "body"},
    "errors": {"body"},
    "response-headers": {"body.Content-Length"},
}
#: fields that differ in (nearly) every answer of either version, per route
NOISY = {
    "uuid": {"body.uuid"},
    "bytes": {"body"},
    "cache": {"headers.etag"},
    "digest": {"headers.www-authenticate"},
}


def proxy_config(old: str, new: str, old_b: str, store_url: str) -> dict[str, Any]:
    """One route per kind of request (exact paths), old -> shadowed to new, noise from old-b."""
    shadow = {"backend": TARGET, "host_suffix": "", "compare": {"secondary": "httpbin-old-b"}}
    routes = []
    for name, reqs in TRAFFIC.items():
        paths = sorted({re.escape(path.partition("?")[0]) for _, path, _ in reqs})
        routes.append(
            {
                "name": name,
                "match": {"path_regex": f"^(?:{'|'.join(paths)})$"},
                "backend": "httpbin-old",
                "shadows": [shadow],
            }
        )
    backend = {"timeout": "10s", "connect_timeout": "2s"}
    return {
        "backends": {
            "httpbin-old": {"endpoints": [old], **backend},
            TARGET: {"endpoints": [new], **backend},
            "httpbin-old-b": {"endpoints": [old_b], **backend},
        },
        "routes": routes,
        # flush often: the test waits for the store, not for the default 1 s batches
        "compare": {"store": store_url, "flush_interval": "100ms"},
    }


def away_from_a_second_boundary() -> None:
    """Wait, if needed, until the wall clock is early in a second.

    `/cache` answers `Last-Modified: <now, in whole seconds>`. The proxy sends a request to the
    primary, the candidate and the secondary at the same moment, in no fixed order; if a second
    ticks over between the candidate's answer and the secondary's, Last-Modified differs in one
    pair and not the other, which is a real difference as far as any noise rule can tell. Diffy
    avoids it by sending one after the other; here every request starts in the first 70% of a
    second, and the three answers on loopback take milliseconds, so a tick between them would
    need a 300 ms stall. (This waits on a clock, not on a hope: at most 0.3 s.)
    """
    frac = time.time() % 1.0
    if frac > 0.7:
        time.sleep(1.0 - frac + 0.01)


@dataclass
class Migration:
    report: dict[str, Any]  # `shadowlane report --format json`
    text: str  # `shadowlane report` (text)
    examples: dict[tuple[str, str], list[dict[str, Any]]]  # admin API, before the stop
    client_status: dict[str, int]  # path -> status the client got (the primary's)

    def rows(self) -> dict[str, dict[str, Any]]:
        return {r["route"]: r for r in self.report["comparisons"]}


@pytest.fixture(scope="module")
def migration(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Migration]:
    try:
        old, new = install(OLD), install(NEW)
    except InstallError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    store_url = f"sqlite:///{tmp_path_factory.mktemp('migration') / 'm.db'}"
    with (
        WerkzeugService(old, "httpbin") as primary,
        WerkzeugService(old, "httpbin") as secondary,
        WerkzeugService(new, "httpbin") as candidate,
    ):
        proxy = ProxyProcess(proxy_config(primary.url, candidate.url, secondary.url, store_url))
        proxy.start()
        try:
            yield run_scenario(proxy, store_url)
        except BaseException:
            print(f"--- proxy stderr ---\n{proxy.stderr_text()}")
            raise
        finally:
            if proxy.alive():
                proxy.stop()
            proxy.close()


def run_scenario(proxy: ProxyProcess, store_url: str) -> Migration:
    client_status: dict[str, int] = {}
    with requests.Session() as session:
        for _ in range(REPEAT):
            for reqs in TRAFFIC.values():
                for method, path, doc in reqs:
                    away_from_a_second_boundary()
                    headers = {
                        "Host": "api.example",
                        "X-Request-Id": uuid.uuid4().hex,
                        "User-Agent": "shadowlane-test",
                    }
                    r = session.request(
                        method,
                        proxy.url + path,
                        headers=headers,
                        json=doc,
                        allow_redirects=False,
                        timeout=10,
                    )
                    client_status[path] = r.status_code
    wait_for_stored(proxy.admin_url, TOTAL, timeout=30)
    results = comparison_results(proxy.admin_url)
    assert sum(results.values()) == TOTAL, results  # every request compared once, none dropped

    examples = {}
    for route, field in (("redirect", "headers.location"), ("json", "status")):
        url = f"{proxy.admin_url}/api/comparisons/{route}/{TARGET}/examples"
        examples[route, field] = get_json(f"{url}?field={quote(field)}&limit=1")

    assert proxy.stop(signal.SIGTERM, timeout=15) == 0, proxy.stderr_text()
    report = orjson.loads(run_report(store_url, "json"))
    text = run_report(store_url, "text")
    return Migration(report, text, examples, client_status)


def test_client_got_the_primarys_answers(migration: Migration) -> None:
    # The proxy answered with old httpbin (0.7.0 has no /json), not with the shadow.
    assert migration.client_status["/json"] == 404
    assert migration.client_status["/redirect/1"] == 302
    assert migration.client_status["/status/418"] == 418
    assert migration.client_status["/get?a=1"] == 200


def test_report_names_exactly_the_real_differences(migration: Migration) -> None:
    rows = migration.rows()
    assert set(rows) == set(TRAFFIC)
    for route, expected in REAL.items():
        row = rows[route]
        assert row["target"] == TARGET, row
        assert row["compared"] == REPEAT * len(TRAFFIC[route]), route
        reported = {f["field"] for f in row["fields"] if f["reported"]}
        assert reported == expected, f"{route}: reported {sorted(reported)}"
        if expected:
            assert row["differing"] > 0, route


def test_noisy_fields_are_seen_but_not_reported(migration: Migration) -> None:
    rows = migration.rows()
    for route, noisy in NOISY.items():
        fields = {f["field"]: f for f in rows[route]["fields"]}
        for name in noisy:
            f = fields[name]
            assert f["raw"] == REPEAT, (route, f)  # it differed in every answer ...
            assert f["noise"] >= f["raw"], (route, f)  # ... and as much between old and old
            assert not f["reported"], (route, f)
        # every differing answer of these routes is explained by noise
        row = rows[route]
        assert row["differing"] == 0 and row["noise"] == REPEAT, (route, row)


def test_text_report_and_examples(migration: Migration) -> None:
    text = migration.text
    assert "json -> httpbin-new: 3 field(s) really differ" in text
    assert "uuid -> httpbin-new: 0 field(s) really differ" in text
    for noisy in ("body.uuid", "headers.etag", "headers.www-authenticate"):
        assert noisy not in text
    [example] = migration.examples["redirect", "headers.location"]
    old_location, new_location = example["candidate"]["values"]["headers.location"]
    assert old_location.endswith("/get") and old_location.startswith("http://api.example")
    assert new_location == "/get"
    assert example["primary"]["status"] == example["candidate"]["status"] == 302
    [example] = migration.examples["json", "status"]
    assert (example["primary"]["status"], example["candidate"]["status"]) == (404, 200)
    assert orjson.loads(example["candidate"]["body"])["slideshow"]["title"] == "Sample Slide Show"
