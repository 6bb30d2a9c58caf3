"""The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`, Selenium),
on data the real proxy produced.

Three real backends serve a small orders API: v1 (primary), v2 (the shadow; it renames
`customer_name` to `customer`, turns `total` into a string, adds `currency` and says
`x-version: v2`) and v1b (a second v1, the noise `secondary`). The proxy runs as a subprocess
(`python -m shadowlane run`) shadowing v1 to v2 with `compare: {secondary: orders-v1b}` into a
SQLite store; the test sends its requests to the proxy only. The client picks, per request, how
the answers will relate (header `x-kind`, forwarded to all three backends): `diff` (v2 answers
as v2), `noise` (every answer carries a random `request_uuid`, v2 answers as v1), `match`
(identical answers). The browser loads the proxy's admin listener `/` with no network besides
loopback, the test waits for the content, checks it through the DOM (names, rates, a highlighted
differing path, noise marked apart, latency, live refresh), and takes a screenshot that it
decodes and checks too: right size, not blank, and showing the colours of the header bar and of
a highlighted difference.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from shadowlane.store import open_store
from support.backend import Recorded, RecordingBackend, Reply
from support.browser import (
    By,
    StaleElementReferenceException,
    WebDriver,
    WebDriverWait,
    chromium,
    wait_css,
)
from support.migration import comparison_results, wait_for_stored
from support.proxy import ProxyProcess, basic_config
from support.wait import wait_until
from test_ledger_api import OPEN_COUNTS, OPEN_IDS, SUSPECT_KEYS, ordered_config, seed_ledger

#: the page re-renders as it refreshes live: an element a wait just found may be replaced before
#: its text is read, so the waits try again instead of failing on the stale reference
LIVE = (StaleElementReferenceException,)
TIMEOUT = 5.0
WIDTH, HEIGHT = 1400, 1600

#: colours from dashboard.css, as the screenshot must show them
TOPBAR_RGB = (0x1D, 0x23, 0x30)
DIFF_BG_RGB = (0xFD, 0xE2, 0xE4)
NOISE_BG_RGB = (0xF4, 0xEC, 0xD2)

#: backend answer delays. The proxy measures real durations, and p99 of 60 requests is their
#: slowest: on a busy machine one primary request can take tens of ms however fast its backend
#: is (121 ms seen once under a full suite). The shadow (v2) is so much slower that "shadow p99 >
#: 2 x primary p99" still holds then.
PRIMARY_DELAY = 0.003
SHADOW_DELAY = 0.400
#: the newest requests of each kind are sent one at a time (see `Comparisons.add`)
IN_ORDER = 5


# -- real backends behind the real proxy --------------------------------------------------------


def _answer(version: str, n: int, *, noise: bool) -> tuple[list[tuple[str, str]], bytes]:
    body: dict[str, Any] = {"id": n, "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}]}
    if version == "v2":
        body["customer"] = "Ada"
        body["total"] = f"{12.5 * n:.2f}"  # a number that became a string
        body["currency"] = "EUR"
    else:
        body["customer_name"] = "Ada"
        body["total"] = 12.5 * n
    if noise:
        body["request_uuid"] = str(uuid.uuid4())
    headers = [("content-type", "application/json"), ("x-version", version)]
    return headers, json.dumps(body).encode()


def shop(version: str, delay: float) -> Any:
    """`GET /orders/{n}` of one version; header `x-kind` says which (see the module doc)."""

    def handle(req: Recorded) -> Reply:
        n = int(req.path.rsplit("/", 1)[1])
        kind = req.header("x-kind")
        assert kind in ("diff", "noise", "match"), kind
        answers_as = "v2" if version == "v2" and kind == "diff" else "v1"
        headers, body = _answer(answers_as, n, noise=kind != "match")
        return Reply(200, headers, body, delay=delay)

    return handle


class Comparisons:
    """v1, v2 and v1b behind a real proxy comparing into SQLite; `add()` sends more requests.

    The store keeps the newest `examples_per_field` (5) examples per field, by comparison time,
    and the assertions name them (`/orders/30`, `/orders/40`, `/orders/38`). So the last
    `IN_ORDER` requests of each kind go one at a time, each once the previous one was compared;
    the others of that kind go concurrently before them (only their counts matter).
    """

    def __init__(self, path: Path, proxy_factory: Callable[..., ProxyProcess]) -> None:
        self.backends = {
            "orders-v1": RecordingBackend(shop("v1", PRIMARY_DELAY)),
            "orders-v2": RecordingBackend(shop("v2", SHADOW_DELAY)),
            "orders-v1b": RecordingBackend(shop("v1", PRIMARY_DELAY)),
        }
        for b in self.backends.values():
            b.start()
        config = {
            "backends": {
                name: {"endpoints": [b.url], "timeout": "5s", "connect_timeout": "1s"}
                for name, b in self.backends.items()
            },
            "routes": [
                {
                    "name": "orders",
                    "match": {"path_prefix": "/orders/"},
                    "backend": "orders-v1",
                    "shadows": [{"backend": "orders-v2", "compare": {"secondary": "orders-v1b"}}],
                }
            ],
            "compare": {"store": f"sqlite:///{path}", "flush_interval": "50ms"},
        }
        try:
            # started, stopped, and its stderr printed if the test fails, by the fixture
            self.proxy = proxy_factory(config)
        except BaseException:
            self.close()
            raise
        self.n = 0

    @property
    def admin_url(self) -> str:
        return self.proxy.admin_url

    def compared(self) -> int:
        return sum(v for k, v in comparison_results(self.admin_url).items() if k[2] != "dropped")

    def _wait_compared(self, n: int) -> None:
        wait_until(lambda: self.compared() >= n, TIMEOUT, f"the proxy to compare request {n}")

    def _get(self, n: int, kind: str) -> None:
        r = requests.get(
            f"{self.proxy.url}/orders/{n}",
            headers={"x-kind": kind, "x-request-id": f"req-{kind}-{n}"},
            timeout=TIMEOUT,
        )
        # the client gets the primary's (v1) answer
        assert r.status_code == 200 and r.headers["x-version"] == "v1", (n, r.headers)

    def add(self, diff: int, noise: int, match: int) -> None:
        for kind, count in (("diff", diff), ("noise", noise), ("match", match)):
            first = self.n + 1
            self.n += count
            in_order = range(max(first, self.n - IN_ORDER + 1), self.n + 1)
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda n, k=kind: self._get(n, k), range(first, in_order.start)))
            self._wait_compared(in_order.start - 1)
            for n in in_order:
                self._get(n, kind)
                self._wait_compared(n)
        wait_for_stored(self.admin_url, self.n, timeout=TIMEOUT)

    def close(self) -> None:
        for b in self.backends.values():
            b.stop()
        errors = [e for b in self.backends.values() for e in b.errors]
        assert errors == [], f"backends raised: {errors!r}"


@pytest.fixture
def comparisons(
    tmp_path: Path, proxy_factory: Callable[..., ProxyProcess]
) -> Iterator[Comparisons]:
    c = Comparisons(tmp_path / "comparisons.db", proxy_factory)
    try:
        c.add(diff=30, noise=10, match=20)
        yield c
    finally:
        c.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    with chromium(tmp_path, WIDTH, HEIGHT) as driver:
        yield driver


# -- a tiny PNG reader (so the screenshot check needs no image library) ---------------------------


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced RGB/RGBA PNG."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind_ = raw[start]
        line = bytearray(raw[start + 1 : start + 1 + stride])
        if kind_ == 1:  # Sub
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 0xFF
        elif kind_ == 2:  # Up
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif kind_ == 3:  # Average
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind_ == 4:  # Paeth
            for i in range(stride):
                a = line[i - channels] if i >= channels else 0
                b = prev[i]
                c = prev[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r) for r in rows] if channels == 3 else _drop_alpha(rows)


def _drop_alpha(rows: list[bytes]) -> list[bytes]:
    out = []
    for row in rows:
        rgb = bytearray()
        for i in range(0, len(row), 4):
            rgb += row[i : i + 3]
        out.append(bytes(rgb))
    return out


def colours(rows: list[bytes]) -> dict[tuple[int, int, int], int]:
    counts: dict[tuple[int, int, int], int] = {}
    for row in rows:
        for i in range(0, len(row), 3):
            key = (row[i], row[i + 1], row[i + 2])
            counts[key] = counts.get(key, 0) + 1
    return counts


# -- the tests -----------------------------------------------------------------------------------


def test_dashboard_shows_comparisons(
    browser: WebDriver, comparisons: Comparisons, tmp_path: Path
) -> None:
    browser.get(comparisons.admin_url + "/")
    card = wait_css(browser, '.card[data-route="orders"][data-target="orders-v2"]')
    wait_css(browser, ".example-pair .pane.candidate .hl-diff")

    # Route and target names, and the counts and rates: 30 diff, 10 noise only, 20 match.
    head = card.find_element(By.CSS_SELECTOR, ".card-head h2").text
    assert "orders" in head and "orders-v2" in head
    tiles = {
        t.get_attribute("data-metric"): t.find_element(By.CSS_SELECTOR, ".value").text
        for t in card.find_elements(By.CSS_SELECTOR, ".tile")
    }
    assert tiles == {"compared": "60", "matched": "33.3%", "differing": "50%", "noise": "16.7%"}

    # Differing fields with their diff rate beside their noise rate; reported vs noise-only.
    rows = {
        r.get_attribute("data-field"): r
        for r in card.find_elements(By.CSS_SELECTOR, "tr.field-row")
    }
    reported = {f for f, r in rows.items() if r.get_attribute("data-state") == "reported"}
    assert reported == {
        "body.total",
        "body.currency",
        "body.customer",
        "body.customer_name",
        "headers.x-version",
    }
    total = rows["body.total"]
    assert total.find_element(By.CSS_SELECTOR, ".diff-rate").text == "50%"
    assert total.find_element(By.CSS_SELECTOR, ".noise-rate").text == "0%"
    assert total.find_element(By.CSS_SELECTOR, ".badge").text.lower() == "reported"
    uuid_row = rows["body.request_uuid"]
    assert uuid_row.get_attribute("data-state") == "noise"
    assert uuid_row.find_element(By.CSS_SELECTOR, ".diff-rate").text == "66.7%"  # 40 of 60
    assert uuid_row.find_element(By.CSS_SELECTOR, ".noise-rate").text == "66.7%"
    assert uuid_row.find_element(By.CSS_SELECTOR, ".badge").text.lower() == "noise"
    badge = total.find_element(By.CSS_SELECTOR, ".badge").value_of_css_property("color")
    assert badge != uuid_row.find_element(By.CSS_SELECTOR, ".badge").value_of_css_property("color")

    # Latency side by side: the shadow (400 ms) is slower than the primary (3 ms).
    for quantile in ("p50", "p99"):
        row = card.find_element(By.CSS_SELECTOR, f'tr[data-quantile="{quantile}"]')
        primary_ms = row.find_element(By.CSS_SELECTOR, '[data-latency="primary"]').text
        shadow_ms = row.find_element(By.CSS_SELECTOR, '[data-latency="shadow"]').text
        assert re.fullmatch(r"\d+(\.\d+)? ms", primary_ms), primary_ms
        assert re.fullmatch(r"\d+(\.\d+)? ms", shadow_ms), shadow_ms
        assert float(shadow_ms.split()[0]) > 2 * float(primary_ms.split()[0])
        assert row.find_element(By.CSS_SELECTOR, ".delta").text.startswith("+")

    # Examples default to the top reported field (the store's order: most frequent, then by
    # name); the newest is open, side by side.
    top = card.find_element(By.CSS_SELECTOR, 'tr.field-row[data-state="reported"]')
    assert top.get_attribute("data-field") == "body.currency"
    assert "selected" in (top.get_attribute("class") or "")
    assert "body.currency" in card.find_element(By.CSS_SELECTOR, ".filter-chip").text
    assert "/orders/30" in card.find_element(By.CSS_SELECTOR, ".example-head").text
    pair = card.find_element(By.CSS_SELECTOR, ".example-pair")
    primary = pair.find_element(By.CSS_SELECTOR, ".pane.primary")
    candidate = pair.find_element(By.CSS_SELECTOR, ".pane.candidate")
    assert primary.location["x"] < candidate.location["x"]
    assert primary.location["y"] == candidate.location["y"]
    assert "HTTP 200" in candidate.find_element(By.CSS_SELECTOR, ".pane-title").text

    # Differing paths highlighted on both sides, noise marked differently, the rest plain.
    cand_total = candidate.find_element(By.CSS_SELECTOR, '.hl-diff[data-path="body.total"]')
    assert cand_total.text == '"total": "375.00"'
    prim_total = primary.find_element(By.CSS_SELECTOR, '.hl-diff[data-path="body.total"]')
    assert prim_total.text == '"total": 375'
    assert candidate.find_element(By.CSS_SELECTOR, '.hl-diff[data-path="body.currency"]')
    header = candidate.find_element(By.CSS_SELECTOR, '.hl-diff[data-path="headers.x-version"]')
    assert header.text == '"x-version": "v2"'
    noise = candidate.find_element(By.CSS_SELECTOR, '.hl-noise[data-path="body.request_uuid"]')
    assert noise.text.startswith('"request_uuid": "')
    assert noise.value_of_css_property("background-color") != cand_total.value_of_css_property(
        "background-color"
    )
    sku = candidate.find_element(By.CSS_SELECTOR, '[data-path="body.items[0].sku"]')
    assert "hl-" not in (sku.get_attribute("class") or "")
    # Fields that only one side has are named on the other.
    absent = primary.find_element(By.CSS_SELECTOR, ".absent").text
    assert "body.customer" in absent and "body.currency" in absent
    assert "body.customer_name" in candidate.find_element(By.CSS_SELECTOR, ".absent").text

    updated = browser.find_element(By.ID, "updated-at").text
    assert updated.startswith("updated at ")

    # The page ran without script errors or CSP violations.
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []

    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    width, height, pixels = decode_png(shot.read_bytes())
    assert (width, height) == tuple(
        browser.execute_script("return [window.innerWidth, window.innerHeight]")
    )
    assert width >= 1000 and height >= 800
    seen = colours(pixels)
    assert len(seen) > 50, "screenshot is (nearly) one colour"
    assert max(seen.values()) < 0.95 * width * height, "screenshot is (nearly) blank"
    assert seen.get(TOPBAR_RGB, 0) > 1000, "the header bar is not in the screenshot"
    assert seen.get(DIFF_BG_RGB, 0) > 200, "no highlighted difference in the screenshot"
    assert seen.get(NOISE_BG_RGB, 0) > 100, "no noise marking in the screenshot"


def test_dashboard_refreshes_live_and_filters_examples_by_field(
    browser: WebDriver, comparisons: Comparisons
) -> None:
    browser.get(comparisons.admin_url + "/")
    card = wait_css(browser, '.card[data-route="orders"][data-target="orders-v2"]')
    wait_css(browser, ".example-pair")
    tile = card.find_element(By.CSS_SELECTOR, '.tile[data-metric="compared"] .value')
    assert tile.text == "60"
    first_update = browser.find_element(By.ID, "updated-at").get_attribute("datetime")

    comparisons.add(diff=0, noise=0, match=40)
    WebDriverWait(browser, 10, ignored_exceptions=LIVE).until(lambda d: tile.text == "100")
    assert browser.find_element(By.ID, "updated-at").get_attribute("datetime") != first_update
    diff_tile = card.find_element(By.CSS_SELECTOR, '.tile[data-metric="differing"] .value')
    assert diff_tile.text == "30%"

    # Clicking a field filters the examples to it.
    card.find_element(By.CSS_SELECTOR, 'tr.field-row[data-field="body.request_uuid"]').click()
    WebDriverWait(browser, 5, ignored_exceptions=LIVE).until(
        lambda d: "body.request_uuid" in d.find_element(By.CSS_SELECTOR, ".filter-chip").text
    )
    row = card.find_element(By.CSS_SELECTOR, 'tr.field-row[data-field="body.request_uuid"]')
    assert "selected" in (row.get_attribute("class") or "")
    # The newest examples with that field are the noise-only ones (requests 31..40).
    WebDriverWait(browser, 5, ignored_exceptions=LIVE).until(
        lambda d: "/orders/40" in card.find_element(By.CSS_SELECTOR, ".example-head").text
    )
    assert card.find_elements(By.CSS_SELECTOR, ".pane.candidate .hl-diff") == []
    assert card.find_element(
        By.CSS_SELECTOR, '.pane.candidate .hl-noise[data-path="body.request_uuid"]'
    )

    # Another example can be opened; the selection survives refreshes.
    items = card.find_elements(By.CSS_SELECTOR, ".example-item")
    assert len(items) == 5  # examples_per_field
    items[2].click()
    WebDriverWait(browser, 5, ignored_exceptions=LIVE).until(
        lambda d: "/orders/38" in card.find_element(By.CSS_SELECTOR, ".example-head").text
    )
    comparisons.add(diff=0, noise=0, match=10)
    WebDriverWait(browser, 10, ignored_exceptions=LIVE).until(lambda d: tile.text == "110")
    selected = card.find_element(By.CSS_SELECTOR, ".example-item.selected")
    assert selected.get_attribute("data-request-id") == "req-noise-38"

    # The filter chip's x shows examples of every field.
    card.find_element(By.CSS_SELECTOR, ".filter-chip button").click()
    WebDriverWait(browser, 5, ignored_exceptions=LIVE).until(
        lambda d: not card.find_elements(By.CSS_SELECTOR, ".filter-chip")
    )
    assert not card.find_elements(By.CSS_SELECTOR, "tr.field-row.selected")


def test_dashboard_with_no_comparisons_says_so(
    browser: WebDriver, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    # A proxy with no `compare:` anywhere: the dashboard is served, and says there is no data.
    with RecordingBackend() as backend:
        proxy = proxy_factory(basic_config(backend.url))
        assert requests.get(proxy.url + "/x", timeout=TIMEOUT).status_code == 200
        browser.get(proxy.admin_url + "/")
        WebDriverWait(browser, 10, ignored_exceptions=LIVE).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true"
        )
        empty = browser.find_element(By.ID, "empty")
        assert empty.is_displayed()
        assert "No comparisons yet" in empty.text
        assert browser.find_elements(By.CSS_SELECTOR, ".card") == []
        # no store at all: the ledger panel says there is nothing open, and is no error
        assert browser.find_element(By.ID, "ledger-open").text == "No open divergences"
        assert not browser.find_element(By.ID, "ledger-body").is_displayed()
        assert not browser.find_element(By.ID, "ledger-error").is_displayed()


def test_dashboard_shows_the_divergence_ledger(
    browser: WebDriver, proxy_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """A store holding a ledger (seeded through the Store API), the real proxy with ordered
    shadows serving it: the panel lists open entries by route, target and reason, the suspect
    keys and the newest entries, and follows resolutions live."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    seed_ledger(url)
    with RecordingBackend() as es7, RecordingBackend() as es8:
        proxy = proxy_factory(ordered_config(url, es7.url, es8.url))
        browser.get(proxy.admin_url + "/")
        wait_css(browser, "#ledger tr.ledger-count")
        panel = browser.find_element(By.ID, "ledger")
        assert panel.get_attribute("data-open") == "4"
        assert panel.find_element(By.ID, "ledger-open").text == "4 open entries · 5 suspect keys"
        counts = [
            {
                "route": row.get_attribute("data-route"),
                "target": row.get_attribute("data-target"),
                "reason": row.get_attribute("data-reason"),
                "n": int(row.find_element(By.CSS_SELECTOR, ".count").text),
            }
            for row in panel.find_elements(By.CSS_SELECTOR, "tr.ledger-count")
        ]
        assert counts == OPEN_COUNTS
        first = panel.find_element(By.CSS_SELECTOR, "tr.ledger-count")
        assert first.find_element(By.CSS_SELECTOR, ".pair").text == "es-bulk → es8"
        assert first.find_element(By.CSS_SELECTOR, ".badge").text == "bulk_item"
        keys = [k.text for k in panel.find_elements(By.CSS_SELECTOR, ".suspect-key")]
        assert keys == SUSPECT_KEYS
        entries = panel.find_elements(By.CSS_SELECTOR, "tr.ledger-entry")
        assert [e.get_attribute("data-request-id") for e in entries] == OPEN_IDS
        oldest = entries[-1]
        assert oldest.find_element(By.CSS_SELECTOR, ".request").text == "POST /_bulk"
        assert oldest.find_element(By.CSS_SELECTOR, ".keys").text == "orders/1, orders/2"
        assert oldest.find_element(By.CSS_SELECTOR, ".scope").text == "es-writes"
        assert oldest.find_element(By.CSS_SELECTOR, ".detail").text == "lane queue full"
        assert re.fullmatch(r"\d\d:\d\d:\d\d", oldest.find_element(By.CSS_SELECTOR, ".time").text)
        # nothing compares: the comparison part says so beside the ledger
        assert browser.find_element(By.ID, "empty").is_displayed()

        # a repair resolves keys in the store: the panel follows at its next refresh
        with open_store(url) as store:
            assert store.resolve_keys(["logs"]) == 1
        WebDriverWait(browser, 10, ignored_exceptions=LIVE).until(
            lambda d: panel.get_attribute("data-open") == "3"
        )
        keys = [k.text for k in panel.find_elements(By.CSS_SELECTOR, ".suspect-key")]
        assert keys == SUSPECT_KEYS[1:]
        with open_store(url) as store:
            assert store.resolve_keys(SUSPECT_KEYS) == 3
        WebDriverWait(browser, 10, ignored_exceptions=LIVE).until(
            lambda d: d.find_element(By.ID, "ledger-open").text == "No open divergences"
        )
        assert not browser.find_element(By.ID, "ledger-body").is_displayed()
        assert browser.find_elements(By.CSS_SELECTOR, "tr.ledger-entry") == []
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
