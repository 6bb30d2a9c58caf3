"""Upgrades through the proxy: a real WebSocket server and client (`websockets`) on both ends.

What is proved here, each against the real `shadowlane run` process: the handshake passes with
Connection/Upgrade kept and the `101` comes back; text, binary, fragmented and 10 MB messages,
ping/pong and close codes cross the tunnel both ways; many connections at once; a slow reader
back-pressures the sender instead of growing the proxy; idle tunnels close; drain closes them
within the grace period; a backend's non-101 answer reaches the client as it was; a route that
does not allow the upgrade serves it as plain HTTP; shadows never get the tunnel (counted
`skipped_upgrade`) and a `upgrades: handshake` shadow gets the handshake alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from support.backend import RecordingBackend
from support.configs import backend_entry, basic_config
from support.metrics import scrape
from support.proxy import ProxyProcess, raw_request
from support.wait import wait_until
from support.websocket import MAX_MESSAGE, StalledUpgradeServer, WebSocketServer

pytestmark = pytest.mark.timeout(120)

UPGRADES = "shadowlane_upgrades_total"
ACTIVE = "shadowlane_tunnels_active"
CLOSED = "shadowlane_tunnels_closed_total"
TUNNEL_BYTES = "shadowlane_tunnel_bytes_total"


@pytest.fixture
def ws_server() -> Iterator[WebSocketServer]:
    with WebSocketServer() as server:
        yield server


def _ws(proxy: ProxyProcess, path: str) -> str:
    return f"ws://{proxy.host}:{proxy.port}{path}"


def _connect(proxy: ProxyProcess, path: str, **kw: Any) -> Any:
    kw.setdefault("max_size", MAX_MESSAGE)
    kw.setdefault("ping_interval", None)
    kw.setdefault("open_timeout", 10)
    kw.setdefault("close_timeout", 10)
    return connect(_ws(proxy, path), **kw)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _upgrade_head(port: int, path: str = "/echo", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


# ----- frames, sizes, control frames, close codes --------------------------------------------


def test_text_binary_fragments_ping_and_close_codes(ws_server: WebSocketServer) -> None:
    with ProxyProcess(basic_config(ws_server.url, access_log=True)) as proxy:

        async def talk() -> tuple[int | None, str, list[Any]]:
            got: list[Any] = []
            async with _connect(proxy, "/greet") as ws:
                got.append(await ws.recv())  # sent by the server right after its 101
                await ws.send("text ✓")
                got.append(await ws.recv())
                await ws.send(b"\x00\xffbinary")
                got.append(await ws.recv())
                await ws.send(["frag", "ment", "ed"])  # one message in three frames
                got.append(await ws.recv())
                latency = await asyncio.wait_for(await ws.ping(b"are you there"), 10)
                assert latency >= 0
                await ws.close(4002, "client says bye")
            async with _connect(proxy, "/close/4001") as ws2:
                with pytest.raises(ConnectionClosed):
                    await ws2.recv()
                return ws2.close_code, ws2.close_reason, got

        code, reason, got = asyncio.run(talk())
        assert got == ["hello", "text ✓", b"\x00\xffbinary", "fragmented"]
        # the server's close code reached the client, and the client's the server
        assert (code, reason) == (4001, "bye")
        wait_until(lambda: len(ws_server.closes) == 2, 10, "both connections end at the server")
        assert 4002 in ws_server.closes
        # the handshake went through with the switch asked of the backend
        path, headers = ws_server.handshakes[0]
        assert path == "/greet"
        assert headers["Upgrade"].lower() == "websocket"
        assert "upgrade" in headers["Connection"].lower()
        assert headers["X-Forwarded-For"] == "127.0.0.1"
        assert headers["X-Request-Id"]
        m = wait_until(
            lambda: (s := scrape(proxy)).sum(CLOSED, route="r1") == 2 and s,
            10,
            "two tunnels counted closed",
        )
        assert m.sum(UPGRADES, route="r1", outcome="tunnelled") == 2
        assert m.sum("shadowlane_requests_total", route="r1", code="101") == 2
        assert m.sum(ACTIVE, route="r1") == 0
        assert m.sum(TUNNEL_BYTES, route="r1", direction="downstream") > 0
        lines = wait_until(
            lambda: [x for x in proxy.access_log() if x.get("status") == 101] or None,
            10,
            "access log lines for the tunnels",
        )
        first = next(x for x in lines if x["path"] == "/greet")
        assert first["upgrade"]["bytes_up"] > len("text ✓") + len("binary")
        assert first["upgrade"]["bytes_down"] > len("hello")
        assert first["upgrade"]["closed_by"] in ("client", "backend")
        assert first["request_id"] == headers["X-Request-Id"]


def test_ten_megabytes_each_way(ws_server: WebSocketServer) -> None:
    size = 10 * 1024 * 1024
    payload = os.urandom(size)
    with ProxyProcess(basic_config(ws_server.url)) as proxy:

        async def run() -> tuple[bytes, str]:
            # no permessage-deflate: 10 MB on the wire each way, not what it compresses to
            async with _connect(proxy, "/echo", compression=None) as ws:
                await ws.send(payload)  # 10 MB up, echoed: 10 MB down
                back = await asyncio.wait_for(ws.recv(), 60)
                await ws.send("x" * size)
                text = await asyncio.wait_for(ws.recv(), 60)
                return back, text

        back, text = asyncio.run(run())
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
        assert len(text) == size
        m = wait_until(
            lambda: (s := scrape(proxy)).sum(CLOSED, route="r1") == 1 and s, 10, "tunnel closed"
        )
        assert m.sum(TUNNEL_BYTES, route="r1", direction="upstream") > 2 * size
        assert m.sum(TUNNEL_BYTES, route="r1", direction="downstream") > 2 * size


def test_sixty_concurrent_connections(ws_server: WebSocketServer) -> None:
    n = 60
    with ProxyProcess(basic_config(ws_server.url)) as proxy:

        async def one(i: int, opened: asyncio.Event, count: list[int], go: asyncio.Event) -> int:
            async with _connect(proxy, f"/echo?c={i}") as ws:
                count[0] += 1
                if count[0] == n:
                    opened.set()
                await go.wait()
                for j in range(5):
                    await ws.send(f"{i}:{j}")
                    assert await ws.recv() == f"{i}:{j}"
                return i

        async def run() -> list[int]:
            opened, go = asyncio.Event(), asyncio.Event()
            count = [0]
            tasks = [asyncio.create_task(one(i, opened, count, go)) for i in range(n)]
            await asyncio.wait_for(opened.wait(), 60)
            # all open at once: the gauge says so
            active = await asyncio.to_thread(lambda: scrape(proxy).sum(ACTIVE, route="r1"))
            assert active == n
            go.set()
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)

        assert sorted(asyncio.run(run())) == list(range(n))
        m = wait_until(
            lambda: (s := scrape(proxy)).sum(CLOSED, route="r1") == n and s, 15, "all closed"
        )
        assert m.sum(ACTIVE, route="r1") == 0
        assert m.sum(UPGRADES, route="r1", outcome="tunnelled") == n


# ----- back-pressure, idle timeout, drain ----------------------------------------------------


def test_slow_reader_back_pressures_the_sender(ws_server: WebSocketServer) -> None:
    """The server floods 96 MiB at a client that reads nothing: the proxy stops reading the
    server once the client's side is full, so the server's sends stall far short of 96 MiB and
    the proxy's memory stays flat; then the client reads every byte."""
    total = 96 * 1024 * 1024
    with ProxyProcess(basic_config(ws_server.url)) as proxy:

        async def warm() -> None:  # the tunnel's code paths run once before the baseline
            async with _connect(proxy, "/echo") as ws:
                await ws.send(b"w" * 1024 * 1024)
                await ws.recv()

        asyncio.run(warm())
        baseline = _rss_kib(proxy.pid)

        def stalled() -> bool:
            sent = ws_server.flood_sent
            time.sleep(0.5)
            return 0 < sent == ws_server.flood_sent

        async def run() -> tuple[int, int, int]:
            # max_queue=1: the client library itself stops reading after one message
            async with _connect(proxy, f"/flood/{total}", max_queue=1, compression=None) as ws:
                await asyncio.to_thread(wait_until, stalled, 30, "the flood to stall")
                peak = _rss_kib(proxy.pid)
                at_stall = ws_server.flood_sent
                received = 0
                while True:
                    msg = await asyncio.wait_for(ws.recv(), 60)
                    if msg == "done":
                        break
                    received += len(msg)
                return peak, at_stall, received

        peak, at_stall, received = asyncio.run(run())
        assert received == total
        # what sits in kernel buffers and the client's queue is a few MiB, not the flood
        assert at_stall < total // 2, f"the server was not held back: {at_stall} bytes sent"
        growth_mib = (peak - baseline) / 1024
        assert growth_mib < 24, f"proxy grew {growth_mib:.1f} MiB for a stalled 96 MiB flood"


