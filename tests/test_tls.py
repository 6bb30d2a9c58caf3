"""TLS end to end: on the listener (`tls: {cert, key, client_ca}`) and to `https://` backends.

The certificates are made here, per test session, with the `openssl` command line tool: a CA,
an unrelated CA, server certificates for 127.0.0.1, and client certificates. The TLS backend is
the standard library's `ThreadingHTTPServer` with its accepted sockets wrapped by `ssl`, so the
proxy's TLS client talks to an implementation that is not its own.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from support.backend import RecordingBackend
from support.proxy import ProxyProcess, basic_config, raw_request, read_http_response
from support.wait import wait_until

T = 5.0
LOOPBACK = "127.0.0.1"
ProxyFactory = Callable[..., ProxyProcess]

# -- certificates ----------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0, f"openssl {' '.join(args)}: {out.stderr}"


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-new", "-nodes",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN=shadowlane tests {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _make_leaf(d: Path, name: str, ca: str, usage: str, san: str) -> None:
    ext = d / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\n"
        + (f"subjectAltName={san}\n" if san else "")
        + "authorityKeyIdentifier=keyid,issuer\n"
        "subjectKeyIdentifier=hash\n"
    )
    _openssl(
        "req", "-new", "-nodes",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name,
        cwd=d,
    )  # fmt: skip


@dataclass(frozen=True)
class Pki:
    dir: Path

    def crt(self, name: str) -> str:
        return str(self.dir / f"{name}.crt")

    def key(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    def pair(self, name: str) -> tuple[str, str]:
        return self.crt(name), self.key(name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """ca, other-ca; server (127.0.0.1 and localhost, by ca), server-other (by other-ca),
    misnamed (by ca, for another name); client (by ca), rogue-client (by other-ca)."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make the test certificates")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    here = "IP:127.0.0.1,DNS:localhost"
    _make_leaf(d, "server", "ca", "serverAuth", here)
    _make_leaf(d, "server-other", "other-ca", "serverAuth", here)
    _make_leaf(d, "misnamed", "ca", "serverAuth", "DNS:elsewhere.test")
    _make_leaf(d, "client", "ca", "clientAuth", "")
    _make_leaf(d, "rogue-client", "other-ca", "clientAuth", "")
    return Pki(d)


