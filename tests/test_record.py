"""Recording through the real proxy: what reaches the files, in GoReplay's format.

Each test runs the proxy as a subprocess with `record:` on a route, sends requests with raw
sockets (so the exact bytes the client sent are known), stops the proxy (SIGTERM: the writer
flushes what it has before the process exits) and reads the files back with the reader the
replay side uses (`shadowlane.record.iter_file`).
"""

from __future__ import annotations

import gzip
import os
import socket
from pathlib import Path
from typing import Any

from shadowlane.record import REQUEST, RESPONSE, Payload, iter_file, payload_id, recording_files
from support.backend import RecordingBackend, Reply, pattern_bytes
from support.configs import backend_entry
from support.metrics import scrape
from support.proxy import ProxyProcess, read_http_response


def record_config(backend_url: str, rec: dict[str, Any], **route: Any) -> dict[str, Any]:
    return {
        "backends": {"b1": backend_entry(backend_url)},
        "routes": [
            {"name": "r1", "match": {"path_prefix": "/"}, "backend": "b1", "record": rec, **route}
        ],
    }


def send(port: int, raw: bytes, method: str = "GET") -> int:
    """One raw request on a fresh connection; its status."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        return read_http_response(sock, method=method, timeout=5).status


def payloads(rec_dir: Path) -> list[Payload]:
    files = recording_files([str(rec_dir)])
    assert files, f"no recording in {rec_dir}: {os.listdir(rec_dir)}"
    return [p for f in files for p in iter_file(f)]


def split(message: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    start, *lines = head.split(b"\r\n")
    headers = [(k.lower(), v.strip()) for k, _, v in (ln.partition(b":") for ln in lines)]
    return start, headers, body


def record_metrics(proxy: ProxyProcess) -> dict[str, float]:
    return scrape(proxy).by("outcome", "shadowlane_record_total", route="r1")


def test_requests_are_recorded_as_the_primary_got_them(
    backend: RecordingBackend, proxy_factory: Any, tmp_path: Path
) -> None:
    rec_dir = tmp_path / "rec"
    proxy = proxy_factory(record_config(backend.url, {"dir": str(rec_dir), "answers": True}))
    binary = bytes(range(256)) * 3 + b"\r\n\r\n\x00"
    sent = [
        b"GET /a/b?x=1&y=%20z HTTP/1.1\r\nHost: api.example\r\nX-Trace: one\r\n"
        b"X-Trace: two\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: api.example\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % len(binary) + binary,
        b"PUT /chunked HTTP/1.1\r\nHost: api.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
        b"GET /status/404 HTTP/1.1\r\nHost: api.example\r\n\r\n",
    ]
    for raw in sent:
        method = raw.split(b" ", 1)[0].decode()
        assert send(proxy.port, raw, method) in (200, 404)
    backend.wait_for_requests(len(sent))
    ids = {r.header("x-request-id") for r in backend.requests}
    metrics_before_stop = record_metrics(proxy)
    assert proxy.stop() == 0
    got = payloads(rec_dir)
    requests = [p for p in got if p.kind == REQUEST]
    answers = [p for p in got if p.kind == RESPONSE]
    assert len(requests) == len(answers) == len(sent)
    # each request is followed by its answer, same id and timestamp
    for req, ans in zip(got[::2], got[1::2], strict=True):
        assert (req.kind, ans.kind) == (REQUEST, RESPONSE)
        assert req.id == ans.id and req.ts_ns == ans.ts_ns and req.latency_ns == 0
        assert ans.latency_ns > 0
    # the payload ids are derived from the X-Request-Id the backend saw
    assert {p.id for p in requests} == {payload_id(i) for i in ids if i}
    by_target = {split(p.data)[0]: p for p in requests}
    # a GET: the head the primary got (names lower-case, duplicates and order kept, the
    # proxy's X-Forwarded-* and X-Request-Id in it), no framing added
    get = by_target[b"GET /a/b?x=1&y=%20z HTTP/1.1"].data
    seen = next(r for r in backend.requests if r.target == "/a/b?x=1&y=%20z")
    assert split(get)[1] == [(k.lower().encode(), v.encode()) for k, v in seen.headers]
    assert get.startswith(
        b"GET /a/b?x=1&y=%20z HTTP/1.1\r\nhost: api.example\r\nx-trace: one\r\nx-trace: two\r\n"
    )
    assert get.endswith(b"\r\n\r\n") and b"x-forwarded-for: 127.0.0.1\r\n" in get
    # binary bytes exactly, CRLFs inside the body included
    _, headers, body = split(by_target[b"POST /upload HTTP/1.1"].data)
    assert by_target[b"POST /upload HTTP/1.1"].data.endswith(b"\r\n\r\n" + binary)
    assert (b"content-length", str(len(binary)).encode()) in headers
    # a chunked request is recorded de-chunked, framed by Content-Length
    _, headers, body = split(by_target[b"PUT /chunked HTTP/1.1"].data)
    assert body == b"hello, world"
    assert (b"content-length", b"12") in headers
    assert all(name != b"transfer-encoding" for name, _ in headers)
    # answers: status line, the backend's headers, the body; a 404 too
    statuses = sorted(split(a.data)[0] for a in answers)
    assert statuses.count(b"HTTP/1.1 200 OK") == 3 and b"HTTP/1.1 404 Not Found" in statuses
    echo = next(a for a in answers if a.id == by_target[b"PUT /chunked HTTP/1.1"].id)
    assert b'"body": "hello, world"' in split(echo.data)[2]
    assert metrics_before_stop.get("dropped", 0) == 0


def test_percent_by_key_and_body_cap(
    backend: RecordingBackend, proxy_factory: Any, tmp_path: Path
) -> None:
    rec = {"dir": str(tmp_path / "rec"), "percent": 50, "sample_by": "header:x-user",
           "max_body": "1KiB", "gzip": False}  # fmt: skip
    proxy = proxy_factory(record_config(backend.url, rec))
    users = [f"u{i}" for i in range(40)]
    for round_ in range(2):  # each user twice: consistent sampling takes both or neither
        for u in users:
            raw = f"GET /p/{round_} HTTP/1.1\r\nHost: h\r\nX-User: {u}\r\n\r\n".encode()
            assert send(proxy.port, raw) == 200
    big = pattern_bytes(2048)
    for u in users:
        raw = b"POST /big HTTP/1.1\r\nHost: h\r\nX-User: %s\r\nContent-Length: %d\r\n\r\n"
        send(proxy.port, raw % (u.encode(), len(big)) + big, "POST")
    from support.wait import wait_until

    counts = wait_until(
        lambda: (m := record_metrics(proxy)) and sum(m.values()) >= 120 and m, 10, "120 counted"
    )
    proxy.stop()
    got = payloads(tmp_path / "rec")
    assert all(not split(p.data)[0].startswith(b"POST") for p in got), "a big body was recorded"
    per_user: dict[bytes, int] = {}
    for p in got:
        user = dict(split(p.data)[1])[b"x-user"]
        per_user[user] = per_user.get(user, 0) + 1
    assert 0 < len(per_user) < len(users), "50% by user should take some users, not all"
    assert set(per_user.values()) == {2}, "a sampled user's every request is recorded"
    assert counts["written"] == len(got)
    assert counts["sampled_out"] == 2 * (len(users) - len(per_user)) + (len(users) - len(per_user))
    assert counts["skipped_body"] == len(per_user)
    files = [n for n in os.listdir(tmp_path / "rec") if ".gor" in n and not n.endswith(".idx")]
    assert files and all(n.endswith(".gor") for n in files)  # gzip: false


def test_counts_in_metrics(backend: RecordingBackend, proxy_factory: Any, tmp_path: Path) -> None:
    rec = {"dir": str(tmp_path / "rec"), "max_body": "10B"}
    proxy = proxy_factory(record_config(backend.url, rec))
    for _ in range(5):
        send(proxy.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    for _ in range(3):
        body = b"x" * 20
        send(proxy.port, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 20\r\n\r\n" + body, "POST")
    from support.wait import wait_until

    counts = wait_until(
        lambda: (m := record_metrics(proxy)) and m.get("written", 0) >= 5 and m,
        10,
        "5 records written",
    )
    assert counts["written"] == 5 and counts["skipped_body"] == 3
    assert counts["dropped"] == 0 and counts["error"] == 0 and counts["sampled_out"] == 0
    assert "shadowlane_record_pending_bytes" in scrape(proxy).text


def test_shadow_records_its_copies_and_answers(
    backends: Any, proxy_factory: Any, tmp_path: Path
) -> None:
    primary = backends(lambda r: Reply(200, [("content-type", "text/plain")], b"primary"))
    shadow = backends(lambda r: Reply(201, [("content-type", "text/plain")], b"shadow:" + r.body))
    cfg = {
        "backends": {"p": backend_entry(primary.url), "s": backend_entry(shadow.url)},
        "routes": [
            {
                "name": "r1",
                "match": {"path_prefix": "/"},
                "backend": "p",
                "shadows": [
                    {"backend": "s", "percent": 100,
                     "record": {"dir": str(tmp_path / "srec"), "answers": True}},
                ],
            }
        ],
    }  # fmt: skip
    proxy = proxy_factory(cfg)
    for i in range(3):
        body = b"n=%d" % i
        raw = b"POST /w/%d HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (i, len(body))
        assert send(proxy.port, raw + body, "POST") == 200
    shadow.wait_for_requests(3)
    proxy.stop()
    got = payloads(tmp_path / "srec")
    assert [p.kind for p in got] == [REQUEST, RESPONSE] * 3
    names = os.listdir(tmp_path / "srec")
    assert any(n.startswith("r1@s-") for n in names), names
    for req, ans in zip(got[::2], got[1::2], strict=True):
        _, headers, body = split(req.data)
        hd = dict(headers)
        assert hd[b"x-shadowlane-shadow"] == b"r1"  # the copy as sent, marker included
        assert hd[b"host"] == b"h-shadow"
        astart, _, abody = split(ans.data)
        assert astart == b"HTTP/1.1 201 Created" and abody == b"shadow:" + body


def test_gzip_files_are_gzip_members(
    backend: RecordingBackend, proxy_factory: Any, tmp_path: Path
) -> None:
    rec_dir = tmp_path / "rec"
    proxy = proxy_factory(record_config(backend.url, {"dir": str(rec_dir), "gzip": True}))
    for i in range(10):
        send(proxy.port, f"GET /g/{i} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    proxy.stop()
    [name] = [n for n in os.listdir(rec_dir) if n.endswith(".gor.gz")]
    raw = (rec_dir / name).read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    text = gzip.decompress(raw)  # every member, concatenated
    assert text.count(b"GET /g/") == 10
    assert (rec_dir / (name + ".idx")).exists()


def test_reload_moves_recording_to_the_new_rules(
    backend: RecordingBackend, proxy_factory: Any, tmp_path: Path
) -> None:
    """A reload builds new recorders: requests after it go to the new directory with the new
    rules; the old files are closed complete (every request before the reload is in them)."""
    from support.wait import wait_until

    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    cfg = record_config(backend.url, {"dir": str(old_dir)})
    proxy = proxy_factory(cfg)
    for i in range(5):
        send(proxy.port, f"GET /before/{i} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    cfg["routes"][0]["record"] = {"dir": str(new_dir), "gzip": False,
                                  "redact": {"headers": ["x-secret"]}}  # fmt: skip
    proxy.write_config(cfg)
    proxy.reload()
    wait_until(lambda: proxy.stderr_lines("reloaded"), 10, "the reload")
    for i in range(5):
        raw = f"GET /after/{i} HTTP/1.1\r\nHost: h\r\nX-Secret: s{i}\r\n\r\n".encode()
        send(proxy.port, raw)
    assert proxy.stop() == 0
    before = [split(p.data)[0] for p in payloads(old_dir)]
    after = payloads(new_dir)
    assert before == [f"GET /before/{i} HTTP/1.1".encode() for i in range(5)]
    assert [split(p.data)[0] for p in after] == [
        f"GET /after/{i} HTTP/1.1".encode() for i in range(5)
    ]
    assert all(b"x-secret" not in p.data for p in after)
