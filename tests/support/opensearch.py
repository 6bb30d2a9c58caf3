"""A real OpenSearch-compatible server in two versions, from PyPI: osmem-server.

osmem-server (github.com/shibukawa/osmem) is an in-memory server speaking the OpenSearch REST
API, shipped on PyPI as a wheel with a static binary: no JVM, no Docker. Its releases follow
OpenSearch's API: 0.1.1 answers as OpenSearch 2.19, 0.1.6 as OpenSearch 3.8. The write tests
run the old one as the primary and the new one as the shadow, the shape of a 2 -> 3 (or
Elasticsearch 7 -> 8) migration.

Each version is pip-installed into its own cached target dir (`support.migration.install`), so
both run side by side. The server binds port 0 and prints its URL as one JSON line on stdout;
it exits when its stdin closes or its parent process ends (`--parent-pid`), and is stopped by
PID like every server of the harness.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from support.migration import install
from support.processes import end_process_group, ends_with_us

#: answers as OpenSearch 2.19 (the primary of the write tests)
OLD = "0.1.1"
#: answers as OpenSearch 3.8 (the shadow)
NEW = "0.1.6"


def binary(version: str) -> Path:
    """The osmem-server binary of `version`, installed (cached) from PyPI."""
    site = install((f"osmem-server=={version}",))
    path = site / "osmem_server" / "bin" / "osmem-server"
    if not path.exists():
        raise RuntimeError(f"osmem-server {version}: no binary at {path}")
    path.chmod(path.stat().st_mode | 0o111)
    return path


class OpenSearchServer:
    """One osmem-server process on 127.0.0.1, port 0; `url` once entered."""

    def __init__(self, version: str, ready_timeout: float = 30.0) -> None:
        self.version = version
        self.ready_timeout = ready_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="osmem-")
        self.log_path = Path(self._tmp.name) / "server.log"
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.api_version = ""

    def __enter__(self) -> Self:
        exe = binary(self.version)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(exe), "-addr", "127.0.0.1:0", "-no-ja", "-parent-pid", str(os.getpid())],
                stdin=subprocess.PIPE,  # closed at stop: the server exits with it
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
                preexec_fn=ends_with_us(),
            )
        try:
            ready = self._read_ready()
        except BaseException:
            self.stop()
            raise
        self.url = str(ready["url"])
        self.api_version = str(ready.get("version", ""))
        return self

    def _read_ready(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        done = threading.Event()
        proc = self.proc

        def watchdog() -> None:  # readline cannot time out: end the server if it never says
            if not done.wait(self.ready_timeout):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            line = proc.stdout.readline()
        finally:
            done.set()
        try:
            ready = json.loads(line)
        except ValueError:
            ready = None
        if not isinstance(ready, dict) or "url" not in ready:
            raise RuntimeError(
                f"osmem-server {self.version} did not start: {line!r} "
                f"{self.log_path.read_text(errors='replace')[-2000:]}"
            )
        return ready

    def request(self, method: str, path: str, body: Any = None, *, ndjson: bool = False) -> Any:
        """One request straight to the server (not through the proxy), decoded as JSON;
        an error status is returned as its JSON body, not raised."""
        if body is None:
            data = None
        elif ndjson:
            data = "".join(json.dumps(line) + "\n" for line in body).encode()
        else:
            data = json.dumps(body).encode()
        ctype = "application/x-ndjson" if ndjson else "application/json"
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": ctype}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read()
        return json.loads(text) if text else {}

    def documents(self, index: str) -> dict[str, Any]:
        """Every document of `index`, `_id -> _source`, read with scroll (bounded pages)."""
        self.request("POST", f"/{index}/_refresh")
        out: dict[str, Any] = {}
        page = self.request(
            "POST", f"/{index}/_search?scroll=1m", {"size": 500, "query": {"match_all": {}}}
        )
        for _ in range(10_000):
            hits = page.get("hits", {}).get("hits", [])
            if not hits:
                break
            for hit in hits:
                out[hit["_id"]] = hit["_source"]
            page = self.request(
                "POST", "/_search/scroll", {"scroll": "1m", "scroll_id": page["_scroll_id"]}
            )
        return out

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            end_process_group(self.proc, timeout=5.0)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._tmp.cleanup()


class FaultyRelay:
    """A real HTTP server in front of a cluster, for the breaks a shadow can have.

    Requests are forwarded to `upstream` as they are, except that a body containing
    `b"REJECT"` is answered 500 without forwarding (a shadow that refuses a write), one
    containing `b"HOLD"` is held for `hold` seconds and then answered 504 without forwarding
    (a shadow that times out and never applies it), and one containing `b"SLOW"` is forwarded
    after `slow` seconds (a shadow that falls behind). Threaded, port 0, stopped by `close`.
    """

    def __init__(self, upstream: str, hold: float = 3.0, slow: float = 0.3) -> None:
        import http.client
        import http.server
        import urllib.parse

        parsed = urllib.parse.urlsplit(upstream)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
        stop = self._stop = threading.Event()
        self.forwarded = 0
        self.rejected = 0
        self.held = 0
        counts = self
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _answer(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if b"REJECT" in body:
                    with lock:
                        counts.rejected += 1
                    self._answer(500, b'{"error":"rejected by the relay","status":500}')
                    return
                if b"HOLD" in body:
                    with lock:
                        counts.held += 1
                    stop.wait(hold)
                    self._answer(504, b'{"error":"held by the relay","status":504}')
                    return
                if b"SLOW" in body:
                    stop.wait(slow)
                conn = http.client.HTTPConnection(host, port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    with lock:
                        counts.forwarded += 1
                    ctype = resp.getheader("Content-Type") or "application/json"
                    self._answer(resp.status, data, ctype)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __exit__(self, *exc: object) -> None:
        self.close()