def test_a_slow_backend_back_pressures_the_client() -> None:
    """The other direction: the client sends 96 MiB to a backend that reads nothing; the
    client's sends stall (the proxy stops reading it) and the proxy does not grow; once the
    backend reads, every byte arrives."""
    total, block = 96 * 1024 * 1024, os.urandom(1024 * 1024)
    with StalledUpgradeServer() as slow, ProxyProcess(basic_config(slow.url)) as proxy:
        baseline = _rss_kib(proxy.pid)
        sent = [0]

        async def run() -> int:
            async with _connect(proxy, "/up", compression=None) as ws:

                async def pump() -> None:
                    while sent[0] < total:
                        await ws.send(block)
                        sent[0] += len(block)

                task = asyncio.create_task(pump())

                def stalled() -> bool:
                    before = sent[0]
                    time.sleep(0.5)
                    return 0 < before == sent[0]

                await asyncio.to_thread(wait_until, stalled, 30, "the client's sends to stall")
                peak, at_stall = _rss_kib(proxy.pid), sent[0]
                slow.release()
                await asyncio.wait_for(task, 60)
                assert at_stall < total // 2, f"the client was not held back: {at_stall} sent"
                return peak
            return 0

        peak = asyncio.run(run())
        assert slow.finished.wait(30)
        assert slow.received > total  # every payload byte, plus frame headers
        growth_mib = (peak - baseline) / 1024
        assert growth_mib < 24, f"proxy grew {growth_mib:.1f} MiB for a stalled 96 MiB upload"


