"""pytest plugin (``-p support.requests_via_proxy``): pytest-httpbin's server, behind shadowlane.

Loaded into a third-party test suite (``requests``' own), it makes the session-scoped
``httpbin`` fixture of pytest-httpbin hand out the URL of a real shadowlane subprocess whose
only route forwards to that same httpbin server. Every test that used to talk to httpbin
directly now goes client -> shadowlane -> httpbin, without editing a line of the suite.

How the override works: pytest resolves a fixture name to the most specific definition, and
among plugins to the one registered last; a fixture may request the definition it overrides by
its own name. pytest-httpbin registers from its entry point, after ``-p`` modules, so this module
registers the actual override (:mod:`._requests_httpbin_override`) from ``pytest_configure``,
which runs after all entry points: ``requests``' conftest ``httpbin`` -> ours -> pytest-httpbin's.

``httpbin_secure`` (TLS) is left alone: the proxy speaks plain HTTP/1.1 to clients.

Set ``SHADOWLANE_SUITE_REPORT=<path>`` to get a JSON file at session end saying which URLs were
used and how many requests reached the upstream server: the runner checks it, so an override
that silently stopped applying cannot pass for "everything works through the proxy".
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    override = importlib.import_module(f"{__package__}._requests_httpbin_override")
    config.pluginmanager.register(override, "shadowlane-httpbin-override")


def pytest_addoption(parser: Any) -> None:
    parser.addoption(
        "--shadowlane-workers",
        type=int,
        default=1,
        help="--workers for the shadowlane proxy put in front of pytest-httpbin",
    )