# -- a TLS backend ---------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class TlsBackend:
    """HTTPS server on 127.0.0.1 (stdlib http.server + ssl) that records requests and failed
    handshakes, and answers JSON `{"served_by": "tls", "path": ...}`."""

    def __init__(self, cert: str, key: str) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.cond = threading.Condition()
        self.seen: list[Seen] = []
        self.failed_handshakes = 0
        self.errors: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with outer.cond:
                    outer.seen.append(
                        Seen(
                            self.command,
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                        )
                    )
                    outer.cond.notify_all()
                out = json.dumps({"served_by": "tls", "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = _answer

            def setup(self) -> None:
                # the handshake explicitly: a peer that drops it shows up in handle_error
                # (an implicit one on the first read would look like a quiet EOF)
                self.request.do_handshake()
                super().setup()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = self.socket.accept()
                # the handshake happens in the request's own thread, on the first read
                return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

            def handle_error(self, request: Any, client_address: Any) -> None:
                import sys

                exc = sys.exc_info()[1]
                with outer.cond:
                    if isinstance(exc, ssl.SSLError | ConnectionResetError):
                        outer.failed_handshakes += 1
                    else:
                        outer.errors.append(repr(exc))
                    outer.cond.notify_all()

        self.server = Server((LOOPBACK, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    def paths(self) -> list[str]:
        with self.cond:
            return [s.path for s in self.seen]

    def wait_for(self, predicate: Callable[[TlsBackend], bool], what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self), timeout=T):
                raise TimeoutError(
                    f"TLS backend: timed out waiting for {what} (failed handshakes "
                    f"{self.failed_handshakes}, errors {self.errors}, seen {len(self.seen)})"
                )

    def __enter__(self) -> TlsBackend:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        assert self.errors == [], self.errors


@pytest.fixture
def tls_backend(pki: Pki) -> Iterator[TlsBackend]:
    with TlsBackend(*pki.pair("server")) as b:
        yield b


# -- the listener ----------------------------------------------------------------------------------


def https_url(proxy: ProxyProcess, path: str) -> str:
    return f"https://{LOOPBACK}:{proxy.port}{path}"


@dataclass(frozen=True)
class Fetched:
    status_code: int
    content: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


def fetch(url: str, **kw: Any) -> Fetched:
    """GET on its own session; the connection is gone on return. (A `requests.Response` kept
    alive keeps its TLS socket open, and an idle open TLS client holds the proxy's SIGTERM
    drain open: see test_sigterm_closes_idle_tls_connections_and_exits_promptly.)"""
    with requests.Session() as s:
        r = s.get(url, timeout=T, **kw)
        out = Fetched(r.status_code, r.content)
        r.close()
    del r
    return out


def test_tls_listener_serves_https_and_forwards_proto_https(
    pki: Pki, backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    cert, key = pki.pair("server")
    proxy = proxy_factory(basic_config(backend.url, tls={"cert": cert, "key": key}))
    r = fetch(https_url(proxy, "/secure?x=1"), verify=pki.crt("ca"))
    assert r.status_code == 200, r.text
    assert r.json()["target"] == "/secure?x=1"
    (seen,) = backend.wait_for_requests(1)
    assert seen.header("x-forwarded-proto") == "https", seen.headers
    assert seen.header("x-forwarded-for") == "127.0.0.1"

    # keep-alive inside TLS: two requests, one client connection
    ctx = ssl.create_default_context(cafile=pki.crt("ca"))
    raw = socket.create_connection((LOOPBACK, proxy.port), timeout=T)
    with ctx.wrap_socket(raw, server_hostname=LOOPBACK) as conn:
        for i in range(2):
            conn.sendall(f"GET /ka/{i} HTTP/1.1\r\nHost: tls.test\r\n\r\n".encode())
            resp = read_http_response(conn, timeout=T)
            assert resp.status == 200 and resp.header("connection") != "close", resp.headers
    # a client that does not trust the proxy's CA refuses it
    with pytest.raises(requests.exceptions.SSLError):
        fetch(https_url(proxy, "/untrusted"), verify=pki.crt("other-ca"))
    # plaintext HTTP on the TLS port gets no HTTP answer and reaches nothing
    raw = raw_request(proxy.port, b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2)
    assert not raw.startswith(b"HTTP/1.1 200"), raw[:100]
    assert [r.target for r in backend.requests] == ["/secure?x=1", "/ka/0", "/ka/1"]


def test_startup_line_says_https_when_the_listener_terminates_tls(
    pki: Pki, backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    """ "A startup line that says what listens where": with `tls:` that is https://."""
    cert, key = pki.pair("server")
    proxy = proxy_factory(basic_config(backend.url, tls={"cert": cert, "key": key}))
    (line,) = wait_until(
        lambda: [x for x in proxy.stderr_text().splitlines() if "listening on" in x],
        T,
        "the startup line",
    )
    assert f"https://127.0.0.1:{proxy.port}" in line, line


def test_client_certificates_are_required_with_client_ca(
    pki: Pki, backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    cert, key = pki.pair("server")
    tls = {"cert": cert, "key": key, "client_ca": pki.crt("ca")}
    proxy = proxy_factory(basic_config(backend.url, tls=tls))
    url = https_url(proxy, "/mtls")

    r = fetch(url, verify=pki.crt("ca"), cert=pki.pair("client"))
    assert r.status_code == 200, r.text

    for cert_pair in (None, pki.pair("rogue-client")):
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            fetch(url, verify=pki.crt("ca"), cert=cert_pair)

    # refused in the handshake itself (seen directly with TLS 1.2, where the client learns
    # it at once; with TLS 1.3 the alert arrives with the first read, as above)
    ctx = ssl.create_default_context(cafile=pki.crt("ca"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection((LOOPBACK, proxy.port), timeout=T) as raw,
        pytest.raises(ssl.SSLError),
    ):
        ctx.wrap_socket(raw, server_hostname=LOOPBACK).close()
    assert [r.target for r in backend.requests] == ["/mtls"]


def test_reload_swaps_the_listener_certificate_for_new_handshakes(
    pki: Pki, backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    cert, key = pki.pair("server")
    proxy = proxy_factory(basic_config(backend.url, tls={"cert": cert, "key": key}))
    assert fetch(https_url(proxy, "/a"), verify=pki.crt("ca")).ok
    rotated = copy.deepcopy(proxy.config)
    new_cert, new_key = pki.pair("server-other")
    rotated["tls"] = {"cert": new_cert, "key": new_key}
    proxy.write_config(rotated)
    proxy.reload()
    wait_until(lambda: "reloaded" in proxy.stderr_text(), T, "the reload")
    r = fetch(https_url(proxy, "/b"), verify=pki.crt("other-ca"))
    assert r.status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        fetch(https_url(proxy, "/c"), verify=pki.crt("ca"))


def test_sigterm_closes_idle_tls_connections_and_exits_promptly(
    pki: Pki, backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    """As over plain HTTP (test_lifecycle): an idle keep-alive client must not hold the drain.
    A TLS client that keeps its connection open and does not answer the proxy's close_notify
    (as many clients do while idle) must not make the exit wait for `drain_timeout`."""
    cert, key = pki.pair("server")
    cfg = basic_config(backend.url, tls={"cert": cert, "key": key}, limits={"drain_timeout": "5s"})
    proxy = proxy_factory(cfg)
    ctx = ssl.create_default_context(cafile=pki.crt("ca"))
    raw = socket.create_connection((LOOPBACK, proxy.port), timeout=T)
    with ctx.wrap_socket(raw, server_hostname=LOOPBACK) as idle:
        idle.sendall(b"GET /idle HTTP/1.1\r\nHost: tls.test\r\n\r\n")
        assert read_http_response(idle, timeout=T).status == 200
        start = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        code = proxy.wait(T + 2)
        elapsed = time.monotonic() - start
    assert code == 0, proxy.stderr_text()
    assert elapsed < 1.5, f"exit took {elapsed:.2f}s with one idle TLS client (drain_timeout 5s)"


# -- https upstreams -------------------------------------------------------------------------------


def upstream_config(pki: Pki, tls: TlsBackend, misnamed: TlsBackend, plain: str) -> Any:
    def https(url: str, **opts: Any) -> dict[str, Any]:
        return {"endpoints": [url], "timeout": "5s", "connect_timeout": "2s", **opts}

    return {
        "backends": {
            "trusted": https(tls.url, ca_file=pki.crt("ca")),
            "system-trust": https(tls.url),
            "wrong-ca": https(tls.url, ca_file=pki.crt("other-ca")),
            "unverified": https(tls.url, ca_file=pki.crt("other-ca"), verify=False),
            "misnamed": https(misnamed.url, ca_file=pki.crt("ca")),
            "plain": {"endpoints": [plain], "timeout": "5s"},
        },
        "routes": [
            {"name": f"to-{name}", "match": {"path_prefix": f"/{name}/"}, "backend": name}
            for name in ("trusted", "system-trust", "wrong-ca", "unverified", "misnamed")
        ]
        + [
            {
                "name": "shadowed",
                "match": {"path_prefix": "/"},
                "backend": "plain",
                "shadows": [{"backend": "trusted", "percent": 100}],
            }
        ],
    }


def test_https_upstreams_verify_by_default(
    pki: Pki,
    tls_backend: TlsBackend,
    backend: RecordingBackend,
    proxy_factory: ProxyFactory,
) -> None:
    with TlsBackend(*pki.pair("misnamed")) as misnamed:
        proxy = proxy_factory(upstream_config(pki, tls_backend, misnamed, backend.url))

        r = requests.get(proxy.url + "/trusted/x?q=1", timeout=T)
        assert r.status_code == 200, r.text
        assert r.json() == {"served_by": "tls", "path": "/trusted/x?q=1"}

        r = requests.get(proxy.url + "/unverified/y", timeout=T)
        assert r.status_code == 200, r.text
        assert r.json()["path"] == "/unverified/y"

        # verification is on by default (no ca_file: the system store, which lacks our CA),
        # checks the chain (wrong-ca) and the name (misnamed: a cert for elsewhere.test)
        for name in ("system-trust", "wrong-ca", "misnamed"):
            r = requests.get(proxy.url + f"/{name}/z", timeout=T)
            assert r.status_code == 502, (name, r.status_code, r.text)
            assert f"upstream {name} " in r.text, r.text
            assert "certificate verify failed" in r.text, r.text
        assert misnamed.paths() == []
    # the system-trust and wrong-ca attempts: handshakes the proxy broke off
    tls_backend.wait_for(lambda b: b.failed_handshakes >= 2, "2 failed handshakes")
    assert tls_backend.paths() == ["/trusted/x?q=1", "/unverified/y"]


def test_shadow_copies_reach_an_https_backend(
    pki: Pki,
    tls_backend: TlsBackend,
    backend: RecordingBackend,
    proxy_factory: ProxyFactory,
) -> None:
    with TlsBackend(*pki.pair("misnamed")) as misnamed:
        proxy = proxy_factory(upstream_config(pki, tls_backend, misnamed, backend.url))
        for i in range(3):
            r = requests.post(proxy.url + f"/orders/{i}", data=f"body-{i}", timeout=T)
            assert r.status_code == 200, r.text
            assert r.json()["target"] == f"/orders/{i}"  # the primary (plain) answered
        tls_backend.wait_for(lambda b: len(b.seen) == 3, "3 shadow copies")
    copies = sorted(tls_backend.seen, key=lambda s: s.path)
    assert [(c.method, c.path, c.body) for c in copies] == [
        ("POST", f"/orders/{i}", f"body-{i}".encode()) for i in range(3)
    ]
    for c in copies:
        assert c.headers.get("x-shadowlane-shadow"), c.headers
        assert c.headers.get("x-forwarded-proto") == "http", c.headers
