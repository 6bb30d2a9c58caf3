"""The migrations page in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
Selenium), on the real proxy's admin listener.

Here: a manual migration (two real backends, a SQLite store) is moved with the page's own
buttons (the token typed into the page), and the page shows the stages as a timeline and the
gates. `assert_dashboard_names_failing_gate` is also used by the fleet test, where the reads
stage of a real OpenSearch migration is blocked by a real difference.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from support.backend import RecordingBackend
from support.browser import (
    By,
    StaleElementReferenceException,
    WebDriver,
    chromium,
    wait_css,
)
from support.fleet import ENV, TOKEN, TOKEN_ENV, migration
from support.proxy import ProxyProcess
from support.wait import wait_until


def fresh(driver: WebDriver, action: Any, timeout: float = 10.0) -> Any:
    """Run `action(driver)`, again if the page re-rendered under it (it refreshes every 2 s
    and rebuilds its cards, so an element found a moment ago may be gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action(driver)
        except StaleElementReferenceException:
            if time.monotonic() > deadline:
                raise


def click(driver: WebDriver, css: str) -> None:
    fresh(driver, lambda d: d.find_element(By.CSS_SELECTOR, css).click())


def text(driver: WebDriver, css: str) -> str:
    found: str = fresh(driver, lambda d: d.find_element(By.CSS_SELECTOR, css).text)
    return found


def assert_dashboard_names_failing_gate(
    proxy: ProxyProcess, tmp_path: Path, route: str, field_part: str
) -> None:
    row_css = 'tr.gate-fail[data-gate="max_diff_rate"]'

    def read_row(driver: WebDriver) -> tuple[dict[str, str], str]:
        row = driver.find_element(By.CSS_SELECTOR, row_css)
        cells = {
            next(
                k for k in (c.get_attribute("class") or "").split() if k.startswith("gate-")
            ): c.text
            for c in row.find_elements(By.TAG_NAME, "td")
        }
        return cells, row.value_of_css_property("background-color")

    with chromium(tmp_path) as driver:
        driver.get(proxy.admin_url + "/migrations")
        wait_css(driver, row_css)
        cells, bg = fresh(driver, read_row)
        assert cells["gate-route"] == route
        assert field_part in cells["gate-field"]
        assert float(cells["gate-value"]) > float(cells["gate-threshold"])
        assert "differ on" in cells["gate-detail"]
        blocking = text(driver, ".migration .blocking")
        assert "max_diff_rate" in blocking and route in blocking
        # red: the failing row's background is the page's diff colour
        assert bg in ("rgba(253, 226, 228, 1)", "rgb(253, 226, 228)"), bg
        current = text(driver, ".timeline .stage-current")
        assert current.startswith("reads"), current


def test_page_moves_a_manual_migration_with_its_buttons(tmp_path: Path) -> None:
    with RecordingBackend() as old, RecordingBackend() as new:
        cfg = {
            "admin": {"token_env": TOKEN_ENV},
            "backends": {"old": {"endpoints": [old.url]}, "new": {"endpoints": [new.url]}},
            "routes": [
                {
                    "name": "api",
                    "match": {"path_prefix": "/"},
                    "backends": [
                        {"backend": "old", "weight": 100},
                        {"backend": "new", "weight": 0},
                    ],
                    "shadows": [{"backend": "new", "percent": 0, "compare": True}],
                }
            ],
            "compare": {"store": f"sqlite:///{tmp_path}/store.db"},
            "migrations": [
                {
                    "name": "api-v2",
                    "old": "old",
                    "new": "new",
                    "interval": "200ms",
                    "stages": [
                        {
                            "name": "shadow",
                            "shadow": {"routes": ["api"], "percent": 50},
                            "gates": {"min_time": "1h"},
                        },
                        {"name": "flip", "weights": [25, 100], "gates": {"step_time": "1h"}},
                    ],
                }
            ],
        }
        with ProxyProcess(cfg, env=ENV) as proxy, chromium(tmp_path) as driver:
            driver.get(proxy.admin_url + "/migrations")
            wait_css(driver, '.migration[data-position="shadow"]')
            stages = fresh(
                driver,
                lambda d: [
                    s.get_attribute("data-stage")
                    for s in d.find_elements(By.CSS_SELECTOR, ".migration .timeline .stage")
                ],
            )
            assert stages == ["shadow", "flip", "reverse"]
            wait_css(driver, 'tr.gate-wait[data-gate="min_time"]')
            assert text(driver, 'tr.gate-wait[data-gate="min_time"] .gate-threshold') == "3600"
            driver.find_element(By.ID, "token").send_keys(TOKEN)
            click(driver, ".migration button.advance")
            wait_css(driver, '.migration[data-position="flip@25%"]')
            result = driver.find_element(By.ID, "action-result").text
            assert "shadow → flip@25%" in result
            st = migration(proxy, "api-v2")
            assert st["position"] == "flip@25%" and st["last"]["actor"] == "admin:dashboard"
            # the weights are in force on the proxy
            wait_until(
                lambda: '"new":25' in proxy_config(proxy).replace(" ", ""), 3.0, "weights 75/25"
            )
            click(driver, ".migration button.rollback")
            wait_css(driver, '.migration[data-phase="halted"][data-position="flip@0%"]')
            st = migration(proxy, "api-v2")
            assert [a["action"] for a in st["audit"][:2]] == ["rollback", "advance"]
            # a wrong token is refused and said so on the page
            box = driver.find_element(By.ID, "token")
            box.clear()
            box.send_keys("wrong")
            click(driver, ".migration button.advance")
            wait_until(
                lambda: "refused (401)" in driver.find_element(By.ID, "action-result").text,
                5.0,
                "the refusal on the page",
            )
            assert migration(proxy, "api-v2")["position"] == "flip@0%"


def proxy_config(proxy: ProxyProcess) -> str:
    import json
    import urllib.request

    with urllib.request.urlopen(proxy.admin_url + "/api/config", timeout=5) as resp:
        routes = json.loads(resp.read())["routes"]
    return json.dumps(routes[0]["weights"])
