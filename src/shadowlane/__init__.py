"""shadowlane: an HTTP ingress that shadows live traffic to new backends and compares answers."""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
from pathlib import Path

__version__ = "0.1.0"

_PACKAGE = Path(__file__).resolve().parent


def build_kind() -> str:
    """ "compiled" when the hot path runs as mypyc-built C (see setup.py), else "interpreted".

    Shown by `shadowlane --version` and the start-up line, so that a benchmark or a bug report
    says which one ran: the same source, about twice the Python speed when compiled.
    """
    from shadowlane.wire import server

    return "interpreted" if (server.__file__ or "").endswith(".py") else "compiled"


def stale_compiled_modules() -> list[str]:
    """Compiled modules whose `.py` is not the source they were built from: an editable
    install whose source was edited since.

    Python imports the extension, not the source, when both sit side by side; after an edit the
    old build would run silently. `pip install -e .` rebuilds (or `SHADOWLANE_PURE_PYTHON=1 pip
    install -e .` to develop without compiling). The CLI warns and the test suite refuses to run.

    Why digests and not file times: pip writes each `.py` a moment after its `.so`, so by the
    clock every fresh install would look stale. The build records each source's SHA-256 in
    `_compiled.json` (setup.py); a compiled module with no record, or another digest, is stale.
    """
    sources = {
        ext.with_name(ext.name.partition(".")[0] + ".py")
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        for ext in _PACKAGE.rglob(f"*{suffix}")
    }
    if not sources:
        return []
    try:
        recorded: dict[str, str] = json.loads((_PACKAGE / "_compiled.json").read_text())["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = {}
    stale = []
    for source in sources:
        if not source.exists():
            continue
        name = source.relative_to(_PACKAGE.parent).as_posix()
        if recorded.get(name) != hashlib.sha256(source.read_bytes()).hexdigest():
            stale.append(name)
    return sorted(stale)
