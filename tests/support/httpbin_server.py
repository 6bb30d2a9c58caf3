"""httpbin (the real Flask app) served by gunicorn on a loopback port, as a subprocess.

Why httpbin: it is a widely used, independently written HTTP echo/behaviour service, so
comparing "client -> httpbin" with "client -> shadowlane -> httpbin" tests the proxy against
expectations nobody on this project wrote.

Why gunicorn (gthread worker) and not werkzeug's dev server: httpbin refuses chunked request
bodies (501) under any server but gunicorn, and gthread keeps connections alive, so chunked
uploads and upstream keep-alive are tested against a production-grade server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from support.processes import end_process_group

from .proxy import free_port
from .wait import wait_until


class HttpbinServer:
    """Context manager: ``python -m gunicorn httpbin:app`` on ``127.0.0.1:<free port>``.

    Entering waits (bounded) until the port accepts connections; exiting sends SIGTERM and,
    after ``stop_timeout``, SIGKILL to the process group this harness created.
    """

    def __init__(self, threads: int = 8, ready_timeout: float = 30.0) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
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

    def _accepts(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def __enter__(self) -> Self:
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"{self.host}:{self.port}",
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
            "httpbin:app",
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            wait_until(self._accepts, self.ready_timeout, f"httpbin on port {self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, stop_timeout: float = 10.0) -> None:
        """SIGTERM the gunicorn master by PID, then SIGKILL its process group if needed."""
        proc = self.proc
        if proc is None:
            return
        end_process_group(proc, timeout=stop_timeout)  # also a worker orphaned by its master
        self.proc = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._tmp.cleanup()
