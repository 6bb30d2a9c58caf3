"""`listen` and `admin.listen` on port 0, and `run --ready-file`: how anything that starts the
proxy (a test, the bench, a supervisor script) learns the ports without picking one first.

The file must appear only once every listener accepts, with every worker: each test polls for
it as fast as it can and, the moment it exists, connects to both addresses it names.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from support.backend import RecordingBackend
from support.processes import end_process_group, ends_with_us
from support.procfs import tcp_sockets

T = 20.0


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _start(tmp_path: Path, config: dict[str, Any], *args: str) -> subprocess.Popen[bytes]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen(
        [sys.executable, "-m", "shadowlane", "run", "-c", str(path), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr.log").open("wb"),
        start_new_session=True,
        preexec_fn=ends_with_us(),
    )


def _config(backend: RecordingBackend, admin: str = "127.0.0.1:0") -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": admin},
        "backends": {"b1": {"endpoints": [backend.url]}},
        "routes": [{"name": "r1", "match": {"path_prefix": "/"}, "backend": "b1"}],
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_file_appears_only_once_both_port_zero_listeners_accept(
    tmp_path: Path, backend: RecordingBackend, workers: int
) -> None:
    ready = tmp_path / "ready.json"
    proc = _start(tmp_path, _config(backend), "--ready-file", str(ready), "--workers", str(workers))
    try:
        polls_before = 0
        deadline = time.monotonic() + T
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
            assert time.monotonic() < deadline, "no ready file"
            polls_before += 1
            time.sleep(0.001)
        # the very moment it exists: both listeners accept, with every worker listening
        info = json.loads(ready.read_bytes())
        listen, admin = _split(info["listen"]), _split(info["admin"])
        socket.create_connection(listen, timeout=1).close()
        socket.create_connection(admin, timeout=1).close()
        # union of three reads: /proc/net/tcp is read a page at a time and can skip a row
        listeners = tcp_sockets(listen[1], listening=True, reads=3)
        assert len(listeners) == workers
        assert polls_before > 0  # the file was observed absent first: the check ran

        assert info["pid"] == proc.pid
        assert listen[0] == admin[0] == "127.0.0.1"
        assert 0 not in (listen[1], admin[1]) and listen[1] != admin[1]
        stderr = (tmp_path / "stderr.log").read_text()
        assert f"listening on http://{info['listen']} " in stderr, stderr
        assert f"admin on http://{info['admin']} " in stderr, stderr
        assert requests.get(f"http://{info['admin']}/healthz", timeout=T).status_code == 200
        r = requests.get(f"http://{info['listen']}/ready/{workers}", timeout=T)
        assert r.status_code == 200
        assert backend.wait_for_requests(1)[0].path == f"/ready/{workers}"

        # a ready file left behind would say a stopped proxy serves
        assert end_process_group(proc, signal.SIGTERM, T) == 0
        assert not ready.exists()
    finally:
        end_process_group(proc, signal.SIGKILL, 5)


@pytest.mark.parametrize("workers", [1, 2])
def test_no_ready_file_when_the_admin_port_is_taken(
    tmp_path: Path, backend: RecordingBackend, workers: int
) -> None:
    """With workers, the one that owns the admin listener fails: the whole start fails, loudly,
    instead of serving without the admin API."""
    ready = tmp_path / "ready.json"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        admin = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = _start(
            tmp_path,
            _config(backend, admin=admin),
            "--ready-file",
            str(ready),
            "--workers",
            str(workers),
        )
        try:
            code = proc.wait(T)
        finally:
            end_process_group(proc, signal.SIGKILL, 5)
    stderr = (tmp_path / "stderr.log").read_text()
    assert code == 1, stderr
    assert not ready.exists()
    assert f"admin.listen {admin}: address already in use" in stderr, stderr
    assert "Traceback" not in stderr, stderr
