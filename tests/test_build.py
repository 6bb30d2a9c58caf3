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
import json
import os
import shutil
import site
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import shadowlane
from shadowlane import build_kind, stale_compiled_modules
from support.backend import RecordingBackend
from support.configs import shadow_config
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
        config = shadow_config(
            {"v1": {"endpoints": [backend.url]}, "v2": {"endpoints": [shadow.url]}},
            route="r",
            primary="v1",
            shadows=["v2"],
        )
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


# -- the staleness check: an edited source, never a fresh install ---------------------------

_WARNING = "warning: compiled modules"


def _tracked_copy(dest: Path) -> Path:
    """The repository as a fresh clone holds it (tracked files only): no build output of the
    editable install under test leaks into the package being built."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def _needs_compiled_build() -> None:
    if build_kind() != "compiled":
        pytest.skip("interpreted build: there is no compiled module to be stale")


@pytest.mark.timeout(600)
def test_a_fresh_non_editable_install_prints_no_warning_until_a_source_is_edited(
    tmp_path: Path,
) -> None:
    """`pip install .` into a fresh venv: the build compiles, `shadowlane --version` says
    compiled and prints nothing on stderr. Then an installed source is edited: now it warns."""
    _needs_compiled_build()
    repo = _tracked_copy(tmp_path / "repo")
    # the wheel is built as `pip install .` builds it, but with the build requirements of this
    # test environment ([test] has them) instead of downloading them into an isolated one
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-w",
            str(tmp_path / "dist"),
            str(repo),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        # what is tested is the build record, not the code's speed: -O0 compiles much faster
        env=dict(os.environ, SHADOWLANE_MYPYC_OPT_LEVEL="0"),
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("shadowlane-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # the dependencies are this environment's (no network); the venv's own site-packages,
    # where the wheel goes, comes first on sys.path
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "test-env-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    where = subprocess.run(
        [str(python), "-c", "import shadowlane; print(shadowlane.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=tmp_path,
    ).stdout.strip()
    assert where.startswith(str(venv)), where  # the new install, not the one under test

    def version() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(venv / "bin" / "shadowlane"), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )

    fresh = version()
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.strip().endswith("(compiled)"), fresh.stdout
    assert fresh.stderr == "", fresh.stderr

    source = Path(where).parent / "proxy.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    edited = version()
    assert _WARNING in edited.stderr and "shadowlane/proxy.py" in edited.stderr, edited.stderr
    assert "shadowlane/wire/server.py" not in edited.stderr, edited.stderr


def test_an_edited_source_in_the_editable_tree_warns_and_the_suite_refuses(
    tmp_path: Path,
) -> None:
    """The editable install's own layout (sources, extensions and the build record side by
    side), copied so the tree under test stays untouched: unchanged, nothing is stale; with
    one source edited, the CLI warns and pytest refuses to run (exit 3)."""
    _needs_compiled_build()
    package = Path(shadowlane.__file__).resolve().parent
    src = tmp_path / "src"
    shutil.copytree(package, src / "shadowlane", ignore=shutil.ignore_patterns("__pycache__"))
    for native in package.parent.glob("shadowlane_native__mypyc*"):
        shutil.copy2(native, src / native.name)
    env = dict(os.environ, PYTHONPATH=str(src))

    def stale() -> list[str]:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, shadowlane\n"
                f"assert shadowlane.__file__.startswith({str(src)!r}), shadowlane.__file__\n"
                "print(json.dumps(shadowlane.stale_compiled_modules()))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr
        names: list[str] = json.loads(out.stdout)
        return names

    assert stale() == []
    (src / "shadowlane" / "_compiled.json").touch()  # a newer build record changes nothing
    source = src / "shadowlane" / "shadow" / "lane.py"
    source.write_text(source.read_text() + "\n# edited\n")
    assert stale() == ["shadowlane/shadow/lane.py"]

    cli = subprocess.run(
        [sys.executable, "-m", "shadowlane", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert _WARNING in cli.stderr and "shadowlane/shadow/lane.py" in cli.stderr, cli.stderr
    suite = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "test_build.py::test_compiled_list_names_real_modules"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert suite.returncode == 3, suite.stdout + suite.stderr
    assert "shadowlane/shadow/lane.py" in suite.stdout + suite.stderr
