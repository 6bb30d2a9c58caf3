"""Test support: real servers and a real proxy subprocess for shadowlane's tests.

Import it as ``support`` (``from support.backend import RecordingBackend``): pytest puts ``tests/``
on ``sys.path`` because ``tests/conftest.py`` lives there, and the name ``support`` (not
``tests.support``) lets the same modules be loaded as a plugin into *other* test suites (the
``requests`` suite has its own ``tests`` package, which would shadow ours).

Modules import each other relatively for the same reason. Nothing here imports ``shadowlane``:
the proxy is only ever driven from outside, as a subprocess, so a bug in it cannot hide a bug in
the harness.
"""

from __future__ import annotations

from .backend import HungServer, Recorded, RecordingBackend, Reply, dead_port, pattern_bytes
from .configs import backend_entry, basic_config, shadow_config
from .proxy import HttpResponse, ProxyProcess, raw_request, read_http_response

__all__ = [
    "HttpResponse",
    "HungServer",
    "ProxyProcess",
    "Recorded",
    "RecordingBackend",
    "Reply",
    "backend_entry",
    "basic_config",
    "dead_port",
    "pattern_bytes",
    "raw_request",
    "read_http_response",
    "shadow_config",
]
