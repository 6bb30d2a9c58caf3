"""A disk that stops taking writes: records are dropped and counted, the client never waits.

The slow disk is real: an ext4 file system on a loop device, frozen with `fsfreeze -f` (the
kernel then blocks every write to it until `fsfreeze -u`; it is what a volume snapshot or a
hung network disk does to a writer). The record writer's thread blocks in `write()`; the event
loop, which only appends to the recorder's deque, must go on answering at the speed it answers
requests that are not recorded at all, while the bytes waiting stay under `queue` and the rest
count `dropped`. After the thaw the writer catches up: every record is `written` or `dropped`.

Needs root, `losetup` and `fsfreeze` (skipped otherwise). The fixture thaws before anything
else is torn down: a process with a thread blocked on a frozen file system cannot exit.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shadowlane.record import iter_file, recording_files
from support.backend import RecordingBackend
from support.configs import backend_entry
from support.metrics import scrape
from support.proxy import ProxyProcess, read_http_response
from support.wait import wait_until

QUEUE = 64 * 1024
BODY = b"b" * 2048


class FreezableDisk:
    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.frozen = False

    def freeze(self) -> None:
        subprocess.run(["fsfreeze", "-f", str(self.mount)], check=True, timeout=30)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            subprocess.run(["fsfreeze", "-u", str(self.mount)], check=True, timeout=30)
            self.frozen = False


def _can_freeze() -> str:
    if os.geteuid() != 0:
        return "needs root (mount, fsfreeze)"
    for tool in ("losetup", "mkfs.ext4", "fsfreeze", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return ""


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[FreezableDisk]:
    why = _can_freeze()
    if why:
        pytest.skip(why)
    image = tmp_path / "disk.img"
    mount = tmp_path / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=60)
    done = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {done.stderr.strip()}")
    d = FreezableDisk(mount)
    try:
        yield d
    finally:
        d.thaw()
        # lazily: the proxy (torn down after this fixture) may still hold files open
        subprocess.run(["umount", "-l", str(mount)], timeout=60, check=False)


def timed_requests(port: int, target: str, n: int, body: bytes = b"") -> list[float]:
    """`n` requests on one keep-alive connection; each one's latency in seconds."""
    out = []
    method = "POST" if body else "GET"
    head = f"{method} {target} HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(n):
            t0 = time.perf_counter()
            sock.sendall(head.encode() + body)
            resp = read_http_response(sock, method=method, timeout=10)
            out.append(time.perf_counter() - t0)
            assert resp.status == 200
    return out


def counts(proxy: ProxyProcess) -> dict[str, float]:
    return scrape(proxy).by("outcome", "shadowlane_record_total", route="rec")


def test_frozen_disk_drops_and_counts_and_never_slows_the_client(
    backend: RecordingBackend, proxy_factory: Any, disk: FreezableDisk
) -> None:
    rec_dir = disk.mount / "rec"
    cfg = {
        "backends": {"b1": backend_entry(backend.url)},
        "routes": [
            {"name": "plain", "match": {"path_prefix": "/plain"}, "backend": "b1"},
            {"name": "rec", "match": {"path_prefix": "/"}, "backend": "b1",
             "record": {"dir": str(rec_dir), "queue": QUEUE, "gzip": False}},
        ],
    }  # fmt: skip
    proxy = proxy_factory(cfg)
    # the disk works: a first few records are written
    timed_requests(proxy.port, "/rec/warm", 20, BODY)
    wait_until(lambda: counts(proxy).get("written", 0) >= 20, 10, "20 records written")
    baseline = timed_requests(proxy.port, "/plain", 200, BODY)  # not recorded at all
    disk.freeze()
    try:
        frozen = timed_requests(proxy.port, "/rec/frozen", 200, BODY)
        during = counts(proxy)
        pending = scrape(proxy).sum("shadowlane_record_pending_bytes", route="rec")
    finally:
        disk.thaw()
    # the client did not wait for the disk: as fast as requests that are not recorded
    assert statistics.median(frozen) <= 3 * statistics.median(baseline) + 0.002, (
        statistics.median(frozen),
        statistics.median(baseline),
    )
    assert max(frozen) < 0.5, max(frozen)
    # bounded: what waits stays under `queue`; the rest was dropped and counted
    assert 0 < pending <= QUEUE
    per_record = len(BODY) + 512
    assert during["dropped"] >= 200 - QUEUE // per_record - 1, during
    assert during.get("written", 0) < 20 + QUEUE // per_record + 1
    # thawed: the writer catches up; every request is written or dropped, none in error
    final = wait_until(
        lambda: (c := counts(proxy)) and c.get("written", 0) + c.get("dropped", 0) >= 220 and c,
        15,
        "every record written or dropped after the thaw",
    )
    assert final["written"] + final["dropped"] == 220 and final["error"] == 0, final
    assert proxy.stop() == 0
    recorded = [p for f in recording_files([str(rec_dir)]) for p in iter_file(f)]
    assert len(recorded) == final["written"]
