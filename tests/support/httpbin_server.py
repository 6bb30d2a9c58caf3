"""httpbin (the real Flask app) served by gunicorn on a loopback port, as a subprocess.

Why httpbin: it is a widely used, independently written HTTP echo/behaviour service, so
comparing "client -> httpbin" with "client -> shadowlane -> httpbin" tests the proxy against
expectations nobody on this project wrote.

Why gunicorn (gthread worker) and not werkzeug's dev server: httpbin refuses chunked request
bodies (501) under any server but gunicorn, and gthread keeps connections alive, so chunked
uploads and upstream keep-alive are tested against a production-grade server.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from support.processes import end_process_group, ends_with_us

from .wait import wait_until


def _no_control_socket() -> list[str]:
    """gunicorn 27 opens a control socket at one fixed path per user (~/.gunicorn): two
    servers at once (two test runs) would take it from each other, and the first to stop
    deletes it. Older releases have no such socket, and no such flag."""
    import gunicorn.config

    known = {setting.name for setting in gunicorn.config.KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in known else []


_NO_CONTROL_SOCKET = _no_control_socket()


class HttpbinServer:
    """Context manager: ``python -m gunicorn httpbin:app`` on a loopback port of its own.

    The listening socket is bound (port 0) and listening here, before gunicorn starts, and
    handed to it as ``--bind fd://N``: a port picked first and bound later could be taken by
    anyone in between. Entering waits (bounded) until a worker answers ``GET /get`` with a 200
    (the socket accepting proves nothing: the kernel queues connections before any worker
    exists); exiting sends SIGTERM and, after ``stop_timeout``, SIGKILL to the process group
    this harness created.
    """

    def __init__(self, threads: int = 8, ready_timeout: float = 30.0) -> None:
        self.host = "127.0.0.1"
        self.port = 0  # known once __enter__ has bound the socket
        self._listener: socket.socket | None = None
        self.threads = threads
        self.ready_timeout = ready_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="httpbin-")
        self.log_path = Path(self._tmp.name) / "gunicorn.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _answers(self) -> bool:
        """One bounded ``GET /get``: only an answer proves a worker has imported httpbin."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_text()}")
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2.0)
        try:
            conn.request("GET", "/get")
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        except OSError:  # includes a timeout: the worker is still importing httpbin
            return False
        finally:
            conn.close()

    def __enter__(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((self.host, 0))
        listener.listen(128)
        listener.set_inheritable(True)
        self._listener = listener
        self.port = listener.getsockname()[1]
        fd = listener.fileno()
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"fd://{fd}",
            "--worker-class",
            "gthread",
            "--workers",
            "1",
            "--threads",
            str(self.threads),
            "--keep-alive",
            "30",
            "--graceful-timeout",
            "5",
            "--log-level",
            "warning",
            *_NO_CONTROL_SOCKET,
            "httpbin:app",
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            with self.log_path.open("wb") as log:
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=ends_with_us(),
                    pass_fds=(fd,),
                )
            try:
                wait_until(self._answers, self.ready_timeout, f"httpbin to answer on {self.url}")
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}\ngunicorn log:\n{self.log_text()}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, stop_timeout: float = 10.0) -> None:
        """SIGTERM the gunicorn master by PID, then SIGKILL its process group if needed."""
        proc = self.proc
        if proc is not None:
            end_process_group(proc, timeout=stop_timeout)  # also a worker orphaned by its master
            self.proc = None
        if self._listener is not None:
            self._listener.close()  # our copy, kept open only so the port stays ours
            self._listener = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._tmp.cleanup()
