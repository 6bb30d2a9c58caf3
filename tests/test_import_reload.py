"""Peers' documents reload: `--watch` on a directory laid out as a mounted ConfigMap (the
kubelet swaps a `..data` symlink), and SIGHUP on a multi-document file."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.backend import RecordingBackend
from support.peers import Client, PeerProxy, services_for
from support.wait import wait_until

MAPPING = """\
apiVersion: getambassador.io/v2
kind: Mapping
metadata:
  name: app
spec:
  prefix: /app/
  rewrite: /app/
  service: {service}
"""
SHADOW = """\
---
apiVersion: getambassador.io/v2
kind: Mapping
metadata:
  name: app-shadow
spec:
  prefix: /app/
  rewrite: /app/
  service: {service}
  shadow: true
"""


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as s:
        yield s


def _publish(root: Path, version: str, files: dict[str, str]) -> None:
    """What the kubelet does: write a new timestamped dir, then swap `..data` to it."""
    data = root / f"..{version}"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
        link = root / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    tmp = root / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, root / "..data")


def _served_by(client: Client, backend: RecordingBackend) -> bool:
    before = len(backend.requests)
    return client.request("/app/probe").status == 200 and len(backend.requests) > before


def test_watch_follows_a_configmap_swap(stack: contextlib.ExitStack) -> None:
    a, b, c = (stack.enter_context(RecordingBackend()) for _ in range(3))
    proxy = PeerProxy({}, services_for({"a": a, "b": b, "c": c}), extra_args=["--watch"])
    stack.callback(proxy.close)
    root = proxy.routes_dir
    listen = (root / "listen.yaml").read_text()
    (root / "listen.yaml").unlink()
    _publish(
        root, "2026_12_02_01", {"listen.yaml": listen, "app.yaml": MAPPING.format(service="a")}
    )
    proxy.start()
    client = Client(proxy.port)
    stack.callback(client.close)
    assert _served_by(client, a)
    # the swap changes no file the directory lists by name: only where `..data` points
    _publish(
        root,
        "2026_12_02_02",
        {
            "listen.yaml": listen,
            "app.yaml": MAPPING.format(service="b") + SHADOW.format(service="c"),
        },
    )
    wait_until(lambda: _served_by(client, b), 15.0, "the swapped ConfigMap to serve")
    wait_until(lambda: c.requests, 5.0, "a shadow copy from the new shadow Mapping")
    assert proxy.stderr_lines("reloaded")
    # a broken update is refused; the last good config keeps serving
    _publish(root, "2026_12_02_03", {"listen.yaml": listen, "app.yaml": "kind: [broken\n"})
    wait_until(lambda: proxy.stderr_lines("reload refused"), 15.0, "the broken update refused")
    assert _served_by(client, b)


def test_sighup_reloads_a_multi_document_file(stack: contextlib.ExitStack) -> None:
    a, b = (stack.enter_context(RecordingBackend()) for _ in range(2))
    proxy = PeerProxy({}, services_for({"a": a, "b": b}))
    stack.callback(proxy.close)
    listen = (proxy.routes_dir / "listen.yaml").read_text()
    (proxy.routes_dir / "listen.yaml").unlink()
    path = proxy.routes_dir / "all.yaml"
    path.write_text(listen + "---\n" + MAPPING.format(service="a"))
    proxy.start()
    client = Client(proxy.port)
    stack.callback(client.close)
    assert _served_by(client, a)
    path.write_text(listen + "---\n" + MAPPING.format(service="b"))
    proxy.send_signal(signal.SIGHUP)
    wait_until(lambda: _served_by(client, b), 10.0, "SIGHUP to load the rewritten file")


def test_workers_reload_peers_documents_on_sighup(stack: contextlib.ExitStack) -> None:
    """With --workers, each forked worker loads through the same source (and --services)."""
    a, b = (stack.enter_context(RecordingBackend()) for _ in range(2))
    proxy = PeerProxy(
        {"app.yaml": MAPPING.format(service="a")}, services_for({"a": a, "b": b}), workers=2
    )
    stack.callback(proxy.close)
    proxy.start()
    assert len(proxy.worker_pids()) == 2

    # fresh connections, so both workers' listeners are reached over the loop below
    def all_to(backend: RecordingBackend) -> bool:
        before = len(backend.requests)
        for _ in range(20):
            c = Client(proxy.port)
            try:
                if c.request("/app/x").status != 200:
                    return False
            finally:
                c.close()
        return len(backend.requests) - before == 20

    assert all_to(a)
    (proxy.routes_dir / "app.yaml").write_text(MAPPING.format(service="b"))
    proxy.send_signal(signal.SIGHUP)
    wait_until(lambda: all_to(b), 10.0, "every worker to load the rewritten Mapping")
