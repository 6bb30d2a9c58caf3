"""The comparison children of a running proxy: one per worker with `--workers 2`, each its
worker's own; a child killed with SIGKILL is replaced and comparing goes on; a drained proxy
leaves no child behind. The proxy runs as a subprocess against real backends whose answers
differ, so every comparison goes to a child."""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.backend import RecordingBackend, named
from support.configs import shadow_config
from support.metrics import scrape
from support.procfs import alive
from support.proxy import ProxyProcess
from support.wait import wait_until


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"shadowlane.compare.worker" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def test_each_worker_has_its_child_and_a_killed_one_is_replaced(
    backends: Callable[..., RecordingBackend],
    proxy_factory: Callable[..., ProxyProcess],
    tmp_path: Path,
) -> None:
    primary, shadow = backends(named("v1")), backends(named("v2"))
    cfg: dict[str, Any] = shadow_config({"p": primary.url, "s": shadow.url}, route="api")
    cfg["routes"][0]["shadows"][0]["compare"] = True
    cfg["compare"] = {"store": f"sqlite:///{tmp_path / 'c.db'}", "flush_interval": "200ms"}
    proxy = proxy_factory(cfg, workers=2)

    def send(n: int) -> None:
        for i in range(n):
            with urllib.request.urlopen(f"{proxy.url}/x/{i}", timeout=5) as resp:
                assert resp.read() == b"v1"

    def results() -> dict[str, float]:
        return scrape(proxy).by("result", "shadowlane_comparisons_total", route="api")

    workers = proxy.worker_pids()
    assert len(workers) == 2
    per_worker = {
        w: wait_until(lambda w=w: children_of(w), 10, f"worker {w}'s child") for w in workers
    }
    assert all(len(c) == 1 for c in per_worker.values()), per_worker
    send(20)
    wait_until(lambda: results().get("diff", 0) >= 20, 20, "20 differing comparisons")
    assert scrape(proxy).sum("shadowlane_compare_children") == 2

    victim_worker = workers[0]
    (victim,) = per_worker[victim_worker]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not alive(victim), 5, "the killed child to be gone")
    send(40)  # both workers get some (SO_REUSEPORT spreads new connections)
    wait_until(lambda: results().get("diff", 0) >= 60, 30, "comparing to go on")
    counts = results()
    # it died idle: the next job started a new child first, so nothing was lost
    assert counts.get("dropped", 0) == 0, counts
    replaced = children_of(victim_worker)
    assert len(replaced) == 1 and replaced[0] != victim
    wait_until(
        lambda: scrape(proxy).sum("shadowlane_compare_children") == 2, 5, "two children again"
    )

    everyone = [c for w in workers for c in children_of(w)]
    assert proxy.stop() == 0, proxy.stderr_text()
    wait_until(lambda: not any(alive(c) for c in everyone), 10, "the children to exit with it")
