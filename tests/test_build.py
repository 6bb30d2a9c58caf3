"""The build: the hot path compiled by mypyc, and the pure-Python fallback of the same source.

CI installs the compiled build (SHADOWLANE_REQUIRE_COMPILED=1, checked in conftest.py) and runs
the whole suite on it. The fallback (no C compiler, or SHADOWLANE_PURE_PYTHON=1) is the same
`.py` files; the test here runs a proxy from a copy of the package without its extensions and
sends a shadowed request through it, so both builds are proven on real sockets.
"""

from __future__ import annotations

import ast
import http.client
import importlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import shadowlane
from shadowlane import build_kind, stale_compiled_modules
from support.backend import RecordingBackend
from support.proxy import ProxyProcess

ROOT = Path(__file__).resolve().parent.parent


def compiled_module_names() -> list[str]:
    """The COMPILED list of setup.py, as module names (read, not imported: it calls setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            paths = ast.literal_eval(node.value)
            return [p.removeprefix("src/").removesuffix(".py").replace("/", ".") for p in paths]
    raise AssertionError("setup.py has no COMPILED list")


def test_compiled_list_names_real_modules() -> None:
    names = compiled_module_names()
    assert "shadowlane.wire.server" in names and "shadowlane.proxy" in names
    for name in names:
        importlib.import_module(name)  # a typo in setup.py would silently compile nothing


def test_a_compiled_build_compiles_every_listed_module() -> None:
    if build_kind() != "compiled":
        pytest.skip("interpreted build (SHADOWLANE_PURE_PYTHON=1 or no C compiler)")
    interpreted = [
        name
        for name in compiled_module_names()
        if (importlib.import_module(name).__file__ or "").endswith(".py")
    ]
    assert interpreted == []
    assert stale_compiled_modules() == []
    # and nothing else: a module dropped from the list leaves its old build beside the source
    package = Path(shadowlane.__file__).resolve().parent
    built = {
        "shadowlane." + str(p.relative_to(package)).split(".")[0].replace("/", ".")
        for p in package.rglob("*.so")
    }
    assert built == set(compiled_module_names())


def test_pure_python_fallback_proxies_and_shadows(
    tmp_path: Path,
    backend: RecordingBackend,
    proxy_factory: Callable[..., ProxyProcess],
) -> None:
    package = Path(shadowlane.__file__).resolve().parent
    copy = tmp_path / "src"
    shutil.copytree(
        package, copy / "shadowlane", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    with RecordingBackend() as shadow:
        config: dict[str, Any] = {
            "backends": {"v1": {"endpoints": [backend.url]}, "v2": {"endpoints": [shadow.url]}},
            "routes": [
                {
                    "name": "r",
                    "match": {"path_prefix": "/"},
                    "backend": "v1",
                    "shadows": [{"backend": "v2", "percent": 100}],
                }
            ],
        }
        proxy = proxy_factory(config, env={"PYTHONPATH": str(copy)})
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        try:
            conn.request("POST", "/orders?x=1", body=b"pure", headers={"Host": "api"})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
        finally:
            conn.close()
        copies = shadow.wait_for_requests(1)
        assert copies[0].path == "/orders" and copies[0].body == b"pure"
    assert "(interpreted): listening on" in proxy.stderr_text()