def test_idle_tunnel_is_closed(ws_server: WebSocketServer) -> None:
    cfg = basic_config(ws_server.url)
    cfg["routes"][0]["tunnel_idle_timeout"] = "1s"
    with ProxyProcess(cfg) as proxy:

        async def run() -> None:
            async with _connect(proxy, "/silent") as ws:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 30)

        asyncio.run(run())
        m = wait_until(
            lambda: (s := scrape(proxy)).sum(CLOSED, route="r1", reason="idle") == 1 and s,
            10,
            "the tunnel counted closed for idleness",
        )
        assert m.sum(CLOSED, route="r1") == 1


def test_drain_closes_tunnels_after_the_grace_period(ws_server: WebSocketServer) -> None:
    cfg = basic_config(ws_server.url, limits={"tunnel_drain_timeout": "2s"})
    with ProxyProcess(cfg) as proxy:

        async def run() -> tuple[str, float]:
            async with _connect(proxy, "/echo") as ws:
                await ws.send("before")
                assert await ws.recv() == "before"
                t0 = time.monotonic()
                proxy.send_signal(signal.SIGTERM)
                # within the grace period the tunnel still carries messages
                await ws.send("during the grace")
                echoed = await asyncio.wait_for(ws.recv(), 10)
                with pytest.raises(ConnectionClosed):
                    while True:
                        await asyncio.wait_for(ws.recv(), 30)
                return echoed, time.monotonic() - t0

        echoed, closed_after = asyncio.run(run())
        assert echoed == "during the grace"
        assert closed_after >= 1.5, "closed before the grace period ended"
        assert proxy.wait(15) == 0  # and the drain did not wait for the tunnel beyond it


