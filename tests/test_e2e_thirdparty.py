"""End to end through third-party software: httpbin (on gunicorn) behind shadowlane.

Why third-party at both ends: the server (httpbin) and the clients (``requests``, ``curl``) were
written by people who never saw this proxy, so their expectations are HTTP's, not ours. Each
test sends the same request directly to httpbin and through the proxy and asserts the answers
are the same, after removing only what a reverse proxy is *supposed* to change (the
X-Forwarded-* / X-Request-Id headers it adds, the hop-by-hop headers it drops, and the Host-
derived URL). Everything else — status, body bytes, end-to-end headers — must be identical.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from support.httpbin_server import HttpbinServer
from support.proxy import ProxyProcess, basic_config

T = 10.0  # client timeout for every request
CURL = shutil.which("curl") or "/usr/bin/curl"

#: request headers the proxy adds by contract (DESIGN.md "On the wire")
PROXY_ADDED = {"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-request-id"}
#: hop-by-hop headers (RFC 9110 §7.6.1): meaningful per connection, never forwarded as such
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
}
#: response headers whose value legitimately differs between two answers
PER_RESPONSE = {"date"}


@pytest.fixture(scope="module")
def httpbin() -> Iterator[HttpbinServer]:
    with HttpbinServer() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(httpbin: HttpbinServer) -> Iterator[ProxyProcess]:
    with ProxyProcess(basic_config(httpbin.url, timeout="30s")) as p:
        yield p


@pytest.fixture(autouse=True)
def _proxy_alive(proxy: ProxyProcess) -> Iterator[None]:
    """A test that killed the proxy says so, instead of failing the next test mysteriously."""
    yield
    assert proxy.alive(), f"proxy died during the test:\n{proxy.stderr_text()[-3000:]}"


def normalize_echo(obj: Any, base: str) -> Any:
    """An httpbin echo with the proxy's legitimate changes removed (see module docstring)."""
    obj = copy.deepcopy(obj)
    if isinstance(obj, dict):
        if isinstance(obj.get("headers"), dict):
            obj["headers"] = {
                k: v
                for k, v in obj["headers"].items()
                if k.lower() not in PROXY_ADDED | HOP_BY_HOP | {"host", "content-length"}
            }
        if isinstance(obj.get("url"), str) and obj["url"].startswith(base):
            obj["url"] = obj["url"][len(base) :]
    return obj


def e2e_headers(resp: requests.Response, *, framing: bool = False) -> list[tuple[str, str]]:
    """Response headers a proxy must pass through unchanged, as a sorted multiset.

    ``framing`` keeps Content-Length, for bodies that are byte-identical on both paths.
    """
    skip = HOP_BY_HOP | PER_RESPONSE | (set() if framing else {"content-length"})
    return sorted((k.lower(), v) for k, v in resp.raw.headers.items() if k.lower() not in skip)


def both(
    httpbin: HttpbinServer,
    proxy: ProxyProcess,
    method: str,
    path: str,
    make_kwargs: Callable[[], dict[str, Any]] | None = None,
    **kwargs: Any,
) -> tuple[requests.Response, requests.Response]:
    """The same request, directly and through the proxy. ``make_kwargs`` for one-shot bodies."""
    out = []
    for base in (httpbin.url, proxy.url):
        kw = dict(kwargs, **(make_kwargs() if make_kwargs else {}))
        kw.setdefault("timeout", T)
        out.append(requests.request(method, base + path, **kw))
    return out[0], out[1]


def assert_same_echo(
    httpbin: HttpbinServer, proxy: ProxyProcess, d: requests.Response, p: requests.Response
) -> dict[str, Any]:
    assert p.status_code == d.status_code
    assert e2e_headers(p) == e2e_headers(d)
    dn, pn = normalize_echo(d.json(), httpbin.url), normalize_echo(p.json(), proxy.url)
    assert pn == dn
    result: dict[str, Any] = pn
    return result


def connections_opened(session: requests.Session, proxy: ProxyProcess) -> int:
    """TCP connections a Session opened to the proxy (urllib3 counts them per pool)."""
    adapter = session.get_adapter(proxy.url)
    assert isinstance(adapter, requests.adapters.HTTPAdapter)
    pools = adapter.poolmanager.pools
    return sum(
        pools[key].num_connections
        for key in pools.keys()  # noqa: SIM118 (RecentlyUsedContainer is not iterable)
        if (key.key_host, key.key_port) == (proxy.host, proxy.port)
    )


