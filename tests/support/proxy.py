"""Run the real shadowlane proxy as a subprocess, and talk raw HTTP to it.

Why a subprocess and not an in-process server: the contract under test is the command
(`python -m shadowlane run -c FILE`), its config file, its signals and its sockets. Running it as
a separate process also means a proxy that wedges its event loop cannot wedge the test runner;
every wait here has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from support.processes import end_process_group, ends_with_us

from .configs import basic_config as basic_config  # re-exported: its old home
from .metrics import fetch_text

LOOPBACK = "127.0.0.1"


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or LOOPBACK, int(port)


class ProxyProcess:
    """``python -m shadowlane run -c <tmp>/config.yaml`` as a context manager.

    ``config`` is a dict or YAML text. ``listen`` and ``admin.listen`` default to loopback port
    0: the proxy binds, and reports the ports it got in its ``--ready-file``, which it writes
    once every listener accepts. Entering starts the process and waits (``ready_timeout``) for
    that file; if the process exits first, the error carries its stderr. Exiting stops it with
    SIGTERM, then SIGKILL after ``timeout``.

    Why no port is picked here: a port found free and handed over later can be taken
    meanwhile by any socket on the machine (outgoing loopback connections draw their local
    ports from the same range), and the proxy would then fail to start.

    The process is its own session leader (``start_new_session``), so the forced stop can take
    its ``--workers`` children with it: ``os.killpg`` on the group this harness created.
    """

    def __init__(
        self,
        config: dict[str, Any] | str,
        workers: int = 1,
        env: dict[str, str] | None = None,
        *,
        extra_args: list[str] | None = None,
        ready_timeout: float = 15.0,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="shadowlane-proxy-")
        self.dir = Path(self._tmp.name)
        self.config_path = self.dir / "config.yaml"
        self.config = self._complete(config)
        self.write_config(self.config)
        self.ready_path = self.dir / "ready.json"
        #: the bound addresses, from the ready file (0 until started)
        self.host, self.port = LOOPBACK, 0
        self.admin_host, self.admin_port = LOOPBACK, 0
        self.workers = workers
        self.env = env
        self.extra_args = list(extra_args or [])
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @staticmethod
    def _complete(config: dict[str, Any] | str) -> dict[str, Any]:
        loaded = yaml.safe_load(config) if isinstance(config, str) else config
        if not isinstance(loaded, dict):
            raise TypeError(f"config must be a mapping, got {type(loaded).__name__}")
        out = dict(loaded)
        out.setdefault("listen", f"{LOOPBACK}:0")
        admin = dict(out.get("admin") or {})
        admin.setdefault("listen", f"{LOOPBACK}:0")
        out["admin"] = admin
        return out

    def write_config(self, config: dict[str, Any]) -> None:
        """(Re)write the config file, e.g. before :meth:`reload`."""
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    # -- addresses ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_host}:{self.admin_port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("proxy not started")
        return self.proc.pid

    @property
    def stdout_path(self) -> Path:
        return self.dir / "stdout.log"

    @property
    def stderr_path(self) -> Path:
        return self.dir / "stderr.log"

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def metrics_text(self, timeout: float = 5.0) -> str:
        """The admin listener's `/metrics` exposition (fails the test on a non-200 answer);
        parsed, it is :func:`support.metrics.scrape`."""
        return fetch_text(self.admin_url, timeout)

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stderr_lines(self, needle: str) -> list[str]:
        """The lines of stderr so far that contain ``needle`` (the proxy logs there what it
        did: "listening on", "reloaded", "reload refused", warnings)."""
        return [line for line in self.stderr_text().splitlines() if needle in line]

    def access_log(self) -> list[dict[str, Any]]:
        """The access log so far: one JSON object per stdout line (``access_log: true``)."""
        return [json.loads(line) for line in self.stdout_text().splitlines() if line.strip()]

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "shadowlane", "run", "-c", str(self.config_path)]
        cmd += ["--ready-file", str(self.ready_path)]
        if self.workers != 1:
            cmd += ["--workers", str(self.workers)]
        return cmd + self.extra_args

    def start(self) -> Self:
        """Start the process and wait until it says every listener accepts connections."""
        self.ready_path.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self.env:
            env.update(self.env)
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=self.dir,
                start_new_session=True,
                preexec_fn=ends_with_us(),
            )
        self.wait_ready(self.ready_timeout)
        return self

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Wait for the ready file, or fail with the stderr; take the bound ports from it.

        The proxy writes the file (atomically) only once the listener and the admin listener
        both accept, with every worker, so a test may scrape /metrics first thing.
        """
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self.returncode = code
                raise RuntimeError(
                    f"proxy exited with {code} before it was ready\n"
                    f"command: {self.command}\nconfig:\n{self.config_path.read_text()}\n"
                    f"stderr:\n{self.stderr_text()}\nstdout:\n{self.stdout_text()}"
                )
            try:
                ready: dict[str, Any] = json.loads(self.ready_path.read_bytes())
            except FileNotFoundError:
                ready = {}
            if ready:
                assert ready["pid"] == self.proc.pid, ready
                self.host, self.port = _split_hostport(ready["listen"])
                self.admin_host, self.admin_port = _split_hostport(ready["admin"])
                return ready
            if time.monotonic() >= deadline:
                stderr = self.stderr_text()
                self.stop(signal.SIGKILL, timeout=5)
                raise TimeoutError(f"proxy not ready after {timeout}s\nstderr:\n{stderr}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        """Signal the main process (by PID) if it is still running."""
        if self.alive():
            os.kill(self.pid, sig)

    def reload(self) -> None:
        """SIGHUP: the contract's "reload the config" (write it first with write_config)."""
        self.send_signal(signal.SIGHUP)

    def worker_pids(self) -> list[int]:
        """PIDs of the main process's direct children (the ``--workers`` processes)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # the comm field may contain spaces; ppid is the second field after ")"
            fields = stat.rpartition(")")[2].split()
            if len(fields) > 1 and int(fields[1]) == self.pid:
                pids.append(int(entry.name))
        return sorted(pids)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; raises TimeoutExpired if it does not."""
        assert self.proc is not None
        self.returncode = self.proc.wait(timeout)
        return self.returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig`` and wait up to ``timeout``; SIGKILL the process group after that.

        Returns the exit code as ``Popen`` reports it (negative: killed by that signal).
        """
        if self.proc is None:
            raise RuntimeError("proxy not started")
        self.returncode = end_process_group(self.proc, sig, timeout)
        return self.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop if running and remove the temp dir."""
        if self.proc is not None and self.returncode is None:
            self.stop()
        self._tmp.cleanup()


#: the type of conftest's ``proxy_factory`` fixture: ``make(config, workers=1, **kw)``, started
ProxyFactory = Callable[..., ProxyProcess]


# -- raw HTTP -------------------------------------------------------------------------------


def raw_request(
    port: int,
    data: bytes,
    timeout: float = 5.0,
    *,
    host: str = LOOPBACK,
    half_close: bool = False,
) -> bytes:
    """Send ``data`` as-is and return everything read until the peer closes or ``timeout``.

    Never raises for a reset or a timeout: a test about malformed input wants to see what came
    back (often a 400 and a close), not an exception. ``half_close`` shuts down our write side
    after sending, for servers that wait for EOF.
    """
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
    return b"".join(chunks)


@dataclass
class HttpResponse:
    """One parsed HTTP/1.x response: headers keep case and order."""

    http_version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    #: the body ended because the peer closed (no Content-Length, not chunked)
    close_delimited: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)

    def header_values(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]