# ----- answers that are not a 101, routes that do not allow it --------------------------------


def test_a_non_101_answer_passes_through(ws_server: WebSocketServer) -> None:
    with ProxyProcess(basic_config(ws_server.url)) as proxy:

        async def run() -> InvalidStatus:
            with pytest.raises(InvalidStatus) as info:
                async with _connect(proxy, "/deny"):
                    pass
            return info.value

        err = asyncio.run(run())
        assert err.response.status_code == 403
        assert err.response.body == b"denied by the backend\n"
        raw = raw_request(proxy.port, _upgrade_head(proxy.port, "/deny"), timeout=10)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 ")
        assert b"connection: close" in head.lower()
        assert body == b"denied by the backend\n"
        m = scrape(proxy)
        assert m.sum(UPGRADES, route="r1", outcome="declined") == 2
        assert m.sum("shadowlane_requests_total", route="r1", code="403") == 2
        assert m.sum(UPGRADES, route="r1", outcome="tunnelled") == 0


def test_upgrade_on_a_route_that_does_not_allow_it_is_served_as_plain_http(
    backend: RecordingBackend,
) -> None:
    cfg = basic_config(backend.url)
    cfg["routes"][0]["upgrades"] = []
    with ProxyProcess(cfg) as proxy:
        raw = raw_request(proxy.port, _upgrade_head(proxy.port, "/plain"), timeout=10)
        head = raw.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"connection: close" in head.lower()  # the bytes after it are not HTTP/1.1
        got = backend.requests[-1]
        assert got.path == "/plain"
        assert got.header("upgrade") is None  # hop-by-hop: stripped, as for any request
        assert scrape(proxy).sum(UPGRADES, route="r1", outcome="not_allowed") == 1


def test_an_upgrade_request_with_a_body_is_refused(backend: RecordingBackend) -> None:
    with ProxyProcess(basic_config(backend.url)) as proxy:
        head = _upgrade_head(proxy.port, "/b", "Content-Length: 5\r\n")
        raw = raw_request(proxy.port, head + b"hello", timeout=10)
        assert raw.startswith(b"HTTP/1.1 400 "), raw
        assert backend.requests == []


def test_upgrade_to_a_dead_backend_is_a_502() -> None:
    from support.backend import dead_port

    with ProxyProcess(basic_config(f"http://127.0.0.1:{dead_port()}")) as proxy:
        raw = raw_request(proxy.port, _upgrade_head(proxy.port), timeout=10)
        assert raw.startswith(b"HTTP/1.1 502 "), raw
        assert scrape(proxy).sum(UPGRADES, route="r1", outcome="failed") == 1


# ----- shadows ------------------------------------------------------------------------------


def _shadowed(primary: str, shadow: dict[str, Any], shadow_url: str) -> dict[str, Any]:
    return {
        "backends": {"p": backend_entry(primary), "s": backend_entry(shadow_url)},
        "routes": [
            {
                "name": "r1",
                "match": {"path_prefix": "/"},
                "backend": "p",
                "shadows": [{"backend": "s", "percent": 100, **shadow}],
            }
        ],
    }


async def _echo_n(ws: ClientConnection, n: int) -> None:
    for i in range(n):
        await ws.send(f"m{i}")
        assert await ws.recv() == f"m{i}"


def test_a_shadowed_route_keeps_working_and_counts_skipped(
    ws_server: WebSocketServer, backend: RecordingBackend
) -> None:
    with ProxyProcess(_shadowed(ws_server.url, {}, backend.url)) as proxy:

        async def run() -> None:
            for _ in range(3):
                async with _connect(proxy, "/echo") as ws:
                    await _echo_n(ws, 3)

        asyncio.run(run())
        got = scrape(proxy).outcomes("r1", "s")
        assert got["skipped_upgrade"] == 3
        assert got["sent"] == 0
        assert backend.requests == []  # the shadow saw nothing of the tunnels
        # ordinary requests on the same route are still shadowed (the WebSocket server
        # answers a plain GET with a 4xx, which is beside the point)
        raw = raw_request(
            proxy.port, b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=10
        )
        assert raw.startswith(b"HTTP/1.1 4"), raw[:100]
        wait_until(lambda: backend.requests, 10, "the plain request's shadow copy")
        assert backend.requests[0].path == "/plain"


