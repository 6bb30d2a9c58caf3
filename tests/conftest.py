"""Shared fixtures: real recording backends and real proxy subprocesses.

The helpers live in ``tests/support`` (imported as ``support``, see its docstring); the
fixtures here only tie their life cycles to pytest's, so a failing test never leaks a server or
a proxy process into the next one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from shadowlane import build_kind, stale_compiled_modules
from support.backend import Handler, RecordingBackend
from support.proxy import ProxyFactory, ProxyProcess

_CALL_REPORT = pytest.StashKey[pytest.TestReport]()


def pytest_report_header() -> str:
    return f"shadowlane hot path: {build_kind()} (see setup.py)"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test a build that is not the source: a stale compiled module runs instead of
    the edited `.py`, and CI (SHADOWLANE_REQUIRE_COMPILED=1) must test what users install."""
    stale = stale_compiled_modules()
    if stale:
        pytest.exit(
            f"compiled modules built from another version of their source: {', '.join(stale)}; "
            "rebuild with `python -m pip install -e .`",
            returncode=3,
        )
    if os.environ.get("SHADOWLANE_REQUIRE_COMPILED") == "1" and build_kind() != "compiled":
        pytest.exit("SHADOWLANE_REQUIRE_COMPILED=1 but the hot path is interpreted", returncode=3)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep the call-phase report so fixtures can tell, at teardown, whether the test failed."""
    report = yield
    if report.when == "call":
        item.stash[_CALL_REPORT] = report
    return report


@pytest.fixture
def backend() -> Iterator[RecordingBackend]:
    """A started :class:`RecordingBackend` with the default (echo + path conventions) handler.

    Teardown fails the test if the backend itself hit an unexpected exception: a harness bug
    must not pass for a proxy bug, or hide one.
    """
    with RecordingBackend() as b:
        yield b
    assert b.errors == [], f"RecordingBackend raised: {b.errors!r}"


@pytest.fixture
def backends() -> Iterator[Callable[..., RecordingBackend]]:
    """``make(handler=None) -> RecordingBackend``, started: for tests that need several
    backends (a primary, a shadow, two canary versions). All are stopped at teardown, then
    checked for server errors, as with ``backend``."""
    made: list[RecordingBackend] = []

    def make(handler: Handler | None = None) -> RecordingBackend:
        b = RecordingBackend(handler)
        made.append(b)
        return b.start()

    yield make
    for b in made:
        b.stop()
    for b in made:
        assert b.errors == [], f"RecordingBackend raised: {b.errors!r}"


@pytest.fixture
def proxy_factory(request: pytest.FixtureRequest) -> Iterator[ProxyFactory]:
    """``make(config, workers=1, env=None, **kw) -> ProxyProcess``, started and ready.

    Every proxy made is stopped at teardown (SIGTERM, SIGKILL after 10 s) and its temp dir
    removed. When the test failed, each proxy's stderr is printed first, so it shows up in the
    report's "captured stdout teardown" section instead of vanishing with the temp dir.
    """
    made: list[ProxyProcess] = []

    def make(config: dict[str, Any] | str, workers: int = 1, **kwargs: Any) -> ProxyProcess:
        proxy = ProxyProcess(config, workers=workers, **kwargs)
        made.append(proxy)
        return proxy.start()

    yield make
    report = request.node.stash.get(_CALL_REPORT, None)
    failed = report is not None and report.failed
    for proxy in reversed(made):
        if proxy.proc is not None and proxy.returncode is None:
            proxy.stop()
        if failed:
            print(f"--- proxy pid {proxy.proc.pid if proxy.proc else '-'} stderr ---")
            print(proxy.stderr_text())
        proxy.close()
