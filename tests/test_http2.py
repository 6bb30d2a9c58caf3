"""HTTP/2 end to end: from clients (`listen_http2`: h2c with prior knowledge, h2 by ALPN on
TLS) and to backends (`protocol: h2c | h2`), with third-party clients (curl, h2load) and a
Python `h2` client (support/h2.py), against the real `shadowlane run` process.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from h2.events import ConnectionTerminated, PingAckReceived
from hpack import NeverIndexedHeaderTuple
from websockets.asyncio.client import connect

from support.backend import RecordingBackend, dead_port
from support.h2 import H2Backend, H2Client, H2Reply, H2Request
from support.metrics import scrape
from support.proxy import ProxyProcess, basic_config, raw_request
from support.wait import wait_until
from support.websocket import WebSocketServer

LIMITED = "shadowlane_downstream_limited_total"


def _h2_config(*endpoints: str, **extra: Any) -> dict[str, Any]:
    return basic_config(*endpoints, listen_http2=True, access_log=True, **extra)


def _curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "15", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl)."""
    d = Path(tmp_path_factory.mktemp("h2tls"))
    out = subprocess.run(
        ["openssl", "req", "-x509", "-new", "-nodes", "-newkey", "ec",
         "-pkeyopt", "ec_paramgen_curve:prime256v1", "-keyout", "server.key",
         "-out", "server.crt", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=d, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return str(d / "server.crt"), str(d / "server.key")


# -- from clients -------------------------------------------------------------------------------


def test_curl_prior_knowledge_and_http11_on_one_listener(backend: RecordingBackend) -> None:
    with ProxyProcess(_h2_config(backend.url)) as proxy:
        got = _curl("--http2-prior-knowledge", "-i", proxy.url + "/a?x=1")
        assert got.returncode == 0, got.stderr
        assert got.stdout.startswith("HTTP/2 200"), got.stdout[:200]
        body = json.loads(got.stdout.split("\n\n", 1)[1])
        assert body["target"] == "/a?x=1"
        assert body["http_version"] == "1.1"  # the backend speaks HTTP/1.1
        headers = dict(body["headers"])
        assert headers["host"] == f"127.0.0.1:{proxy.port}"  # :authority became Host
        assert headers["x-forwarded-proto"] == "http"

        posted = _curl("--http2-prior-knowledge", "-d", "hello h2", proxy.url + "/post")
        assert json.loads(posted.stdout)["body"] == "hello h2"

        plain = _curl("-i", proxy.url + "/plain")  # HTTP/1.1 on the same port
        assert plain.stdout.startswith("HTTP/1.1 200"), plain.stdout[:200]
        assert len(backend.requests) == 3
        log = wait_until(lambda: len(proxy.access_log()) >= 3 and proxy.access_log(), 5, "log")
        assert [r["protocol"] for r in log] == ["HTTP/2", "HTTP/2", "HTTP/1.1"]


def test_curl_http2_over_tls_by_alpn(backend: RecordingBackend, cert: tuple[str, str]) -> None:
    crt, key = cert
    cfg = _h2_config(backend.url, tls={"cert": crt, "key": key})
    with ProxyProcess(cfg) as proxy:
        url = f"https://127.0.0.1:{proxy.port}/tls"
        got = _curl("--http2", "--cacert", crt, "-i", url)
        assert got.returncode == 0, got.stderr
        assert got.stdout.startswith("HTTP/2 200"), got.stdout[:200]
        assert (
            dict(json.loads(got.stdout.split("\n\n", 1)[1])["headers"])["x-forwarded-proto"]
            == "https"
        )
        old = _curl("--http1.1", "--cacert", crt, "-i", url)  # ALPN falls back to http/1.1
        assert old.stdout.startswith("HTTP/1.1 200"), old.stdout[:200]
        assert len(backend.requests) == 2


def test_listener_without_http2_is_unchanged(backend: RecordingBackend) -> None:
    """`listen_http2` off (the default): a prior-knowledge client is refused as before."""
    with ProxyProcess(basic_config(backend.url)) as proxy:
        got = _curl("--http2-prior-knowledge", proxy.url + "/")
        assert got.returncode != 0
        assert backend.requests == []


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
def test_h2load(backend: RecordingBackend) -> None:
    with ProxyProcess(_h2_config(backend.url)) as proxy:
        out = subprocess.run(
            ["h2load", "-n", "300", "-c", "3", "-m", "20", "-T", "15", proxy.url + "/load"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        m = re.search(r"requests: 300 total, 300 started, 300 done, (\d+) succeeded", out.stdout)
        assert m is not None and m.group(1) == "300", out.stdout
        assert "status codes: 300 2xx" in out.stdout, out.stdout
        assert len(backend.requests) == 300


def test_100_concurrent_streams_on_one_connection(backend: RecordingBackend) -> None:
    with ProxyProcess(_h2_config(backend.url)) as proxy, H2Client(proxy.host, proxy.port) as c:
        reqs = [
            (b"POST", b"/s/%d" % i, [(b"content-type", b"text/plain")], b"body %d" % i)
            for i in range(100)
        ]
        answers = c.exchange(reqs)
        assert [a.status for a in answers] == [200] * 100
        for i, a in enumerate(answers):
            got = json.loads(a.body)
            assert got["target"] == f"/s/{i}" and got["body"] == f"body {i}"
        assert len(backend.requests) == 100
        assert backend.connections_accepted > 1  # streams ran concurrently upstream


def test_a_slow_stream_does_not_hold_up_the_others(backend: RecordingBackend) -> None:
    with ProxyProcess(_h2_config(backend.url)) as proxy, H2Client(proxy.host, proxy.port) as c:
        reqs = [(b"GET", b"/delay/3", [], b"")] + [
            (b"GET", b"/fast/%d" % i, [], b"") for i in range(20)
        ]
        answers = c.exchange(reqs)
        assert [a.status for a in answers] == [200] * 21
        slow, fast = answers[0], answers[1:]
        # every fast stream was answered while the slow one still waited on its backend
        assert max(a.seconds for a in fast) < slow.seconds


def test_large_bodies_both_ways_respect_flow_control(backend: RecordingBackend) -> None:
    """5 MB up and 5 MB down on one stream: far past every initial window, so the transfer
    completes only if both sides give windows back as the bytes are consumed."""
    big = bytes(range(256)) * (5 * 1024 * 4)
    with (
        # a slow client pauses the backend's answer: its idle timeout must not be the bound
        ProxyProcess(_h2_config(backend.url, timeout="30s")) as proxy,
        # pure-Python framing on every side of a loaded 2-core machine: slow, not stuck
        H2Client(proxy.host, proxy.port, timeout=60) as c,
    ):
        up = c.request(b"PUT", b"/up", [(b"content-length", b"%d" % len(big))], big)
        assert up.status == 200 and up.reset is None, (up.reset, len(up.body))
        assert up.header(b"content-length") == b"%d" % len(up.body)
        assert json.loads(up.body)["body_len"] == len(big)
        down = c.request(b"GET", b"/bytes/%d" % (5 * 1024 * 1024))
        assert down.status == 200 and len(down.body) == 5 * 1024 * 1024


def test_malformed_requests_reach_no_backend(backend: RecordingBackend) -> None:
    """What our head rules refuse (a malformed Host, an unknown Expect) is a 4xx on its
    stream, and the connection lives on; what h2 itself refuses (a Content-Length the DATA
    contradicts, an upper-case name, a connection-specific header, a misplaced or repeated
    pseudo-header, a forbidden character) ends the connection with GOAWAY PROTOCOL_ERROR.
    Neither reaches the backend."""
    with ProxyProcess(_h2_config(backend.url)) as proxy:
        with H2Client(proxy.host, proxy.port) as c:
            bad = c.exchange([
                (b"GET", b"/a", [(b"host", b"bad host")], b""),
                (b"GET", b"/b", [(b"expect", b"the-unexpected")], b""),
                (b"GET", b"/c", [(b"content-length", b"5")], b""),  # and no DATA
            ])  # fmt: skip
            assert [a.status for a in bad] == [400, 417, 400]
            assert c.request(b"GET", b"/fine").status == 200  # the connection lives on
        for headers, body in (
            ([(b"content-length", b"1")], b"more than one byte"),
            ([(b"X-Upper", b"1")], b""),
            ([(b"connection", b"close")], b""),
            # the rest of RFC 9113 8.2 and 8.3 (h2 checked these; `malformed_request` does now)
            ([(b"te", b"gzip")], b""),
            ([(b"x-padded", b" 1")], b""),
            ([(b"x-nul", b"a\x00b")], b""),
            ([(b"x-a", b"1"), (b":scheme", b"http")], b""),  # a pseudo-header after a field
            ([(b":path", b"/twice")], b""),
            ([(b":status", b"200")], b""),
            ([(b"bad name", b"1")], b""),
        ):
            with H2Client(proxy.host, proxy.port) as c, pytest.raises(OSError):
                c.request(b"POST", b"/z", headers, body)
        assert [r.target for r in backend.requests] == ["/fine"]


def test_drain_sends_goaway_and_finishes_streams_in_flight(backend: RecordingBackend) -> None:
    proxy = ProxyProcess(_h2_config(backend.url)).start()
    try:
        with H2Client(proxy.host, proxy.port) as idle:
            assert idle.request(b"GET", b"/first").status == 200
            result: list[subprocess.CompletedProcess[str]] = []
            busy = threading.Thread(
                target=lambda: result.append(
                    _curl("--http2-prior-knowledge", "-i", proxy.url + "/delay/1.5")
                ),
                daemon=True,
            )
            busy.start()
            backend.wait_for_requests(2)
            proxy.send_signal(signal.SIGTERM)
            assert idle.wait_goaway() == 1  # GOAWAY names the last stream taken
            busy.join(20)
            assert result, "curl did not finish"
            assert result[0].stdout.startswith("HTTP/2 200"), result[0].stdout + result[0].stderr
        assert proxy.wait(15) == 0
    finally:
        proxy.stop()


def test_http2_requests_are_shadowed_like_http11(backend: RecordingBackend) -> None:
    """A stream is a request: its copy (body and all, without a Content-Length from the
    client) reaches an HTTP/1.1 shadow with the usual headers, and copies too big for the
    shadow's max_body are skipped."""
    with RecordingBackend() as shadow:
        cfg = _h2_config(backend.url)
        cfg["backends"]["s1"] = {"endpoints": [shadow.url]}
        cfg["routes"][0]["shadows"] = [{"backend": "s1", "percent": 100, "max_body": "1KiB"}]
        with ProxyProcess(cfg) as proxy, H2Client(proxy.host, proxy.port) as c:
            answers = c.exchange(
                [(b"POST", b"/w/%d" % i, [], b"payload %d" % i) for i in range(10)]
                + [(b"POST", b"/big", [], b"x" * 4096)]
            )
            assert [a.status for a in answers] == [200] * 11
            copies = shadow.wait_for_requests(10)
            done = wait_until(
                lambda: (
                    sum(scrape(proxy).outcomes("r1", "s1").values()) >= 11
                    and scrape(proxy).outcomes("r1", "s1")
                ),
                10,
                "11 shadow outcomes",
            )
        assert sorted(r.target for r in copies) == sorted(f"/w/{i}" for i in range(10))
        for r in copies:
            assert r.body == b"payload " + r.target.rsplit("/", 1)[1].encode()
            assert r.header("x-shadowlane-shadow") == "r1"
            assert r.header("host") == f"127.0.0.1-shadow:{proxy.port}"  # :authority + suffix
        assert done.get("skipped_body") == 1
        assert len(backend.requests) == 11


def test_reload_keeps_http2_connections_and_new_streams_use_the_new_routes(
    backend: RecordingBackend,
) -> None:
    with RecordingBackend() as other:
        cfg = _h2_config(backend.url)
        with ProxyProcess(cfg) as proxy, H2Client(proxy.host, proxy.port) as c:
            assert c.request(b"GET", b"/before").status == 200
            new = copy.deepcopy(proxy.config)
            new["backends"]["b1"]["endpoints"] = [other.url]
            proxy.write_config(new)
            proxy.reload()
            wait_until(lambda: proxy.stderr_lines("reloaded"), 10, "the reload")
            assert c.request(b"GET", b"/after").status == 200  # the same connection
            assert c.goaway is None
        assert [r.target for r in backend.requests] == ["/before"]
        assert [r.target for r in other.requests] == ["/after"]


# -- to backends --------------------------------------------------------------------------------


def test_h2c_backend_multiplexes_and_forwards_trailers() -> None:
    def handler(req: H2Request) -> H2Reply:
        return H2Reply(
            200, [(b"content-type", b"text/plain")], req.path + b"|" + req.body,
            trailers=[(b"x-checksum", b"%d" % len(req.body))],
        )  # fmt: skip

    with H2Backend(handler) as h2be:
        cfg = _h2_config(h2be.url)
        cfg["backends"]["b1"]["protocol"] = "h2c"
        with ProxyProcess(cfg) as proxy, H2Client(proxy.host, proxy.port) as c:
            answers = c.exchange([(b"POST", b"/t/%d" % i, [], b"x" * i) for i in range(1, 51)])
            assert [a.status for a in answers] == [200] * 50
            for i, a in enumerate(answers, 1):
                assert a.body == b"/t/%d|" % i + b"x" * i
                assert a.trailers == [(b"x-checksum", b"%d" % i)]
            # HTTP/1.1 clients get the answer too (without trailers)
            raw = raw_request(
                proxy.port, b"GET /h1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:200]
            assert raw.endswith(b"\r\n\r\n4\r\n/h1|\r\n0\r\n\r\n"), raw
        got = h2be.wait_for_requests(51)
        assert {r.header(b":authority") for r in got[:50]} == {f"127.0.0.1:{proxy.port}".encode()}
        assert h2be.connections == 1  # 51 requests, one HTTP/2 connection


def test_credentials_reach_an_h2c_backend_never_indexed() -> None:
    """h2's outbound normalisation is off for backends; the proxy's own does what it did: a
    shadow's added header is lower-cased, and credentials (and the request id) go as HPACK
    never-indexed fields, so they never enter the connection's compression table (RFC 7541
    7.1.3)."""
    with H2Backend() as h2be:
        cfg = _h2_config(h2be.url)
        cfg["backends"]["b1"]["protocol"] = "h2c"
        cfg["routes"][0]["headers"] = {"add": {"X-Added": "yes"}}
        auth = [(b"authorization", b"Bearer secret"), (b"cookie", b"a=1"), (b"x-plain", b"1")]
        with ProxyProcess(cfg) as proxy, H2Client(proxy.host, proxy.port) as c:
            assert c.request(b"GET", b"/creds", auth).status == 200
        (req,) = h2be.wait_for_requests(1)
        got = {bytes(n): h for n, h in ((h[0], h) for h in req.headers)}
        assert got[b"authorization"][1] == b"Bearer secret"
        assert got[b"x-added"][1] == b"yes"
        assert isinstance(got[b"authorization"], NeverIndexedHeaderTuple)
        assert isinstance(got[b"cookie"], NeverIndexedHeaderTuple)
        assert not isinstance(got[b"x-plain"], NeverIndexedHeaderTuple)
        # the request id is new each time: indexed, it would only push useful entries out
        assert isinstance(got[b"x-request-id"], NeverIndexedHeaderTuple)


def test_malformed_answers_from_an_h2c_backend_are_502_and_its_other_streams_go_on() -> None:
    """What RFC 9113 8.2 forbids in an answer (a CR LF in a value, an upper-case name, a
    connection-specific header, a pseudo-header in the trailers) never reaches the client:
    that stream is a 502 (or, once the head is out, a reset), the others are answered."""
    bad: dict[bytes, H2Reply] = {
        b"/crlf": H2Reply(200, [(b"x-split", b"a\r\nset-cookie: evil=1")], b"x"),
        b"/upper": H2Reply(200, [(b"X-Upper", b"1")], b"x"),
        b"/conn": H2Reply(200, [(b"connection", b"close")], b"x"),
        b"/trailer": H2Reply(200, [], b"x", trailers=[(b":status", b"200")]),
    }

    def handler(req: H2Request) -> H2Reply:
        return bad.get(req.path, H2Reply(200, [(b"content-type", b"text/plain")], b"fine"))

    with H2Backend(handler, checked=False) as h2be:
        cfg = _h2_config(h2be.url)
        cfg["backends"]["b1"]["protocol"] = "h2c"
        with ProxyProcess(cfg) as proxy, H2Client(proxy.host, proxy.port) as c:
            answers = c.exchange([(b"GET", path, [], b"") for path in [*bad, b"/ok"]])
            assert [a.status for a in answers[:3]] == [502, 502, 502]
            assert all(b"evil" not in v for a in answers for _, v in a.headers)
            assert answers[3].reset or answers[3].status == 502, answers[3]
            assert answers[4].status == 200 and answers[4].body == b"fine"
        assert len(h2be.requests) == 5  # every one reached the backend: the answers were bad


def test_h2_backend_over_tls(cert: tuple[str, str]) -> None:
    crt, key = cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)
    ctx.set_alpn_protocols(["h2"])
    with H2Backend(ssl=ctx) as h2be:
        cfg = basic_config(h2be.url.replace("http://", "https://"))
        cfg["backends"]["b1"].update(protocol="h2", ca_file=crt)
        with ProxyProcess(cfg) as proxy:
            for i in range(5):
                raw = raw_request(
                    proxy.port, b"GET /tls/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % i
                )
                assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:200]
                assert b"/tls/%d" % i in raw
        assert [r.header(b":scheme") for r in h2be.wait_for_requests(5)] == [b"https"] * 5
        assert h2be.connections == 1


def test_grpc_timeout_bounds_the_upstream_call() -> None:
    """A backend slower than the call's grpc-timeout: the proxy ends the call itself with
    DEADLINE_EXCEEDED, in gRPC's own terms (HTTP 200, grpc-status 4)."""
    with H2Backend(lambda req: H2Reply(200, [], b"late", delay=5)) as h2be:
        cfg = _h2_config(h2be.url)
        cfg["backends"]["b1"]["protocol"] = "h2c"
        with ProxyProcess(cfg) as proxy, H2Client(proxy.host, proxy.port) as c:
            grpc_headers = [
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"grpc-timeout", b"300m"),
            ]
            a = c.request(b"POST", b"/svc/Method", grpc_headers, b"\x00\x00\x00\x00\x00")
            assert a.status == 200
            assert a.header(b"grpc-status") == b"4", a.headers
        req = h2be.wait_for_requests(1)[0]
        assert req.header(b"te") == b"trailers"  # kept for gRPC
        assert req.header(b"grpc-timeout") == b"300m"


def test_config_checks_protocol_against_the_scheme(tmp_path: Path) -> None:
    cfg = basic_config("http://127.0.0.1:9")
    cfg["backends"]["b1"]["protocol"] = "h2"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "shadowlane", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert "backends.b1" in out.stderr + out.stdout
    assert "https://" in out.stderr + out.stdout


def test_answers_the_proxy_gives_a_grpc_call_are_grpc_answers() -> None:
    """No route, a dead backend: a gRPC client reads grpc-status (UNIMPLEMENTED, UNAVAILABLE)
    with the reason in grpc-message, in an HTTP 200 "trailers only" answer; a plain HTTP/2
    request to the same dead backend still gets its 502."""
    cfg = _h2_config(f"http://127.0.0.1:{dead_port()}")
    cfg["routes"][0]["match"] = {"path_prefix": "/only"}
    grpc_headers = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    with ProxyProcess(cfg) as proxy, H2Client(proxy.host, proxy.port) as c:
        none = c.request(b"POST", b"/svc/M", grpc_headers, b"\x00" * 5)
        assert none.status == 200
        assert none.header(b"grpc-status") == b"12"
        assert none.header(b"grpc-message") == b"no route matches this request"
        dead = c.request(b"POST", b"/only/M", grpc_headers, b"\x00" * 5)
        assert (dead.status, dead.header(b"grpc-status")) == (200, b"14")
        assert b"refused" in (dead.header(b"grpc-message") or b"")
        plain = c.request(b"GET", b"/only/x")
        assert plain.status == 502 and plain.header(b"grpc-status") is None


def test_h2c_backend_flow_control_both_ways() -> None:
    """3 MB up to an HTTP/2 backend and 3 MB back, from an HTTP/1.1 client and an HTTP/2
    one: far past the backend's 64 KiB windows, so it completes only if the proxy sends as
    the backend's windows open and gives the backend its window back as the client reads."""
    big = bytes(range(256)) * (3 * 1024 * 4)

    def handler(req: H2Request) -> H2Reply:
        return H2Reply(200, [(b"x-got", b"%d" % len(req.body))], req.body[::-1])

    with H2Backend(handler) as h2be:
        cfg = _h2_config(h2be.url, timeout="30s")
        cfg["backends"]["b1"]["protocol"] = "h2c"
        with ProxyProcess(cfg) as proxy:
            with H2Client(proxy.host, proxy.port, timeout=60) as c:
                a = c.request(b"PUT", b"/up", [], big)  # no content-length: DATA until the end
                assert (a.status, a.header(b"x-got")) == (200, b"%d" % len(big))
                assert a.body == big[::-1]
            head = b"PUT /up1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(big)
            raw = raw_request(proxy.port, head + b"Connection: close\r\n\r\n" + big, timeout=60)
            assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:200]
            assert b"x-got: %d\r\n" % len(big) in raw
        got = h2be.wait_for_requests(2)
        assert [r.body == big for r in got] == [True, True]


def test_websocket_and_http2_share_a_listener() -> None:
    """With `listen_http2`, an HTTP/1.1 connection is handed over after one look at its first
    bytes; its upgrade to a WebSocket tunnel works as on a plain listener, beside HTTP/2
    streams on the same port."""
    with WebSocketServer() as ws_server, ProxyProcess(_h2_config(ws_server.url)) as proxy:

        async def talk() -> list[Any]:
            url = f"ws://{proxy.host}:{proxy.port}/echo"
            async with connect(url, open_timeout=10, close_timeout=10) as ws:
                await ws.send("over h1, beside h2")
                got = [await ws.recv()]
                await ws.send(b"\x00\x01")
                got.append(await ws.recv())
                return got

        assert asyncio.run(asyncio.wait_for(talk(), 30)) == ["over h1, beside h2", b"\x00\x01"]
        got = _curl("--http2-prior-knowledge", "-s", "-o", "/dev/null", "-w", "%{http_version}",
                    proxy.url + "/plain")  # fmt: skip
        assert got.stdout == "2"


def test_cookie_crumbs_are_joined_for_http11_backends(backend: RecordingBackend) -> None:
    """HTTP/2 clients may split Cookie into one field per crumb (RFC 9113 8.2.3); an HTTP/1.1
    backend gets them as one header, `; `-joined, in order."""
    with ProxyProcess(_h2_config(backend.url)) as proxy, H2Client(proxy.host, proxy.port) as c:
        crumbs = [(b"cookie", b"a=1"), (b"x-between", b"y"), (b"cookie", b"b=2")]
        assert c.request(b"GET", b"/c", crumbs).status == 200
    (req,) = backend.requests
    assert req.header_values("cookie") == ["a=1; b=2"]
    assert req.header("x-between") == "y"


def test_streams_past_the_limit_are_refused_one_by_one(backend: RecordingBackend) -> None:
    """`limits.max_concurrent_streams: 2`, and a client that opens four streams before it has
    read the proxy's SETTINGS: the two past the limit are reset REFUSED_STREAM (safe to retry),
    the two within it are answered, and the connection goes on."""
    config = _h2_config(backend.url, limits={"max_concurrent_streams": 2})
    with ProxyProcess(config) as proxy, H2Client(proxy.host, proxy.port) as c:
        answers = c.exchange([(b"GET", b"/delay/0.5", [], b"") for _ in range(4)])
        assert [(a.status, a.reset) for a in answers] == [(200, None)] * 2 + [(0, 7)] * 2
        assert c.request(b"GET", b"/after").status == 200
        assert sorted(r.target for r in backend.requests) == ["/after", "/delay/0.5", "/delay/0.5"]


def test_header_blocks_in_continuation_frames_both_ways(backend: RecordingBackend) -> None:
    """40 KiB of request headers (HEADERS plus CONTINUATION frames from the client) reach the
    backend whole; the backend's answer headers come back the same way."""
    big = [(b"x-big-%d" % i, b"%d" % i * 500) for i in range(40)]
    with ProxyProcess(_h2_config(backend.url)) as proxy, H2Client(proxy.host, proxy.port) as c:
        answer = c.request(b"GET", b"/echo", big)
        assert answer.status == 200
        (seen,) = backend.requests
        for name, value in big:
            assert seen.header(name.decode()) == value.decode()


def _open_and_reset(c: H2Client, n: int, path: bytes, *, reset_after: float = 0.0) -> None:
    """Open `n` streams (GET `path`) in batches of 50 (the proxy allows 128 at once), then
    reset each (CANCEL): at once, or once `reset_after` seconds have passed since its batch
    was opened (then two batches are open at a time)."""
    waiting: list[tuple[list[int], float]] = []
    for start in range(0, n, 50):
        batch = []
        for _ in range(min(50, n - start)):
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(
                sid,
                [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", c.authority),
                 (b":path", path)],
                end_stream=True,
            )  # fmt: skip
            batch.append(sid)
        c._send()
        waiting.append((batch, time.monotonic()))
        if reset_after and len(waiting) < 2 and start + 50 < n:
            continue
        for sids, opened in waiting:
            wait = opened + reset_after - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # the streams' age is what is tested: past the threshold
            for sid in sids:
                c.h2.reset_stream(sid, 8)
        c._send()
        waiting.clear()


def _goaway_code(c: H2Client, timeout: float = 10.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = c.sock.recv(65536)
        except OSError:
            return None
        if not data:
            return None
        for ev in c.h2.receive_data(data):
            if isinstance(ev, ConnectionTerminated):
                return int(ev.error_code or 0)
    return None


def test_a_rapid_reset_flood_ends_the_connection(backend: RecordingBackend) -> None:
    """CVE-2023-44487: streams opened and reset at once, 150 of them, each a backend request
    the client never waits for. Past 100 such resets (more than half of its streams) the
    client gets GOAWAY ENHANCE_YOUR_CALM and the connection ends, counted; other clients are
    served."""
    with ProxyProcess(_h2_config(backend.url)) as proxy:
        with H2Client(proxy.host, proxy.port) as c:
            _open_and_reset(c, 150, b"/delay/2")
            assert _goaway_code(c) == 0xB  # ENHANCE_YOUR_CALM
        assert scrape(proxy).sum(LIMITED, limit="h2_reset_flood") == 1
        with H2Client(proxy.host, proxy.port) as other:
            assert other.request(b"GET", b"/fine").status == 200


def test_cancelled_long_calls_are_no_flood(backend: RecordingBackend) -> None:
    """A client cancelling calls it has waited on (a gRPC deadline, a closed tab) is not
    flooding: 200 streams reset after more than a second each leave the connection up."""
    with ProxyProcess(_h2_config(backend.url)) as proxy, H2Client(proxy.host, proxy.port) as c:
        _open_and_reset(c, 200, b"/delay/5", reset_after=1.2)
        backend.wait_for_requests(200, timeout=20)
        assert c.request(b"GET", b"/after").status == 200
        assert scrape(proxy).sum(LIMITED, limit="h2_reset_flood") == 0


#: the client's preface and an empty SETTINGS frame
_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + struct.pack("!BHBBI", 0, 0, 0x4, 0, 0)


def _ping_frames(n: int) -> bytes:
    """`n` PING frames (not acks), 17 bytes each."""
    head = struct.pack("!BHBBI", 0, 8, 0x6, 0, 0)
    return b"".join(head + i.to_bytes(8, "big") for i in range(n))


def test_a_client_that_pings_and_never_reads_is_aborted(backend: RecordingBackend) -> None:
    """CVE-2019-9512: PINGs are free to send and each costs the proxy a queued ack. A client
    whose socket is full (it never reads) and keeps pinging is aborted once more than 1,000
    acks wait for it; the proxy's memory for it stays bounded, and others are served."""
    with ProxyProcess(_h2_config(backend.url)) as proxy:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # full at once
        sock.settimeout(10)
        sock.connect((proxy.host, proxy.port))
        sock.sendall(_HELLO)
        batch = _ping_frames(2000)
        sent = 0
        try:
            # the kernel's buffers take some MB of acks before the proxy's transport pauses:
            # at most 1,000 batches (34 MB, 2M PINGs), stopping at the abort
            for _ in range(1000):
                sock.sendall(batch)
                sent += 1
                if sent % 25 == 0 and scrape(proxy).sum(LIMITED, limit="h2_control_flood"):
                    break
        except OSError:
            pass  # the abort reset the connection under the sendall
        finally:
            sock.close()
        assert sent > 0
        wait_until(
            lambda: scrape(proxy).sum(LIMITED, limit="h2_control_flood") == 1, 10, "the abort"
        )
        with H2Client(proxy.host, proxy.port) as other:
            assert other.request(b"GET", b"/fine").status == 200


def test_pings_answered_to_a_reading_client_are_no_flood(backend: RecordingBackend) -> None:
    """5,000 PINGs from a client that reads the acks as they come: nothing waits for it, so
    nothing is cut."""
    with ProxyProcess(_h2_config(backend.url)) as proxy, H2Client(proxy.host, proxy.port) as c:
        acks = 0
        for round_ in range(1, 11):
            c.sock.sendall(_ping_frames(500))
            deadline = time.monotonic() + 10
            while acks < round_ * 500:
                assert time.monotonic() < deadline, f"{acks} acks"
                data = c.sock.recv(65536)
                assert data, "the proxy closed the connection"
                events = c.h2.receive_data(data)
                acks += sum(1 for ev in events if isinstance(ev, PingAckReceived))
        assert acks == 5000
        assert c.request(b"GET", b"/after").status == 200
        assert scrape(proxy).sum(LIMITED, limit="h2_control_flood") == 0
