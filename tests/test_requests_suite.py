"""The ``requests`` library's own test suite, run directly and through shadowlane.

Why: requests' ~600 tests exercise HTTP corners nobody here would think to write (digest auth
round trips, redirects with bodies, cookies across redirects, chunked uploads, odd encodings,
streaming) against pytest-httpbin's server. Running them once against httpbin and once with
shadowlane in front of it (``support.requests_via_proxy``) and comparing the outcomes tells us
where a proxy in the path changes what a real client sees.

The claim checked: every test that fails through the proxy also fails without it, except those
in :data:`PROXY_CHANGES_OUTCOME`, each with the reason an intermediary legitimately changes it.

The sdist of the *installed* requests version is fetched with pip (PyPI) into
``$XDG_CACHE_HOME/shadowlane-tests`` once, then reused. Both runs load
``support.loopback_guard``: tests that reach beyond loopback fail fast, identically, and send
nothing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
SUITE_TIMEOUT = 900.0  # seconds for one run of the suite; a run is ~1.5 min here
PER_TEST_TIMEOUT = 60  # pytest-timeout inside the suite: one wedged test cannot eat the budget

#: Tests whose outcome a proxy in the path legitimately changes (test id -> why).
PROXY_CHANGES_OUTCOME: dict[str, str] = {
    "tests.test_requests.TestRequests::test_proxy_authorization_preserved_on_request": (
        "sends Proxy-Authorization and expects httpbin to echo it back. That header is "
        "addressed to the first proxy on the path, which consumes it (RFC 9110 §11.7.2); a "
        "reverse proxy must not pass a client's proxy credentials on to the origin. Only "
        "holds with no intermediary at all."
    ),
}

#: Deselected in both runs (node-id prefixes): they need more than loopback, or never touch
#: httpbin so the proxy cannot change them and they only cost time.
DESELECT: dict[str, str] = {
    "tests/test_requests.py::TestTimeout::test_connect_timeout": (
        "connects to 10.255.255.1 (a non-routable 'tarpit') to provoke a connect timeout"
    ),
    "tests/test_requests.py::TestTimeout::test_total_timeout_connect": "same tarpit address",
    "tests/test_lowlevel.py::test_use_proxy_from_environment": (
        "requests http(s)://httpbin.org through a SOCKS proxy: needs PySocks and DNS"
    ),
    "tests/test_testserver.py": (
        "tests requests' own raw socket test server, never httpbin: same outcome by construction"
    ),
}


@dataclass
class Outcome:
    status: str  # "passed" | "failed" | "skipped"
    message: str = ""


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shadowlane-tests"


def fetch_requests_sdist(version: str) -> Path:
    """The unpacked sdist of requests ``version`` (cached); its root is where its tests run."""
    root = _cache_root()
    target = root / f"requests-{version}"
    if (target / "tests" / "test_requests.py").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--disable-pip-version-check",
                f"requests=={version}",
                "-d",
                tmp,
            ],
            check=True,
            timeout=300,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        (archive,) = Path(tmp).glob("requests-*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        unpacked = Path(tmp) / f"requests-{version}"
        if target.exists():  # a concurrent run got there first
            return target
        unpacked.rename(target)
    return target


def parse_junit(path: Path) -> dict[str, Outcome]:
    """Test id (``classname::name``) -> outcome; any failure or error makes it "failed"."""
    outcomes: dict[str, Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            outcome = Outcome("failed", (bad.get("message") or "")[:300])
        elif case.find("skipped") is not None:
            outcome = Outcome("skipped")
        else:
            outcome = Outcome("passed")
        previous = outcomes.get(test_id)
        if previous is not None and previous.status == "failed":  # teardown errors add a case
            continue
        outcomes[test_id] = outcome
    return outcomes


def _suite_command(junit: Path, through_proxy: bool) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "support.loopback_guard",
        f"--timeout={PER_TEST_TIMEOUT}",
        f"--junitxml={junit}",
    ]
    for prefix in DESELECT:
        cmd += ["--deselect", prefix]
    if through_proxy:
        cmd += ["-p", "support.requests_via_proxy"]
    return cmd


@pytest.mark.timeout(SUITE_TIMEOUT + 120)
def test_requests_suite_through_proxy(tmp_path: Path) -> None:
    assert importlib.util.find_spec("pytest_httpbin"), (
        "pytest-httpbin is not installed: it must be in the [test] extras"
    )
    suite = fetch_requests_sdist(importlib.metadata.version("requests"))

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    report = tmp_path / "proxied-report.json"
    env_proxied = dict(env, SHADOWLANE_SUITE_REPORT=str(report))

    # Both runs at once: each has its own httpbin server and ports, and the suite mostly waits.
    runs = {}
    for name, through_proxy, run_env in (
        ("direct", False, env),
        ("proxied", True, env_proxied),
    ):
        junit = tmp_path / f"{name}.xml"
        log = (tmp_path / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            _suite_command(junit, through_proxy),
            cwd=suite,
            env=run_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        runs[name] = (proc, junit, log)
    try:
        for proc, _, _ in runs.values():
            proc.wait(SUITE_TIMEOUT)
    finally:
        for proc, _, log in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            log.close()

    def tail(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:]

    for name, (_, junit, _) in runs.items():
        assert junit.exists(), f"{name} run wrote no junit xml; log tail:\n{tail(name)}"
    direct = parse_junit(runs["direct"][1])
    proxied = parse_junit(runs["proxied"][1])

    passed_direct = sum(o.status == "passed" for o in direct.values())
    assert passed_direct >= 400, (
        f"only {passed_direct} tests passed without the proxy: the suite itself is broken "
        f"here, so the comparison would mean nothing\n{tail('direct')}"
    )
    assert set(proxied) == set(direct), "the two runs collected different tests"

    assert report.exists(), (
        f"the httpbin override never ran: the suite did not go through the proxy\n{tail('proxied')}"
    )
    stats = json.loads(report.read_text())
    assert stats["upstream_requests"] >= 200, stats  # 265 with requests 2.34
    # the proxy sets X-Forwarded-For on everything it forwards; all plain-HTTP traffic must
    # have come that way (tests only know the proxy's address)
    assert stats["upstream_requests_with_x_forwarded_for"] == stats["upstream_requests"], stats
    assert stats["proxy_alive_at_end"], f"the proxy died during the suite: {stats}"
    assert stats["proxy_returncode"] == 0, f"SIGTERM must exit 0: {stats}"

    failed_direct = {t for t, o in direct.items() if o.status == "failed"}
    failed_proxied = {t for t, o in proxied.items() if o.status == "failed"}
    new_failures = failed_proxied - failed_direct - set(PROXY_CHANGES_OUTCOME)
    assert not new_failures, "fail only through the proxy:\n" + "\n".join(
        f"  {t}: {proxied[t].message}" for t in sorted(new_failures)
    )
    # the allowlist stays minimal: an entry that no longer fails through the proxy must go
    stale = {t for t in PROXY_CHANGES_OUTCOME if proxied.get(t, Outcome("")).status == "passed"}
    assert not stale, f"PROXY_CHANGES_OUTCOME entries now pass, remove them: {sorted(stale)}"


def test_parse_junit_reads_outcomes(tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.a.T" name="ok" />'
        '<testcase classname="tests.a.T" name="bad"><failure message="boom">x</failure>'
        "</testcase>"
        '<testcase classname="tests.a" name="s[1]"><skipped message="no" /></testcase>'
        '<testcase classname="tests.a" name="e"><error message="setup" /></testcase>'
        '<testcase classname="tests.a" name="e" />'
        "</testsuite></testsuites>"
    )
    got = {k: v.status for k, v in parse_junit(xml).items()}
    assert got == {
        "tests.a.T::ok": "passed",
        "tests.a.T::bad": "failed",
        "tests.a::s[1]": "skipped",
        "tests.a::e": "failed",
    }


def test_cache_root_honours_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cache_root() == tmp_path / "shadowlane-tests"