def test_a_handshake_shadow_gets_the_handshake_alone(ws_server: WebSocketServer) -> None:
    with WebSocketServer() as shadow:
        cfg = _shadowed(ws_server.url, {"upgrades": "handshake"}, shadow.url)
        with ProxyProcess(cfg) as proxy:

            async def run() -> None:
                async with _connect(proxy, "/echo?x=1") as ws:
                    await _echo_n(ws, 3)

            asyncio.run(run())
            wait_until(lambda: shadow.handshakes, 10, "the shadow's handshake")
            path, headers = shadow.handshakes[0]
            assert path == "/echo?x=1"
            assert headers["Upgrade"].lower() == "websocket"
            assert headers["X-Shadowlane-Shadow"] == "r1"
            assert headers["Host"] == f"127.0.0.1-shadow:{proxy.port}"
            primary_id = ws_server.handshakes[0][1]["X-Request-Id"]
            assert headers["X-Request-Id"] == primary_id
            got = wait_until(
                lambda: (o := scrape(proxy).outcomes("r1", "s")).get("ok") == 1 and o,
                10,
                "the handshake copy counted ok",
            )
            assert got["sent"] == 1 and got["skipped_upgrade"] == 0
            # its 101 was closed: the shadow's connection ends without any message
            wait_until(lambda: shadow.open == 0 and shadow.closes, 10, "the shadow closed")


# ----- reload ---------------------------------------------------------------------------------


def test_reload_keeps_tunnels_whose_route_stays_and_closes_the_others(
    ws_server: WebSocketServer,
) -> None:
    cfg = basic_config(ws_server.url, limits={"tunnel_drain_timeout": "1s"})
    cfg["routes"] = [
        {"name": "keep", "match": {"path_prefix": "/echo"}, "backend": "b1"},
        {"name": "gone", "match": {"path_prefix": "/"}, "backend": "b1"},
    ]
    with ProxyProcess(cfg) as proxy:

        async def run() -> tuple[str, bool]:
            async with _connect(proxy, "/echo") as kept, _connect(proxy, "/greet") as doomed:
                assert await doomed.recv() == "hello"
                new = dict(cfg)
                new["routes"] = [cfg["routes"][0]]
                proxy.write_config(new)
                proxy.reload()
                await asyncio.to_thread(
                    wait_until, lambda: proxy.stderr_lines("reloaded"), 10, "the reload"
                )
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(doomed.recv(), 30)
                await kept.send("still here")
                return await asyncio.wait_for(kept.recv(), 10), True

        echoed, _ = asyncio.run(run())
        assert echoed == "still here"
        m = wait_until(
            lambda: (s := scrape(proxy)).sum(CLOSED, route="gone", reason="reload") == 1 and s,
            10,
            "the dropped route's tunnel counted closed by the reload",
        )
        assert m.sum(CLOSED, route="keep") == 1  # the kept one closed by the client at the end


# ----- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["h2c"], "h2c is HTTP/2"),
        (["web socket"], "not a protocol name"),
        (["websocket", "WebSocket"], "listed twice"),
    ],
)
def test_bad_upgrades_name_the_key(value: list[str], message: str) -> None:
    from shadowlane.config import ConfigError, parse_config

    cfg = basic_config("http://127.0.0.1:1")
    cfg["routes"][0]["upgrades"] = value
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(cfg))
    assert any("routes[0].upgrades" in e and message in e for e in info.value.errors), info.value


# ----- TLS listener ----------------------------------------------------------------------------