class ResponseReader:
    """Reads consecutive responses from one socket, keeping bytes that belong to the next one.

    Pipelining tests need this: one ``recv`` may hold the end of one response and the start of
    the next. Every read is bounded by ``timeout`` (a TimeoutError names what was missing).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def _fill(self, deadline: float) -> bool:
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"response incomplete; have {bytes(self.buf[:200])!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(f"response incomplete; have {bytes(self.buf[:200])!r}") from None
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _line(self, deadline: float) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            if not self._fill(deadline):
                raise ConnectionError(f"peer closed mid-line; have {bytes(self.buf)!r}")
        line = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return line

    def _exactly(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            if not self._fill(deadline):
                raise ConnectionError(f"peer closed after {len(self.buf)} of {n} body bytes")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def _fields(self, deadline: float) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while line := self._line(deadline):
            name, _, value = line.decode("latin-1").partition(":")
            out.append((name, value.strip()))
        return out

    def read(
        self, method: str = "GET", timeout: float = 5.0, skip_interim: bool = True
    ) -> HttpResponse:
        """Read one response to a ``method`` request (HEAD responses have no body).

        1xx interim responses (other than 101) are skipped unless ``skip_interim`` is False.
        """
        deadline = time.monotonic() + timeout
        while True:
            status_line = self._line(deadline).decode("latin-1")
            version, _, rest = status_line.partition(" ")
            code, _, reason = rest.partition(" ")
            status = int(code)
            headers = self._fields(deadline)
            resp = HttpResponse(version, status, reason, headers)
            if 100 <= status < 200 and status != 101:
                if skip_interim:
                    continue
                return resp
            break
        if method == "HEAD" or status in (204, 304, 101):
            return resp
        te = ",".join(resp.header_values("transfer-encoding")).lower()
        if "chunked" in te:
            parts = []
            while True:
                size = int(self._line(deadline).split(b";")[0].strip(), 16)
                if size == 0:
                    resp.trailers = self._fields(deadline)
                    break
                parts.append(self._exactly(size, deadline))
                if self._line(deadline) != b"":
                    raise ValueError("chunk not followed by CRLF")
            resp.body = b"".join(parts)
        elif (cl := resp.header("content-length")) is not None:
            resp.body = self._exactly(int(cl), deadline)
        else:
            while self._fill(deadline):
                pass
            resp.body, resp.close_delimited = bytes(self.buf), True
            self.buf.clear()
        return resp


_READERS: weakref.WeakKeyDictionary[socket.socket, ResponseReader] = weakref.WeakKeyDictionary()


def read_http_response(
    sock: socket.socket, method: str = "GET", timeout: float = 5.0, skip_interim: bool = True
) -> HttpResponse:
    """Parse one response from ``sock`` (Content-Length, chunked or close-delimited).

    Bytes read past the response are kept for the next call on the same socket, so calling it
    N times after sending N pipelined requests returns the N responses in order.
    """
    reader = _READERS.get(sock)
    if reader is None:
        reader = _READERS[sock] = ResponseReader(sock)
    return reader.read(method, timeout, skip_interim)
