"""shadowlane: an HTTP ingress that shadows live traffic to new backends and compares answers."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

__version__ = "0.1.0"

_PACKAGE = Path(__file__).resolve().parent


def build_kind() -> str:
    """"compiled" when the hot path runs as mypyc-built C (see setup.py), else "interpreted".

    Shown by `shadowlane --version` and the start-up line, so that a benchmark or a bug report
    says which one ran: the same source, about twice the Python speed when compiled.
    """
    from shadowlane.wire import server

    return "interpreted" if (server.__file__ or "").endswith(".py") else "compiled"


def stale_compiled_modules() -> list[str]:
    """Compiled modules older than their `.py`: an editable install whose source was edited.

    Python imports the extension, not the source, when both sit side by side; after an edit the
    old build would run silently. `pip install -e .` rebuilds (or `SHADOWLANE_PURE_PYTHON=1 pip
    install -e .` to develop without compiling). The CLI warns and the test suite refuses to run.
    """
    stale = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for ext in _PACKAGE.rglob(f"*{suffix}"):
            source = ext.with_name(ext.name[: -len(suffix)] + ".py")
            if source.exists() and source.stat().st_mtime > ext.stat().st_mtime:
                stale.append(str(source.relative_to(_PACKAGE.parent)))
    return sorted(stale)