def test_wss_through_a_tls_listener(ws_server: WebSocketServer, tmp_path: Path) -> None:
    """The tunnel takes over a TLS client connection as well: wss:// to the proxy, ws:// on."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    args = "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1"
    args += " -addext subjectAltName=IP:127.0.0.1"
    out = subprocess.run(
        ["openssl", *args.split(), "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    ctx = ssl.create_default_context(cafile=str(cert))
    cfg = basic_config(ws_server.url, tls={"cert": str(cert), "key": str(key)})
    with ProxyProcess(cfg) as proxy:

        async def run() -> list[Any]:
            url = f"wss://127.0.0.1:{proxy.port}/greet"
            async with connect(url, ssl=ctx, max_size=MAX_MESSAGE, open_timeout=10) as ws:
                got = [await ws.recv()]
                await ws.send(os.urandom(256 * 1024))
                got.append(len(await ws.recv()))
                await ws.close(4003, "tls bye")
                return got

        assert asyncio.run(run()) == ["hello", 256 * 1024]
        wait_until(lambda: 4003 in ws_server.closes, 10, "the close code at the server")
        m = wait_until(
            lambda: (s := scrape(proxy)).sum(CLOSED, route="r1") == 1 and s, 10, "tunnel closed"
        )
        assert m.sum(UPGRADES, route="r1", outcome="tunnelled") == 1


def test_an_upgrade_pipelined_after_a_plain_request_is_tunnelled(
    ws_server: WebSocketServer,
) -> None:
    """A request pipelined before the upgrade is answered first (keep-alive), then the 101 and
    the tunnel on the same connection."""
    with ProxyProcess(basic_config(ws_server.url)) as proxy:
        plain = f"GET /first HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(plain + _upgrade_head(proxy.port, "/greet"))
            buf = b""
            deadline = time.monotonic() + 10
            while b"HTTP/1.1 101 " not in buf or not buf.endswith(b"hello"):
                assert time.monotonic() < deadline, buf
                chunk = sock.recv(65536)
                assert chunk, buf
                buf += chunk
        first, _, rest = buf.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 4")  # the WebSocket server refuses a plain GET
        assert b"connection: close" not in first.lower()
        assert b"HTTP/1.1 101 " in rest
        assert b"sec-websocket-accept: " in rest.lower()
        # the server's first frame: FIN + text, unmasked, length 5, "hello"
        assert rest.endswith(b"\x81\x05hello")


def test_offered_protocols_are_names_without_versions() -> None:
    from shadowlane.wire.tunnel import offered_protocols

    assert offered_protocols(b"websocket") == ["websocket"]
    assert offered_protocols(b"WebSocket, foo/2 , ,bar") == ["websocket", "foo", "bar"]
    assert offered_protocols(b" , ") == []


def test_an_offer_naming_a_protocol_the_route_does_not_list_is_served_plain(
    backend: RecordingBackend,
) -> None:
    with ProxyProcess(basic_config(backend.url)) as proxy:
        head = _upgrade_head(proxy.port, "/mixed").replace(
            b"Upgrade: websocket", b"Upgrade: websocket, irc/6.9"
        )
        raw = raw_request(proxy.port, head, timeout=10)
        assert raw.startswith(b"HTTP/1.1 200 "), raw[:100]
        assert backend.requests[-1].header("upgrade") is None
        assert scrape(proxy).sum(UPGRADES, route="r1", outcome="not_allowed") == 1


def test_tunnels_with_workers(ws_server: WebSocketServer) -> None:
    """With --workers 2, the tunnels spread over the workers and the gauge sums them."""
    n = 12
    with ProxyProcess(basic_config(ws_server.url), workers=2) as proxy:

        async def run() -> float:
            async with contextlib.AsyncExitStack() as stack:
                conns = [
                    await stack.enter_async_context(_connect(proxy, f"/echo?w={i}"))
                    for i in range(n)
                ]
                for i, ws in enumerate(conns):
                    await ws.send(f"w{i}")
                    assert await ws.recv() == f"w{i}"

                def all_open() -> float:
                    return scrape(proxy).sum(ACTIVE) == n and n

                return await asyncio.to_thread(wait_until, all_open, 15, "the summed gauge")

        assert asyncio.run(run()) == n
        wait_until(lambda: scrape(proxy).sum(CLOSED) == n, 15, "every tunnel counted closed")
