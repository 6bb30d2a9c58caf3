"""A real migration: httpbin 0.7.0 (old) -> httpbin 0.10.4 (new), both from PyPI.

The two releases are four years and a Flask/Werkzeug generation apart, and differ in ways we
know from running them side by side (and their changelogs):
- `/json` does not exist in 0.7.0 (404 HTML page) and returns a JSON slideshow in 0.10.4;
- redirects: Werkzeug >= 2.1 no longer makes `Location` absolute, and its HTML templates for
  redirects and error pages changed;
- 0.10.4 pretty-prints JSON, which changes the length `/response-headers` reports in its body.
Other fields are random in every answer of either version (noise): `/uuid`'s uuid, `/bytes`'s
body, `/cache`'s ETag and Last-Modified, the digest nonce in `WWW-Authenticate`. (One more is
left out on purpose: the order of `Allow` on a 405 follows Python's per-process string hashing
in 0.7.0, so it is noise only when the secondary process happens to hash differently.)

Each request goes to old (primary), new (candidate) and a second old instance (secondary), one
after the other as Diffy does, and the engine must report exactly the real differences per route
and none of the noisy ones. The services are installed with pip into cached target dirs and run
as real HTTP servers (Werkzeug's, the one each version ships with).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import urllib3

from shadowlane.compare import Captured, Comparator, CompareJob, compile_settings
from shadowlane.config import CompareConfig, ShadowCompare
from shadowlane.report import render_report
from shadowlane.store import Store, open_store

OLD = ("httpbin==0.7.0", "flask<2.1", "werkzeug<2.1", "jinja2<3.1", "itsdangerous<2.1",
       "markupsafe<2.1")  # fmt: skip
NEW = ("httpbin==0.10.4",)

CACHE = Path(os.environ.get("SHADOWLANE_TEST_CACHE", Path.home() / ".cache" / "shadowlane-tests"))

SERVER = """
import sys
from werkzeug.serving import make_server
import httpbin
server = make_server("127.0.0.1", 0, httpbin.app, threaded=True)
print(server.server_port, flush=True)
server.serve_forever()
"""


def _install(spec: tuple[str, ...]) -> Path:
    """pip install `spec` into a cached target dir (reused when already complete)."""
    key = hashlib.sha256("\n".join((sys.version, *spec)).encode()).hexdigest()[:16]
    target = CACHE / f"{spec[0].replace('==', '-')}-{key}"
    if (target / ".complete").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=CACHE))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run(
        [*cmd, "--target", str(tmp), *spec], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        msg = f"pip install {' '.join(spec)} failed: {done.stderr[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    (tmp / ".complete").touch()
    try:
        tmp.rename(target)
    except OSError:  # another run finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class Service:
    """One httpbin version as a real HTTP server on a free loopback port."""

    def __init__(self, site: Path) -> None:
        # -S: no site-packages of this venv; only the version's own target dir (PYTHONPATH)
        env = {**os.environ, "PYTHONPATH": str(site)}
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-c", SERVER],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"httpbin from {site} did not start")
        self.url = f"http://127.0.0.1:{int(line)}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, Service]]:
    old, new = _install(OLD), _install(NEW)
    started: dict[str, Service] = {}
    try:
        started["old"] = Service(old)
        started["old-b"] = Service(old)
        started["new"] = Service(new)
        yield started
    finally:
        for s in started.values():
            s.stop()


HTTP = urllib3.PoolManager()


def capture(base: str, method: str, path: str, rid: str, body: bytes) -> Captured:
    """Send one request and keep the answer as the proxy would: head and wire body bytes."""
    headers = {"Host": "api.example", "X-Request-Id": rid, "User-Agent": "shadowlane-test"}
    if body:
        headers["Content-Type"] = "application/json"
    start = time.perf_counter()
    try:
        # urllib3 directly: no redirect following, body bytes as on the wire (still gzipped)
        r = HTTP.request(
            method, base + path, headers=headers, body=body or None, redirect=False,
            retries=False, decode_content=False, timeout=10,
        )  # fmt: skip
    except urllib3.exceptions.HTTPError:
        return Captured(0, [], b"", False, time.perf_counter() - start, "error")
    seconds = time.perf_counter() - start
    hs = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in r.headers.items()]
    return Captured(r.status, hs, r.data, False, seconds)


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


@pytest.fixture(scope="module")
def migration(services: dict[str, Service], tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('migration')}/m.db", CompareConfig())
    comparator = Comparator(store, None, 10_000, flush_interval=0.1).start()
    settings = compile_settings(ShadowCompare(secondary="httpbin-old-b"), None, CompareConfig())
    for _ in range(REPEAT):
        for route, requests_ in TRAFFIC.items():
            for method, path, doc in requests_:
                rid = uuid.uuid4().hex
                body = orjson.dumps(doc) if doc is not None else b""
                # sequential, primary -> candidate -> secondary: a time-based field that
                # changed between primary and candidate has also changed for the secondary
                primary = capture(services["old"].url, method, path, rid, body)
                candidate = capture(services["new"].url, method, path, rid, body)
                secondary = capture(services["old-b"].url, method, path, rid, body)
                assert comparator.submit(
                    CompareJob(
                        route,
                        "httpbin-new",
                        rid,
                        method,
                        path,
                        body,
                        primary,
                        candidate,
                        secondary,
                        settings,
                        ts=time.time(),
                    )
                )
    assert comparator.wait_idle(30)
    assert comparator.stop(10)
    assert comparator.stats["errors"] == 0
    return store


def test_report_names_exactly_the_real_differences(migration: Store) -> None:
    doc = orjson.loads(render_report(migration, "json"))
    rows = {r["route"]: r for r in doc["comparisons"]}
    assert set(rows) == set(TRAFFIC)
    for route, expected in REAL.items():
        row = rows[route]
        assert row["compared"] == REPEAT * len(TRAFFIC[route]), route
        reported = {f["field"] for f in row["fields"] if f["reported"]}
        assert reported == expected, f"{route}: reported {sorted(reported)}"
        if expected:
            assert row["differing"] > 0, route


def test_noisy_fields_are_seen_but_not_reported(migration: Store) -> None:
    for route, noisy in NOISY.items():
        fields = {f["field"]: f for f in migration.fields(route, "httpbin-new")}
        for name in noisy:
            f = fields[name]
            assert f["raw"] == REPEAT, (route, f)  # it differed in every answer ...
            assert f["noise"] >= f["raw"], (route, f)  # ... and as much between old and old
            assert not f["reported"], (route, f)
        # every differing answer of these routes is explained by noise
        [row] = [r for r in migration.summary() if r["route"] == route]
        assert row["differing"] == 0 and row["noise"] == REPEAT, (route, row)


def test_text_report_and_examples(migration: Store) -> None:
    text = render_report(migration, "text")
    assert "json -> httpbin-new: 3 field(s) really differ" in text
    assert "uuid -> httpbin-new: 0 field(s) really differ" in text
    for noisy in ("body.uuid", "headers.etag", "headers.www-authenticate"):
        assert noisy not in text
    [example] = migration.examples("redirect", "httpbin-new", "headers.location", limit=1)
    old_location, new_location = example["candidate"]["values"]["headers.location"]
    assert old_location.endswith("/get") and old_location.startswith("http://api.example")
    assert new_location == "/get"
    assert example["primary"]["status"] == example["candidate"]["status"] == 302
    [example] = migration.examples("json", "httpbin-new", "status", limit=1)
    assert (example["primary"]["status"], example["candidate"]["status"]) == (404, 200)
    assert orjson.loads(example["candidate"]["body"])["slideshow"]["title"] == "Sample Slide Show"
