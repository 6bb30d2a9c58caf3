"""Every peer example of research/seed-configs.md runs unchanged and shadows as its peer would.

The documents under tests/peers/seed/ are the seed file's blocks byte for byte (the first test
checks that, when the shared research folder is beside the repository). Each runs through the
real proxy with `run -c DIR --services FILE`, against real loopback backends standing in for
the peers' services.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.backend import RecordingBackend
from support.metrics import settle
from support.peers import Client, PeerProxy, services_for, sigma_bound

SEEDS = Path(__file__).parent / "peers" / "seed"
SEED_DOC = Path(__file__).resolve().parents[2] / "shared" / "research" / "seed-configs.md"
MARKER = "x-shadowlane-shadow"


@pytest.fixture
def peer_proxies() -> Iterator[list[PeerProxy]]:
    made: list[PeerProxy] = []
    yield made
    for proxy in made:
        proxy.close()


def start(made: list[PeerProxy], files: list[str], services: dict[str, list[str]]) -> PeerProxy:
    proxy = PeerProxy({f: (SEEDS / f).read_text() for f in files}, services)
    made.append(proxy)
    return proxy.start()


def test_fixtures_are_the_seed_documents_unchanged() -> None:
    if not SEED_DOC.exists():
        pytest.skip(f"{SEED_DOC} is not beside the repository")
    blocks = [b for _, b in re.findall(r"```(yaml)?\n(.*?)```", SEED_DOC.read_text(), re.S)]
    ours = [
        (SEEDS / n).read_text()
        for n in (
            "emissary-myservice.yaml",
            "gloo-petstore.yaml",
            "skipper-intake.eskip",
            "skipper-intake-routegroup.yaml",
        )
    ]
    assert ours == blocks


def test_emissary_myservice_shadow_weight_10(peer_proxies: list[PeerProxy]) -> None:
    with RecordingBackend() as primary, RecordingBackend() as shadow:
        services = services_for({"myservice.default": primary, "myservice-shadow.default": shadow})
        proxy = start(peer_proxies, ["emissary-myservice.yaml"], services)
        n = 400
        client = Client(proxy.port)
        for i in range(n):
            assert client.request(f"/myservice/item/{i}").status == 200
        client.close()
        got = settle(proxy, "myservice", "myservice-shadow.default", n)
        assert len(primary.requests) == n
        copies = shadow.requests
        # Emissary's weight: 10 on a shadow Mapping is the share of requests copied
        assert abs(len(copies) - n * 0.1) <= sigma_bound(n, 0.1)
        assert len(copies) == got.get("ok", 0) > 0
        assert all(c.header("host") == "shadowlane.test-shadow" for c in copies)
        assert all(c.path.startswith("/myservice/item/") for c in copies)
        assert "spec.rewrite" in proxy.stderr_text()  # the default rewrite is warned about


def test_gloo_petstore_shadowed_at_100(peer_proxies: list[PeerProxy]) -> None:
    with RecordingBackend() as primary, RecordingBackend() as shadow:
        services = services_for(
            {"petstore.gloo-system": primary, "petstore-v2.gloo-system": shadow}
        )
        proxy = start(peer_proxies, ["gloo-petstore.yaml"], services)
        client = Client(proxy.port)
        n = 40
        for i in range(n):
            assert client.request(f"/petstore/pets/{i}").status == 200
        assert client.request("/other").status == 404
        client.close()
        settle(proxy, "default.gloo-system.r0", "petstore-v2.gloo-system-shadow", n)
        assert len(primary.requests) == n
        assert sorted(c.target for c in shadow.requests) == sorted(
            f"/petstore/pets/{i}" for i in range(n)
        )
        assert {c.header("host") for c in shadow.requests} == {"shadowlane.test-shadow"}


@pytest.mark.parametrize(
    ("files", "route", "target", "host"),
    [
        (["skipper-intake.eskip"], "intake", "es8-9200", "shadowlane.test"),
        (
            ["skipper-intake-routegroup.yaml"],
            "es-intake.default.r0",
            "es8.default-9200",
            "es.example.org",
        ),
    ],
    ids=["eskip", "routegroup"],
)
def test_skipper_intake_tee_loopback(
    peer_proxies: list[PeerProxy], files: list[str], route: str, target: str, host: str
) -> None:
    with RecordingBackend() as es7, RecordingBackend() as es8:
        proxy = start(peer_proxies, files, services_for({"es7": es7, "es8": es8}))
        client = Client(proxy.port)
        writes = ["/_bulk", "/_alias/logs_write", "/_alias/metrics-2026_write"]
        for path in writes * 5:
            assert client.request(path, method="POST", host=host).status == 200
        # not intake: a GET, or another path; Skipper would 404 without a route for them
        assert client.request("/_bulk", method="GET", host=host).status == 404
        assert client.request("/_alias/a/b_write", method="POST", host=host).status == 404
        client.close()
        n = len(writes) * 5
        settle(proxy, route, target, n)
        assert [r.target for r in es7.requests] == writes * 5
        copies = es8.requests
        assert sorted(c.target for c in copies) == sorted(writes * 5)
        # as Skipper's loopback clone: its group in x-tee-loopback-key, no -shadow on the Host
        assert {c.header("x-tee-loopback-key") for c in copies} == {"intake_shadow"}
        assert {c.header("host") for c in copies} == {host}
        assert {c.header(MARKER) for c in copies} == {route}
        assert {c.body for c in copies} == {b"{}"}