def curl(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
    """Run curl (a third-party client) with bounded time; raises if curl itself fails."""
    proc = subprocess.run(
        [CURL, "-sS", "--max-time", str(int(timeout)), *args],
        capture_output=True,
        timeout=timeout + 5,
    )
    assert proc.returncode == 0, f"curl {args} failed: {proc.stderr.decode(errors='replace')}"
    return proc


def split_head(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """Split ``curl -D -`` output (one response) into status line, headers, body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return lines[0], headers, body


# -- requests as the client --------------------------------------------------------------------


def test_get_with_query(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    params = [("a", "1"), ("b", "two"), ("b", "2"), ("space", "a b"), ("uni", "héllo"), ("e", "")]
    d, p = both(httpbin, proxy, "GET", "/get", params=params, headers={"X-Custom": "Value"})
    echo = assert_same_echo(httpbin, proxy, d, p)
    assert echo["args"] == {"a": "1", "b": ["two", "2"], "space": "a b", "uni": "héllo", "e": ""}
    assert echo["headers"]["X-Custom"] == "Value"


def test_post_json(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    payload = {"n": 1, "s": "ünïcode", "list": list(range(50)), "nested": {"a": None}}
    d, p = both(httpbin, proxy, "POST", "/post", json=payload)
    echo = assert_same_echo(httpbin, proxy, d, p)
    assert echo["json"] == payload


def test_post_form(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    d, p = both(httpbin, proxy, "POST", "/post", data={"k": "v", "multi": ["1", "2"], "e": "&="})
    echo = assert_same_echo(httpbin, proxy, d, p)
    assert echo["form"] == {"k": "v", "multi": ["1", "2"], "e": "&="}


def test_post_multipart(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    text = b"a small text file\n"
    big = b"".join(b"row %06d\n" % i for i in range(30000))  # ~330 KB
    # encoded once, so both paths carry the same boundary
    files = {"small": ("s.txt", text, "text/plain"), "big": ("b.txt", big, "text/plain")}
    prepared = requests.Request("POST", "http://x/", files=files, data={"field": "value"})
    body = prepared.prepare()
    headers = {"Content-Type": body.headers["Content-Type"]}
    d, p = both(httpbin, proxy, "POST", "/post", data=body.body, headers=headers)
    echo = assert_same_echo(httpbin, proxy, d, p)
    assert echo["files"]["big"] == big.decode()
    assert echo["form"] == {"field": "value"}


def test_chunked_upload(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    chunks = [b"%05d" % i * 2000 for i in range(100)]  # 100 chunks of 10 KB

    def gen() -> Iterator[bytes]:
        yield from chunks

    d, p = both(httpbin, proxy, "POST", "/post", make_kwargs=lambda: {"data": gen()})
    echo = assert_same_echo(httpbin, proxy, d, p)
    assert echo["data"] == b"".join(chunks).decode()


def test_large_upload_and_download(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    body = (b"0123456789abcdef" * 65536 * 4)[: 4 * 1024 * 1024]  # 4 MiB
    d, p = both(httpbin, proxy, "POST", "/anything", data=body)
    echo = assert_same_echo(httpbin, proxy, d, p)
    assert len(echo["data"]) == len(body)
    assert p.content.count(b"0123456789abcdef") == d.content.count(b"0123456789abcdef")


def test_slow_reader_of_a_large_answer_does_not_stall_the_next_request(
    httpbin: HttpbinServer, proxy: ProxyProcess
) -> None:
    """A client late to read a large answer makes the proxy pause reading from httpbin.

    That pause belongs to that answer: the upstream connection goes back to the pool when the
    answer ends, and the next request through it must be answered. (It once stayed paused, so
    the next answer sat unread in the proxy's socket and the client timed out: the flake of
    ``test_exact_bodies[/bytes/...]``, which follows the 4 MiB download above.)
    """
    body = b"x" * (4 * 1024 * 1024)
    for _ in range(3):
        with requests.post(proxy.url + "/anything", data=body, stream=True, timeout=T) as r:
            time.sleep(0.3)  # the proxy's buffers towards us fill, and it stops reading httpbin
            assert len(r.json()["data"]) == len(body)
        expected = requests.get(httpbin.url + "/bytes/1000?seed=5", timeout=T).content
        p = requests.get(proxy.url + "/bytes/1000?seed=5", timeout=T)
        assert p.status_code == 200
        assert p.content == expected


@pytest.mark.parametrize(
    "path",
    [
        "/bytes/102400?seed=42",
        "/stream-bytes/102400?seed=7&chunk_size=999",
        "/range/102400",
        "/image/png",
        "/html",
        "/robots.txt",
        "/encoding/utf8",
        "/deny",
    ],
)
def test_exact_bodies(httpbin: HttpbinServer, proxy: ProxyProcess, path: str) -> None:
    d, p = both(httpbin, proxy, "GET", path)
    assert p.status_code == d.status_code == 200
    assert p.content == d.content
    assert len(p.content) > 0
    framed = "content-length" in {k.lower() for k in d.raw.headers}
    assert e2e_headers(p, framing=framed) == e2e_headers(d, framing=framed)


def test_gzip_passes_through_compressed(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    d, p = both(httpbin, proxy, "GET", "/gzip")
    assert p.headers["Content-Encoding"] == d.headers["Content-Encoding"] == "gzip"
    echo = assert_same_echo(httpbin, proxy, d, p)
    assert echo["gzipped"] is True
    # the proxy must not decompress: the bytes on the wire are still gzip
    raw = requests.get(proxy.url + "/gzip", stream=True, timeout=T).raw.read(decode_content=False)
    assert raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(raw))["gzipped"] is True


def test_stream_lines(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    d, p = both(httpbin, proxy, "GET", "/stream/25", stream=True)
    dl = [json.loads(line) for line in d.iter_lines()]
    pl = [json.loads(line) for line in p.iter_lines()]
    assert [x["id"] for x in pl] == list(range(25))
    assert [normalize_echo(x, proxy.url) for x in pl] == [
        normalize_echo(x, httpbin.url) for x in dl
    ]


def test_redirects_are_passed_not_followed(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    d, p = both(httpbin, proxy, "GET", "/redirect/3", allow_redirects=False)
    assert p.status_code == d.status_code == 302
    assert p.headers["Location"] == d.headers["Location"]
    # an absolute redirect is built from the Host the client sent: it keeps the client on
    # the proxy (Host is forwarded as received)
    p = requests.get(proxy.url + "/absolute-redirect/2", allow_redirects=False, timeout=T)
    assert p.status_code == 302
    assert p.headers["Location"] == proxy.url + "/absolute-redirect/1"
    # the client follows them, through the proxy
    p = requests.get(proxy.url + "/redirect/3", timeout=T)
    assert p.status_code == 200
    assert [r.status_code for r in p.history] == [302, 302, 302]
    assert p.url == proxy.url + "/get"


@pytest.mark.parametrize("status", [418, 404, 500, 503, 201, 204])
def test_status_codes(httpbin: HttpbinServer, proxy: ProxyProcess, status: int) -> None:
    d, p = both(httpbin, proxy, "GET", f"/status/{status}")
    assert p.status_code == d.status_code == status
    assert p.content == d.content
    assert e2e_headers(p, framing=True) == e2e_headers(d, framing=True)
    if status == 418:
        assert b"teapot" in p.content


def test_head(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    d, p = both(httpbin, proxy, "HEAD", "/bytes/5000?seed=1")
    assert p.status_code == d.status_code == 200
    assert p.content == d.content == b""
    assert p.headers["Content-Length"] == d.headers["Content-Length"] == "5000"
    # the connection stays usable after a bodiless response that announced a length
    expected = requests.get(httpbin.url + "/bytes/100?seed=1", timeout=T).content
    with requests.Session() as s:
        assert s.head(proxy.url + "/bytes/5000", timeout=T).content == b""
        assert s.get(proxy.url + "/bytes/100?seed=1", timeout=T).content == expected
        assert connections_opened(s, proxy) == 1


def test_set_cookie_headers_not_folded(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    d, p = both(httpbin, proxy, "GET", "/cookies/set?a=1&b=2&c=3", allow_redirects=False)
    assert p.status_code == d.status_code == 302
    dc, pc = d.raw.headers.getlist("Set-Cookie"), p.raw.headers.getlist("Set-Cookie")
    assert len(pc) == 3
    assert pc == dc


def test_keep_alive_reuse_on_one_session(proxy: ProxyProcess) -> None:
    with requests.Session() as s:
        for i in range(60):
            if i % 3 == 0:
                r = s.post(proxy.url + "/post", data=b"x" * i, timeout=T)
                assert r.json()["data"] == "x" * i
            elif i % 3 == 1:
                r = s.get(proxy.url + f"/get?i={i}", timeout=T)
                assert r.json()["args"] == {"i": str(i)}
            else:
                r = s.get(proxy.url + "/bytes/1000?seed=3", timeout=T)
                assert len(r.content) == 1000
            assert r.status_code == 200
        assert connections_opened(s, proxy) == 1, "the proxy closed a keep-alive connection"


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "OPTIONS"])
def test_other_methods(httpbin: HttpbinServer, proxy: ProxyProcess, method: str) -> None:
    d, p = both(httpbin, proxy, method, "/anything/m?x=1", data=b"payload")
    assert p.status_code == d.status_code == 200
    if method == "OPTIONS":  # answered by Flask itself: no echo, just the Allow header
        assert p.headers["Allow"] == d.headers["Allow"]
    else:
        assert assert_same_echo(httpbin, proxy, d, p)["method"] == method


@pytest.mark.parametrize(
    "target",
    [
        "/anything/a%2Fb/%E2%9C%93?q=%2F&r=%20",  # encoded slash, UTF-8, encoded query
        "/anything/semi;colon/plus+sign?a=b+c&d=%2B",
        "/anything//double//slash",
        "/anything/dot/./segment/../kept?",
    ],
)
def test_targets_forwarded_verbatim(
    httpbin: HttpbinServer, proxy: ProxyProcess, target: str
) -> None:
    """The request target reaches the backend byte for byte (no decoding or normalising).

    Flask answers ``//`` with a 308 to the merged path: then the redirect must match.
    """
    seen = []
    for base in (httpbin.url, proxy.url):
        # curl --path-as-is sends the target exactly as given
        status, headers, body = split_head(curl("--path-as-is", "-D", "-", base + target).stdout)
        code = status.split(" ")[1]
        if code == "200":
            seen.append((code, normalize_echo(json.loads(body), base)))
        else:
            seen.append((code, headers["location"].removeprefix(base)))
    assert seen[1] == seen[0]


def test_streamed_response_is_not_buffered(proxy: ProxyProcess) -> None:
    """/drip sends 4 bytes over 2 s: the first must reach the client long before the last."""
    start = time.monotonic()
    with requests.get(
        proxy.url + "/drip?duration=2&numbytes=4&delay=0&code=200", stream=True, timeout=T
    ) as r:
        first = r.raw.read(1)
        first_at = time.monotonic() - start
        rest = r.raw.read()
        done_at = time.monotonic() - start
    assert first + rest == b"****"
    assert done_at >= 1.4, "drip finished early: the test proves nothing"
    assert first_at < 1.0, f"first byte after {first_at:.2f}s: the proxy buffered the response"


def test_conditional_requests_304(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    d, p = both(httpbin, proxy, "GET", "/etag/abc", headers={"If-None-Match": '"abc"'})
    assert p.status_code == d.status_code == 304
    assert p.content == d.content == b""
    assert p.headers["ETag"] == d.headers["ETag"]
    # the keep-alive connection survives a bodiless 304
    with requests.Session() as s:
        assert (
            s.get(proxy.url + "/etag/x", headers={"If-None-Match": '"x"'}, timeout=T).status_code
            == 304
        )
        assert s.get(proxy.url + "/get", timeout=T).status_code == 200
        assert connections_opened(s, proxy) == 1


def test_auth_challenge_and_success(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    d, p = both(httpbin, proxy, "GET", "/basic-auth/user/pass")
    assert p.status_code == d.status_code == 401
    assert p.headers["WWW-Authenticate"] == d.headers["WWW-Authenticate"]
    d, p = both(httpbin, proxy, "GET", "/basic-auth/user/pass", auth=("user", "pass"))
    assert p.status_code == d.status_code == 200
    assert p.json() == d.json() == {"authenticated": True, "user": "user"}


def test_duplicate_response_headers_kept(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    path = "/response-headers?X-Multi=one&X-Multi=two&X-Single=s"
    d, p = both(httpbin, proxy, "GET", path)
    assert p.raw.headers.getlist("X-Multi") == d.raw.headers.getlist("X-Multi") == ["one", "two"]
    assert p.headers["X-Single"] == "s"


def test_large_request_headers(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    big = {"Cookie": "; ".join(f"c{i}={'v' * 40}" for i in range(100)), "X-Big": "b" * 3000}
    d, p = both(httpbin, proxy, "GET", "/headers", headers=big)
    echo = assert_same_echo(httpbin, proxy, d, p)
    assert echo["headers"]["X-Big"] == "b" * 3000


# -- headers the proxy adds and removes -----------------------------------------------------


def test_forwarded_headers_and_request_id_reach_httpbin(proxy: ProxyProcess) -> None:
    r = requests.get(proxy.url + "/headers?show_env=1", timeout=T)
    h = r.json()["headers"]
    assert h["X-Forwarded-For"] == "127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["X-Forwarded-Host"] == f"127.0.0.1:{proxy.port}"
    assert re.fullmatch(r"[\w.:-]{8,}", h["X-Request-Id"]), h["X-Request-Id"]

    ids = {
        requests.get(proxy.url + "/headers?show_env=1", timeout=T).json()["headers"]["X-Request-Id"]
        for _ in range(20)
    }
    assert len(ids) == 20, "generated X-Request-Id values must be unique"


def test_forwarded_headers_extend_what_the_client_sent(proxy: ProxyProcess) -> None:
    r = requests.get(
        proxy.url + "/headers?show_env=1",
        headers={"X-Forwarded-For": "203.0.113.9", "X-Request-Id": "client-chosen-id-123"},
        timeout=T,
    )
    h = r.json()["headers"]
    assert h["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert h["X-Request-Id"] == "client-chosen-id-123"


def test_hop_by_hop_headers_removed(proxy: ProxyProcess) -> None:
    r = requests.get(
        proxy.url + "/headers?show_env=1",
        headers={
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "must-not-pass",
            "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "X-End-To-End": "passes",
        },
        timeout=T,
    )
    h = {k.lower(): v for k, v in r.json()["headers"].items()}
    for name in ("connection", "x-hop", "keep-alive", "proxy-connection", "te"):
        assert name not in h, f"{name} reached the backend: {h}"
    assert h["x-end-to-end"] == "passes"


# -- curl as the client -----------------------------------------------------------------------


def test_curl_get_and_post(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    results = []
    for base in (httpbin.url, proxy.url):
        got = curl(base + "/get?x=1&y=%20z").stdout
        posted = curl("-H", "Content-Type: application/json", "-d", '{"k": [1,2]}', base + "/post")
        results.append(
            (normalize_echo(json.loads(got), base), normalize_echo(json.loads(posted.stdout), base))
        )
    assert results[1] == results[0]
    assert results[1][1]["json"] == {"k": [1, 2]}


def test_curl_expect_100_continue(
    httpbin: HttpbinServer, proxy: ProxyProcess, tmp_path: Path
) -> None:
    """curl waits for 100 Continue before sending the body; the proxy must let it through.

    ``--expect100-timeout 10``: if no interim (or final) response came, curl would stall 10 s
    before sending anyway, so the elapsed-time bound proves the proxy answered the expectation.
    """
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"".join(b"%08d\n" % i for i in range(120000)))  # ~1 MB
    echoes = []
    for base in (httpbin.url, proxy.url):
        start = time.monotonic()
        proc = curl(
            "-v",
            "--expect100-timeout",
            "10",
            "-H",
            "Expect: 100-continue",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            f"@{upload}",
            base + "/post",
        )
        elapsed = time.monotonic() - start
        trace = proc.stderr.decode(errors="replace")
        assert "< HTTP/1.1 100 Continue" in trace, trace
        assert elapsed < 5, f"{base}: curl waited {elapsed:.1f}s for 100 Continue"
        echo = normalize_echo(json.loads(proc.stdout), base)
        # the proxy may answer the expectation itself and not forward it (nginx does too)
        echo["headers"].pop("Expect", None)
        echoes.append(echo)
    assert echoes[1] == echoes[0]
    assert len(echoes[1]["data"]) == upload.stat().st_size


def test_curl_head(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    heads = []
    for base in (httpbin.url, proxy.url):
        status, headers, body = split_head(curl("-I", base + "/bytes/777?seed=2").stdout)
        heads.append((status.split(" ", 2)[1], headers.get("content-length"), body))
    assert heads[1] == heads[0] == ("200", "777", b"")


def test_curl_http10(httpbin: HttpbinServer, proxy: ProxyProcess) -> None:
    """An HTTP/1.0 client: no chunked framing back to it, the body ends with the connection."""
    for path in ("/get?v=10", "/stream/3", "/bytes/5000?seed=9"):
        bodies = []
        for base in (httpbin.url, proxy.url):
            status, headers, body = split_head(curl("-0", "-D", "-", base + path).stdout)
            assert status.split(" ")[1] == "200", status
            assert "chunked" not in headers.get("transfer-encoding", ""), (base, headers)
            if "content-length" in headers:
                assert int(headers["content-length"]) == len(body)
            bodies.append((body, base))
        (db, dbase), (pb, pbase) = bodies
        if path.startswith("/bytes"):
            assert pb == db
            assert len(pb) == 5000
        elif path.startswith("/stream"):  # one JSON document per line
            dlines = [normalize_echo(json.loads(x), dbase) for x in db.splitlines()]
            plines = [normalize_echo(json.loads(x), pbase) for x in pb.splitlines()]
            assert plines == dlines
            assert len(plines) == 3
        else:
            assert normalize_echo(json.loads(pb), pbase) == normalize_echo(json.loads(db), dbase)
