"""Helpers for end-to-end comparison tests: real service versions, and reading what the proxy
compared from the outside (its admin API, its metrics, `shadowlane report` as a subprocess).

Like the rest of ``support``, nothing here imports ``shadowlane``: the proxy is judged only by
what its sockets, its store file and its command line say.

- :func:`install` pip-installs a pinned set of distributions into a cached target dir, so two
  versions of one service (say httpbin 0.7.0 and 0.10.4) can run side by side, each with its
  own Flask and Werkzeug.
- :class:`WerkzeugService` runs one such install as a real HTTP server (the Werkzeug server the
  version ships with) on a free loopback port.
- :func:`comparison_results` reads ``shadowlane_comparisons_total`` from ``/metrics``;
  :func:`wait_for_stored` waits (bounded) until the store holds a number of comparisons, and
  fails at once, with the counts, if the proxy dropped any.
- :func:`run_report` runs ``python -m shadowlane report`` against a store URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from support.processes import end_process_group, ends_with_us

from .metrics import scrape

CACHE = Path(os.environ.get("SHADOWLANE_TEST_CACHE", Path.home() / ".cache" / "shadowlane-tests"))


class InstallError(RuntimeError):
    """pip could not install a service version (no registry access, say)."""


def install(spec: tuple[str, ...]) -> Path:
    """``pip install spec`` into a cached target dir (reused when already complete)."""
    key = hashlib.sha256("\n".join((sys.version, *spec)).encode()).hexdigest()[:16]
    target = CACHE / f"{spec[0].replace('==', '-')}-{key}"
    if (target / ".complete").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=CACHE))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run(
        [*cmd, "--target", str(tmp), *spec], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InstallError(f"pip install {' '.join(spec)} failed: {done.stderr[-2000:]}")
    (tmp / ".complete").touch()
    try:
        tmp.rename(target)
    except OSError:  # another run finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_SERVER = """
import sys
from werkzeug.serving import make_server
module = __import__(sys.argv[1])
server = make_server("127.0.0.1", 0, module.app, threaded=True)
print(server.server_port, flush=True)
server.serve_forever()
"""


class WerkzeugService:
    """``module.app`` from an :func:`install` dir, served by that install's own Werkzeug.

    The interpreter runs with ``-S`` and ``PYTHONPATH`` set to the install only, so nothing from
    this venv (a newer Flask, say) leaks into the old version. Entering waits (bounded) for the
    server to print its port; exiting sends SIGTERM by PID, SIGKILL after ``stop_timeout``.
    """

    def __init__(self, site: Path, module: str, ready_timeout: float = 30.0) -> None:
        self.site = site
        self.module = module
        self.ready_timeout = ready_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="werkzeug-service-")
        self.log_path = Path(self._tmp.name) / "server.log"
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        env = {**os.environ, "PYTHONPATH": str(self.site), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _SERVER, self.module],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
                preexec_fn=ends_with_us(),
            )
        try:
            self.port = self._read_port()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_port(self) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        # readline() cannot time out: a watchdog kills the server if it never prints its port
        deadline = time.monotonic() + self.ready_timeout
        done = threading.Event()

        def watchdog() -> None:
            if not done.wait(max(0.0, deadline - time.monotonic())) and self.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            line = self.proc.stdout.readline()
        finally:
            done.set()
        if not line.strip().isdigit():
            raise RuntimeError(
                f"{self.module} from {self.site} did not start (printed {line!r}):\n"
                f"{self.log_text()[-3000:]}"
            )
        return int(line)

    def stop(self, stop_timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        end_process_group(proc, timeout=stop_timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        self.proc = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._tmp.cleanup()


# -- what the proxy compared, read from outside ------------------------------------------------


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET ``url`` and parse its JSON body (raises on a non-2xx answer)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def comparison_results(admin_url: str, timeout: float = 5.0) -> dict[tuple[str, str, str], int]:
    """``shadowlane_comparisons_total`` from the admin ``/metrics``: (route, target, result)
    -> count."""
    out: dict[tuple[str, str, str], int] = {}
    for s in scrape(admin_url, timeout).select("shadowlane_comparisons_total"):
        out[(s.labels["route"], s.labels["target"], s.labels["result"])] = int(s.value)
    return out


def stored_compared(admin_url: str) -> int:
    """Comparisons in the store, summed over routes and targets (the admin summary API)."""
    return sum(int(row["compared"]) for row in get_json(admin_url + "/api/comparisons/summary"))


def wait_for_stored(admin_url: str, expected: int, timeout: float = 30.0) -> None:
    """Wait until the proxy's store holds exactly ``expected`` comparisons.

    Fails at once if the proxy counted a dropped comparison (it would never be stored), and on
    timeout or overshoot says what the metrics and the store showed.
    """
    deadline = time.monotonic() + timeout
    while True:
        results = comparison_results(admin_url)
        dropped = {k: v for k, v in results.items() if k[2] == "dropped" and v}
        if dropped:
            raise AssertionError(f"the proxy dropped comparisons: {dropped}; all: {results}")
        stored = stored_compared(admin_url)
        if stored == expected:
            return
        if stored > expected:
            raise AssertionError(f"store holds {stored} comparisons, expected {expected}")
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout}s waiting for {expected} stored comparisons: "
                f"store has {stored}, metrics say {results}"
            )
        time.sleep(0.05)


def run_report(store_url: str, fmt: str = "text", timeout: float = 60.0) -> str:
    """``python -m shadowlane report --store URL --format FMT``; its stdout (exit 0 asserted)."""
    done = subprocess.run(
        [sys.executable, "-m", "shadowlane", "report", "--store", store_url, "--format", fmt],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"shadowlane report exited {done.returncode}:\n{done.stderr}\n{done.stdout}"
        )
    return done.stdout


def compared_in_report(store_url: str, route: str, target: str) -> int:
    """How many comparisons of (route, target) ``shadowlane report --format json`` finds in the
    store (fails if the report has no row for them)."""
    rows = {
        (r["route"], r["target"]): r
        for r in json.loads(run_report(store_url, "json"))["comparisons"]
    }
    assert (route, target) in rows, rows
    return int(rows[(route, target)]["compared"])


__all__ = [
    "CACHE",
    "InstallError",
    "WerkzeugService",
    "compared_in_report",
    "comparison_results",
    "get_json",
    "install",
    "run_report",
    "stored_compared",
    "wait_for_stored",
]
