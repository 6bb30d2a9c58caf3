"""Build shadowlane, compiling the hot path with mypyc when it can.

Why compile at all: a proxied request costs about 17 us of Python in the interpreter and about
10 us once the modules below are compiled by mypyc (measured with wrk and /proc/PID/stat, see
docs/performance.md). The modules are already strictly typed (`mypy --strict`), which is what
mypyc needs to turn attribute access and method calls into C; no source change, no second
language.

Why it is optional: the same `.py` files are the fallback. `SHADOWLANE_PURE_PYTHON=1` skips the
compilation, and a machine without a C compiler gets a pure-Python install with a warning
instead of a failed one (the `.py` files ship either way). `shadowlane --version` and the
start-up line say which one runs.

The list holds the modules that run per request or per compared pair. Everything else (config,
CLI, admin, stores, demo) runs at start-up or off the hot path, stays interpreted and keeps its
tracebacks readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED = [
    "src/shadowlane/wire/messages.py",
    "src/shadowlane/wire/headers.py",
    "src/shadowlane/wire/request_head.py",
    "src/shadowlane/wire/exchange.py",
    "src/shadowlane/wire/server.py",
    "src/shadowlane/wire/upstream.py",
    # HTTP/2: its exchanges and streams subclass Exchange and UpstreamConnection
    "src/shadowlane/wire/h2_framing.py",
    "src/shadowlane/wire/h2_send.py",
    "src/shadowlane/wire/hpack.py",
    "src/shadowlane/wire/h2_server.py",
    "src/shadowlane/wire/h2_upstream.py",
    "src/shadowlane/routing/predicates.py",
    "src/shadowlane/routing/balance.py",
    "src/shadowlane/routing/table.py",
    "src/shadowlane/proxy.py",
    "src/shadowlane/shadow/outcomes.py",
    "src/shadowlane/shadow/breaker.py",
    "src/shadowlane/shadow/sampling.py",
    "src/shadowlane/shadow/mutation.py",
    "src/shadowlane/shadow/join.py",
    "src/shadowlane/shadow/plan.py",
    "src/shadowlane/shadow/ticket.py",
    "src/shadowlane/shadow/lane.py",
    "src/shadowlane/shadow/dispatcher.py",
    "src/shadowlane/shadow/keys.py",
    "src/shadowlane/shadow/ordering.py",
    "src/shadowlane/shadow/elasticsearch.py",
    "src/shadowlane/shadow/writes.py",
    # subclasses wire.upstream.ResponseSink, and an interpreted class cannot inherit from a
    # compiled one
    "src/shadowlane/replay/client.py",
    "src/shadowlane/record/recorder.py",
    # the jobs the loop builds for every compared request (interpreted, each was a Python call)
    "src/shadowlane/compare/model.py",
    "src/shadowlane/compare/paths.py",
    "src/shadowlane/compare/diff.py",
    "src/shadowlane/compare/engine.py",
    # the feeder thread's framing of every compared job (with the GIL)
    "src/shadowlane/compare/pool.py",
    "src/shadowlane/store/batch.py",
    "src/shadowlane/metrics.py",
]


#: the name of the shared library the compiled modules import (`shadowlane_native__mypyc`)
GROUP = "shadowlane_native"

#: written beside the compiled modules: the SHA-256 of each source as it was compiled, so that
#: `shadowlane.stale_compiled_modules()` can tell an edited source from a fresh install (file
#: times cannot: pip writes each `.py` a moment after its `.so`)
RECORD = "_compiled.json"


def source_digests() -> dict[str, str]:
    """`{"shadowlane/wire/server.py": sha256, ...}` for the modules in COMPILED."""
    return {
        path.removeprefix("src/"): hashlib.sha256(Path(path).read_bytes()).hexdigest()
        for path in COMPILED
    }


class OptionalBuildExt(build_ext):
    """Build the mypyc extensions, or none of them.

    The per-module extensions all import one shared library; a half-built set would make
    `import shadowlane.proxy` fail where the `.py` would have worked, so on any failure every
    built file is removed and the install goes on without them.
    """

    def _record_path(self) -> str:
        # the package's directory where the extensions go: build/lib.../shadowlane for a
        # wheel, src/shadowlane for an editable install (extensions built in place)
        return os.path.join(os.path.dirname(self.get_ext_fullpath("shadowlane.proxy")), RECORD)

    def run(self) -> None:
        try:
            super().run()
            if self.extensions:
                with open(self._record_path(), "w") as out:
                    json.dump({"sources": source_digests()}, out, indent=1, sort_keys=True)
        except Exception as exc:  # compiler missing, compile error: fall back, loudly
            suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
            # an editable install keeps its extensions beside the source: an earlier build's
            # would otherwise keep running instead of the edited `.py`
            in_place = [p.removesuffix(".py") + suffix for p in COMPILED]
            in_place.append(f"src/{GROUP}__mypyc{suffix}")
            in_place += [f"src/shadowlane/{RECORD}", self._record_path()]
            for path in [*self.get_outputs(), *in_place]:
                if os.path.exists(path):
                    os.remove(path)
            self.warn(f"shadowlane: mypyc build failed ({exc}); installing pure Python")


def ext_modules() -> list[Any]:
    if os.environ.get("SHADOWLANE_PURE_PYTHON", "") not in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("shadowlane: mypyc not available; installing pure Python", file=sys.stderr)
        return []
    try:
        # SHADOWLANE_MYPYC_OPT_LEVEL: for builds that test the build itself, not its speed
        # (test_build's wheel): 0 compiles several times faster
        opt_level = os.environ.get("SHADOWLANE_MYPYC_OPT_LEVEL", "3")
        return list(mypycify(COMPILED, opt_level=opt_level, debug_level="0", group_name=GROUP))
    except BaseException as exc:  # mypy found an error, for example: fall back, loudly
        print(f"shadowlane: mypyc could not compile ({exc!r}); pure Python", file=sys.stderr)
        return []


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
