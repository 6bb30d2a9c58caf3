"""The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`, Selenium).

A real admin server serves the page and the comparison API from a store with data in it; the
browser loads the page with no network besides loopback, the test waits for the content,
checks it through the DOM (names, rates, a highlighted differing path, noise marked apart,
latency, live refresh), and takes a screenshot that it decodes and checks too: right size, not
blank, and showing the colours of the header bar and of a highlighted difference.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from shadowlane.admin import AdminApp
from shadowlane.admin.comparisons import install_comparison_api
from shadowlane.metrics import Metrics

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

T = TypeVar("T")
TIMEOUT = 5.0
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH, HEIGHT = 1400, 1600

#: colours from dashboard.css, as the screenshot must show them
TOPBAR_RGB = (0x1D, 0x23, 0x30)
DIFF_BG_RGB = (0xFD, 0xE2, 0xE4)
NOISE_BG_RGB = (0xF4, 0xEC, 0xD2)


# -- a store with data ---------------------------------------------------------------------------


def _answer(version: str, n: int, total: Any, uuid: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": n,
        "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}],
        "request_uuid": uuid,
    }
    if version == "v1":
        body["customer_name"] = "Ada"
        body["total"] = total
    else:
        body["customer"] = "Ada"
        body["total"] = total
        body["currency"] = "EUR"
    return {
        "status": 200,
        "headers": [["content-type", "application/json"], ["x-version", version]],
        "body": json.dumps(body),
    }


class FakeStore:
    """In-memory stand-in following the store's query contract (summary, fields, examples)."""

    def __init__(self) -> None:
        self.compared = 120
        self.lock = threading.Lock()

    def summary(self) -> list[dict[str, Any]]:
        with self.lock:
            compared = self.compared
        return [
            {
                "route": "orders",
                "target": "orders-v2",
                "compared": compared,
                "matched": compared - 48,
                "differing": 40,
                "noise": 8,
                "diff_rate": 40 / compared,
                "noise_rate": 8 / compared,
                "latency": {
                    "primary_p50": 0.0042,
                    "primary_p99": 0.0190,
                    "shadow_p50": 0.0061,
                    "shadow_p99": 0.0330,
                },
                "top_fields": ["body.total", "body.currency"],
            }
        ]

    def fields(self, route: str, target: str) -> list[dict[str, Any]]:
        if (route, target) != ("orders", "orders-v2"):
            return []
        c = self.compared
        rows = (
            {"field": "body.total", "raw": 40, "noise": 0, "reported": True},
            {"field": "body.currency", "raw": 40, "noise": 0, "reported": True},
            {"field": "body.request_uuid", "raw": c, "noise": c, "reported": False},
        )
        return [dict(f, raw_rate=f["raw"] / c, noise_rate=f["noise"] / c) for f in rows]

    def examples(
        self, route: str, target: str, field: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        out = []
        for n in range(1, 4):
            out.append(
                {
                    "request_id": f"req-{n}",
                    "ts": 1700000000.0 + n,
                    "method": "GET",
                    "uri": f"/orders/{n}",
                    "request_body": "",
                    "primary": _answer("v1", n, 12.5 * n, f"uuid-p-{n}"),
                    "candidate": _answer("v2", n, f"{12.5 * n:.2f}", f"uuid-c-{n}"),
                    "differing": [
                        "body.total",
                        "body.currency",
                        "body.customer",
                        "body.customer_name",
                        "headers.x-version",
                    ],
                    "noise": ["body.request_uuid"],
                }
            )
        if field is not None:
            out = [e for e in out if field in e["differing"] or field in e["noise"]]
        return out[:limit]


# -- servers and browser -------------------------------------------------------------------------


class AdminServer:
    def __init__(self, store: Any) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = AdminApp(Metrics())
        install_comparison_api(self.app, store)
        server = self.run(self.app.start("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT * 3)

    def close(self) -> None:
        self.run(self.app.close(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def admin(store: FakeStore) -> Iterator[AdminServer]:
    server = AdminServer(store)
    yield server
    server.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if os.environ.get("SHADOWLANE_SKIP_BROWSER") == "1":
        pytest.skip("SHADOWLANE_SKIP_BROWSER=1")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            pytest.fail(f"{path} missing: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER, log_output=os.devnull)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, css: str, timeout: float = 15.0) -> WebElement:
    try:
        element: WebElement = WebDriverWait(driver, timeout).until(
            lambda d: d.find_element(By.CSS_SELECTOR, css)
        )
    except TimeoutException:
        state = driver.find_element(By.ID, "conn-state").text
        raise AssertionError(f"{css!r} never appeared (dashboard says: {state!r})") from None
    return element


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
    browser: WebDriver, admin: AdminServer, store: FakeStore, tmp_path: Path
) -> None:
    browser.get(admin.url + "/")
    card = wait_for(browser, '.card[data-route="orders"][data-target="orders-v2"]')
    wait_for(browser, ".example-pair .pane.candidate .hl-diff")

    # Route and target names, and the counts and rates.
    head = card.find_element(By.CSS_SELECTOR, ".card-head h2").text
    assert "orders" in head and "orders-v2" in head
    tile = card.find_element(By.CSS_SELECTOR, '.tile[data-metric="compared"] .value')
    assert tile.text == "120"
    diff_tile = card.find_element(By.CSS_SELECTOR, '.tile[data-metric="differing"] .value')
    assert diff_tile.text == "33.3%"  # 40 of 120
    noise_tile = card.find_element(By.CSS_SELECTOR, '.tile[data-metric="noise"] .value')
    assert noise_tile.text == "6.67%"
    matched_tile = card.find_element(By.CSS_SELECTOR, '.tile[data-metric="matched"] .value')
    assert matched_tile.text == "60%"

    # Differing fields with their diff rate beside their noise rate; reported vs noise-only.
    total = card.find_element(By.CSS_SELECTOR, 'tr.field-row[data-field="body.total"]')
    assert total.get_attribute("data-state") == "reported"
    assert total.find_element(By.CSS_SELECTOR, ".diff-rate").text == "33.3%"
    assert total.find_element(By.CSS_SELECTOR, ".noise-rate").text == "0%"
    assert total.find_element(By.CSS_SELECTOR, ".badge").text.lower() == "reported"
    uuid = card.find_element(By.CSS_SELECTOR, 'tr.field-row[data-field="body.request_uuid"]')
    assert uuid.get_attribute("data-state") == "noise"
    assert uuid.find_element(By.CSS_SELECTOR, ".diff-rate").text == "100%"
    assert uuid.find_element(By.CSS_SELECTOR, ".noise-rate").text == "100%"
    reported_colour = total.find_element(By.CSS_SELECTOR, ".badge").value_of_css_property("color")
    noise_colour = uuid.find_element(By.CSS_SELECTOR, ".badge").value_of_css_property("color")
    assert reported_colour != noise_colour

    # Latency side by side.
    p50 = card.find_element(By.CSS_SELECTOR, 'tr[data-quantile="p50"]')
    assert p50.find_element(By.CSS_SELECTOR, '[data-latency="primary"]').text == "4.2 ms"
    assert p50.find_element(By.CSS_SELECTOR, '[data-latency="shadow"]').text == "6.1 ms"
    p99 = card.find_element(By.CSS_SELECTOR, 'tr[data-quantile="p99"]')
    assert p99.find_element(By.CSS_SELECTOR, '[data-latency="shadow"]').text == "33.0 ms"

    # An example pair side by side, differing paths highlighted, noise marked differently.
    pair = card.find_element(By.CSS_SELECTOR, ".example-pair")
    primary = pair.find_element(By.CSS_SELECTOR, ".pane.primary")
    candidate = pair.find_element(By.CSS_SELECTOR, ".pane.candidate")
    assert primary.location["x"] < candidate.location["x"]
    assert primary.location["y"] == candidate.location["y"]
    cand_total = candidate.find_element(By.CSS_SELECTOR, '.hl-diff[data-path="body.total"]')
    assert cand_total.text == '"total": "12.50"'
    prim_total = primary.find_element(By.CSS_SELECTOR, '.hl-diff[data-path="body.total"]')
    assert prim_total.text == '"total": 12.5'
    assert candidate.find_element(By.CSS_SELECTOR, '.hl-diff[data-path="body.currency"]')
    header = candidate.find_element(By.CSS_SELECTOR, '.hl-diff[data-path="headers.x-version"]')
    assert header.text == '"x-version": "v2"'
    noise = candidate.find_element(By.CSS_SELECTOR, '.hl-noise[data-path="body.request_uuid"]')
    assert noise.text == '"request_uuid": "uuid-c-1"'
    assert noise.value_of_css_property("background-color") != cand_total.value_of_css_property(
        "background-color"
    )
    # Unchanged values are not highlighted; fields only one side has are named on the other.
    sku = candidate.find_element(By.CSS_SELECTOR, '[data-path="body.items[0].sku"]')
    assert "hl-diff" not in (sku.get_attribute("class") or "")
    absent = primary.find_element(By.CSS_SELECTOR, ".absent").text
    assert "body.customer" in absent and "body.currency" in absent

    updated = browser.find_element(By.ID, "updated-at").text
    assert updated.startswith("updated at ")

    # The page ran without script errors or CSP violations.
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []

    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    width, height, rows = decode_png(shot.read_bytes())
    assert (width, height) == tuple(
        browser.execute_script("return [window.innerWidth, window.innerHeight]")
    )
    assert width >= 1000 and height >= 800
    seen = colours(rows)
    assert len(seen) > 50, "screenshot is (nearly) one colour"
    assert max(seen.values()) < 0.95 * width * height, "screenshot is (nearly) blank"
    assert seen.get(TOPBAR_RGB, 0) > 1000, "the header bar is not in the screenshot"
    assert seen.get(DIFF_BG_RGB, 0) > 200, "no highlighted difference in the screenshot"
    assert seen.get(NOISE_BG_RGB, 0) > 100, "no noise marking in the screenshot"


def test_dashboard_refreshes_live_and_filters_examples_by_field(
    browser: WebDriver, admin: AdminServer, store: FakeStore
) -> None:
    browser.get(admin.url + "/")
    card = wait_for(browser, '.card[data-route="orders"][data-target="orders-v2"]')
    tile = card.find_element(By.CSS_SELECTOR, '.tile[data-metric="compared"] .value')
    assert tile.text == "120"
    first_update = browser.find_element(By.ID, "updated-at").get_attribute("datetime")

    with store.lock:
        store.compared = 240
    WebDriverWait(browser, 10).until(lambda d: tile.text == "240")
    assert browser.find_element(By.ID, "updated-at").get_attribute("datetime") != first_update

    # Clicking a field filters the examples to it; clicking again clears the filter.
    card.find_element(By.CSS_SELECTOR, 'tr.field-row[data-field="body.total"]').click()
    chip = wait_for(browser, ".filter-chip")
    assert "body.total" in chip.text
    row = card.find_element(By.CSS_SELECTOR, 'tr.field-row[data-field="body.total"]')
    assert "selected" in (row.get_attribute("class") or "")

    # Another example can be opened; the selection survives refreshes.
    items = card.find_elements(By.CSS_SELECTOR, ".example-item")
    assert len(items) == 3
    items[1].click()
    WebDriverWait(browser, 5).until(
        lambda d: "/orders/2" in card.find_element(By.CSS_SELECTOR, ".example-head").text
    )
    with store.lock:
        store.compared = 300
    WebDriverWait(browser, 10).until(lambda d: tile.text == "300")
    selected = card.find_element(By.CSS_SELECTOR, ".example-item.selected")
    assert selected.get_attribute("data-request-id") == "req-2"


def test_dashboard_with_no_comparisons_says_so(browser: WebDriver) -> None:
    server = AdminServer(None)
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 10).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true"
        )
        empty = browser.find_element(By.ID, "empty")
        assert empty.is_displayed()
        assert "No comparisons yet" in empty.text
        assert browser.find_elements(By.CSS_SELECTOR, ".card") == []
    finally:
        server.close()
