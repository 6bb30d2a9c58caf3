"""A real headless Chromium for the dashboard tests (Debian's `chromium` + `chromium-driver`).

The comparisons dashboard (test_dashboard) and the migrations page (test_migrate_dashboard,
test_migrate_fleet) start the same browser the same way and wait for elements the same way:
one place, so a flag that keeps Chromium quiet and offline (or a new driver quirk) is fixed
for every page's tests at once.

Importing this skips the importing test module when Selenium is missing (CI installs the test
extras, so there it is an error, a packaging bug); the Selenium names the tests use come from
here too, so that no test module imports Selenium before that check.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from selenium import webdriver
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs the test extras: a missing selenium is a packaging bug, not a skip
    pytest.skip("selenium missing: pip install -e '.[test]'", allow_module_level=True)
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

__all__ = [
    "CHROMEDRIVER",
    "CHROMIUM",
    "By",
    "StaleElementReferenceException",
    "WebDriver",
    "WebDriverWait",
    "WebElement",
    "chromium",
    "wait_css",
]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextlib.contextmanager
def chromium(tmp_path: Path, width: int = 1400, height: int = 1400) -> Iterator[WebDriver]:
    """A headless Chromium with a window of `width` x `height` CSS pixels at scale 1 (so a
    screenshot has that size), a profile under `tmp_path`, no network of its own (no QUIC,
    no background or component updates, no sync) and the page's console log kept."""
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
        f"--window-size={width},{height}",
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


def wait_css(driver: WebDriver, css: str, timeout: float = 15.0) -> WebElement:
    """The first element matching `css`, once there is one; after `timeout` seconds an
    AssertionError that says what the page's connection line says (both pages have one) and
    how the page began, which is what tells a page that never loaded from a wrong selector."""
    try:
        found: WebElement = WebDriverWait(driver, timeout).until(
            lambda d: d.find_element(By.CSS_SELECTOR, css)
        )
    except TimeoutException:
        try:
            state = driver.find_element(By.ID, "conn-state").text
        except NoSuchElementException:
            state = "(no #conn-state)"
        raise AssertionError(
            f"{css!r} never appeared (page says: {state!r}): {driver.page_source[:3000]}"
        ) from None
    return found
