"""`shadowlane replay` end to end: real recordings, real servers, the real command.

Recordings are made the way a recorder makes them: each request is sent for real to a real
server (support.backend.RecordingBackend, on 127.0.0.1 port 0) and written with its answer in
GoReplay's format (`shadowlane.record.encode`, plus one file written byte for byte from
GoReplay's documented format). Timestamps are set by the test, so the recorded spacing is
exact. The replay runs as a subprocess (`python -m shadowlane replay ...`), bounded by a
timeout; what reached the server is read from the server, not from the replay's own report,
wherever the report could lie (timing, filters, mutations, exactly-once windows).
"""

from __future__ import annotations

import gzip
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from recordings import REPLAY, T0, TIMEOUT, S, get, record
from shadowlane.record import REQUEST, Payload, encode
from support.backend import Recorded, RecordingBackend, Reply, dead_port


def replay(*args: str, timeout: float = TIMEOUT, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*REPLAY, *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def replay_json(*args: str, code: int = 0, **kw: Any) -> dict[str, Any]:
    res = replay(*args, "--format", "json", **kw)
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


class Arrivals:
    """A handler that notes when each request arrived (monotonic), then answers by default."""

    def __init__(self, reply: Callable[[Recorded], Reply] | None = None) -> None:
        self.times: list[float] = []
        self.paths: list[str] = []
        self._reply = reply
        self._lock = threading.Lock()

    def __call__(self, req: Recorded) -> Reply:
        with self._lock:
            self.times.append(time.monotonic())
            self.paths.append(req.target)
        if self._reply is not None:
            return self._reply(req)
        return Reply(headers=[("Content-Type", "text/plain")], body=b"ok")

    def span(self) -> float:
        return max(self.times) - min(self.times)


# ----- the same answers -----


def _mixed_requests(port: int) -> list[bytes]:
    host = f"127.0.0.1:{port}"
    binary = bytes(range(256)) * 3 + b"\r\n\r\n\x00"
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (b"\x00\xff", b"\r\n0\r\n", b"x"))
    return [
        get("/items?q=1&b=%20x", port),
        get("/bytes/3000", port),
        get("/chunked/4", port),
        get("/status/404", port),
        f"HEAD /bytes/100 HTTP/1.1\r\nhost: {host}\r\n\r\n".encode(),
        f"DELETE /status/204 HTTP/1.1\r\nhost: {host}\r\n\r\n".encode(),
        # echoed back: the body, headers and their order arrive as recorded
        f"POST /orders HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"x-request-id: fixed-1\r\ncontent-length: 13\r\n\r\n".encode()
        + b'{"total": 12}',
        f"PUT /blob HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/octet-stream\r\n"
        f"content-length: {len(binary)}\r\n\r\n".encode()
        + binary,
        # chunked: re-framed with a Content-Length, so it goes where the body is not echoed
        f"POST /bytes/16 HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\n\r\n".encode()
        + chunked
        + b"0\r\n\r\n",
    ]


def test_replay_against_the_same_server_gives_the_recorded_answers(tmp_path: Path) -> None:
    with RecordingBackend() as server:
        rec = tmp_path / "rec"
        rec.mkdir()
        requests = _mixed_requests(server.port)
        record(rec / "a.gor", requests, port=server.port, spacing=0.01)
        server.clear()
        store = f"sqlite:///{tmp_path / 'replay.db'}"
        doc = replay_json(
            str(rec), "--to", server.url, "--compare", "recorded", "--store", store,
            "--route", "orders",
        )  # fmt: skip
        arrived = server.requests
    n = len(requests)
    assert (doc["sent"], doc["compared"], doc["matched"], doc["differing"]) == (n, n, n, 0), doc
    assert doc["answered"] == {"2xx": n - 1, "4xx": 1} and doc["failures"] == 0 and doc["ok"]
    # binary bodies, and the chunked one de-chunked, arrived byte for byte
    bodies = {r.target: r.body for r in arrived}
    assert bodies["/blob"] == bytes(range(256)) * 3 + b"\r\n\r\n\x00"
    assert bodies["/bytes/16"] == b"\x00\xff\r\n0\r\nx"
    chunked = next(r for r in arrived if r.target == "/bytes/16")
    assert chunked.header("content-length") == "8" and chunked.header("transfer-encoding") is None
    # the store holds the comparisons: `shadowlane report` shows them
    rep = subprocess.run(
        [sys.executable, "-m", "shadowlane", "report", "--store", store, "--format", "json"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert rep.returncode == 0, rep.stderr
    rows = json.loads(rep.stdout)["comparisons"]
    assert [(r["route"], r["target"], r["compared"], r["differing"]) for r in rows] == [
        ("orders", f"127.0.0.1:{server.port}", n, 0)
    ]


def test_a_different_server_differs_and_fails_the_replay(tmp_path: Path) -> None:
    with RecordingBackend() as old:
        requests = [get(f"/item/{i}", old.port) for i in range(4)]
        record(tmp_path / "a.gor", requests, port=old.port)

    def v2(req: Recorded) -> Reply:
        return Reply(headers=[("Content-Type", "application/json")], body=b'{"v": 2}')

    with RecordingBackend(v2) as new:
        res = replay(str(tmp_path / "a.gor"), "--to", new.url, "--compare", "recorded",
                     "--format", "json")  # fmt: skip
    assert res.returncode == 1, (res.stdout, res.stderr)
    doc = json.loads(res.stdout)
    assert (doc["compared"], doc["differing"], doc["failures"], doc["ok"]) == (4, 4, 4, False)
    assert doc["examples"][0]["why"].startswith("differs: body")


def test_goreplay_files_written_by_hand_replay_old_and_new_headers(tmp_path: Path) -> None:
    """GoReplay's documented layout: `type id timestamp[ latency]\\n`, the raw message, and
    the separator line; 1.0's three-field header and the four-field one; gzip as it writes."""
    sep = "\n🐵🙈🙉\n".encode()
    body = b"\x00\x01binary\xff"
    text = (
        b"1 a1b2c3d4e5f6a7b8c9d0e1f2 1746100800000000000\n"
        b"GET /old-style HTTP/1.1\r\nHost: prod\r\n\r\n" + sep
        + b"1 0000000000000000000000ff 1746100800100000000 0\n"
        b"POST /bytes/4 HTTP/1.1\r\nHost: prod\r\nContent-Length: 9\r\n\r\n" + body + sep
        + b"2 0000000000000000000000ff 1746100800100000000 1500000\n"
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n"
        b"\r\n\x00\x01\x02\x03" + sep
        + b"1 0000000000000000000000aa 1746100800200000000 0\n"
        b"PUT /chunky HTTP/1.1\r\nHost: prod\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\n\xde\xad\xbe\xef\r\n0\r\n\r\n"  # the last record may lack its separator
    )  # fmt: skip
    (tmp_path / "requests_0.gor").write_bytes(text)
    (tmp_path / "requests_1.gor.gz").write_bytes(
        gzip.compress(b"1 bb 1746100800300000000 0\nGET /gz HTTP/1.1\r\nHost: prod\r\n\r\n" + sep)
    )
    with RecordingBackend() as server:
        doc = replay_json(str(tmp_path), "--to", server.url, "--compare", "recorded")
        arrived = {r.target: r for r in server.requests}
    assert set(arrived) == {"/old-style", "/bytes/4", "/chunky", "/gz"}
    assert arrived["/bytes/4"].body == body and arrived["/chunky"].body == b"\xde\xad\xbe\xef"
    # Host is the target's, unless --keep-host
    assert arrived["/gz"].header("host") == f"127.0.0.1:{server.port}"
    # one request had a recorded answer: compared, equal; the others had none
    assert (doc["compared"], doc["differing"], doc["unanswered"]) == (1, 0, 3), doc


def test_our_records_are_the_documented_bytes(tmp_path: Path) -> None:
    """The other direction: what we write is GoReplay's layout exactly, so GoReplay reads it."""
    p = Payload(
        REQUEST, "0123456789abcdef01234567", 1746100800000000001, 0, b"GET / HTTP/1.1\r\n\r\n"
    )
    assert encode(p) == (
        b"1 0123456789abcdef01234567 1746100800000000001 0\nGET / HTTP/1.1\r\n\r\n"
        + "\n🐵🙈🙉\n".encode()
    )


# ----- pacing -----


def test_speed_2x_takes_half_the_recorded_span(tmp_path: Path) -> None:
    arrivals = Arrivals()
    with RecordingBackend(arrivals) as server:
        record(tmp_path / "a.gor", [get(f"/p/{i}") for i in range(21)], spacing=0.1)  # 2.0 s
        doc = replay_json(str(tmp_path / "a.gor"), "--to", server.url, "--speed", "2x")
    assert len(arrivals.times) == 21 and doc["recorded_span_s"] == pytest.approx(2.0)
    assert arrivals.span() == pytest.approx(1.0, rel=0.10), arrivals.span()
    assert arrivals.paths == [f"/p/{i}" for i in range(21)]  # paced, so in recorded order


def test_speed_1x_keeps_the_recorded_spacing_and_max_does_not_wait(tmp_path: Path) -> None:
    arrivals = Arrivals()
    with RecordingBackend(arrivals) as server:
        record(tmp_path / "a.gor", [get(f"/p/{i}") for i in range(6)], spacing=0.15)  # 0.75 s
        replay_json(str(tmp_path / "a.gor"), "--to", server.url)
        assert arrivals.span() == pytest.approx(0.75, rel=0.10), arrivals.span()
        arrivals.times.clear()
        replay_json(str(tmp_path / "a.gor"), "--to", server.url, "--speed", "max")
        assert arrivals.span() < 0.25, arrivals.span()


def test_rate_sets_requests_per_second_whatever_the_recording(tmp_path: Path) -> None:
    arrivals = Arrivals()
    with RecordingBackend(arrivals) as server:
        record(tmp_path / "a.gor", [get(f"/p/{i}") for i in range(11)], spacing=5.0)  # 50 s
        doc = replay_json(str(tmp_path / "a.gor"), "--to", server.url, "--rate", "20")
    assert len(arrivals.times) == 11 and doc["rate"] > 0
    assert arrivals.span() == pytest.approx(0.5, rel=0.10), arrivals.span()  # 10 gaps / 20


def test_max_wait_shortens_long_gaps(tmp_path: Path) -> None:
    arrivals = Arrivals()
    with RecordingBackend(arrivals) as server:
        record(tmp_path / "a.gor", [get(f"/p/{i}") for i in range(3)], spacing=30.0)
        replay_json(str(tmp_path / "a.gor"), "--to", server.url, "--max-wait", "200ms")
    assert arrivals.span() == pytest.approx(0.4, rel=0.15), arrivals.span()


# ----- windows and loops -----


def test_from_until_replays_a_window_exactly_once(tmp_path: Path) -> None:
    f = tmp_path / "a.gor"
    record(f, [get(f"/r/{i}") for i in range(30)], spacing=1.0)
    with RecordingBackend() as server:
        fast = ("--to", server.url, "--speed", "max", "--concurrency", "1")
        doc = replay_json(str(f), *fast, "--from", "+10s", "--until", "+20s")
        assert sorted(r.target for r in server.requests) == sorted(f"/r/{i}" for i in range(10, 20))
        assert doc["sent"] == 10 and doc["skipped"] == {"window": 20}
        # the same window written as an epoch time and an RFC 3339 time
        server.clear()
        replay_json(str(f), *fast, "--from", "1746100810", "--until", "2025-05-01T12:00:20Z")
        assert [r.target for r in server.requests] == [f"/r/{i}" for i in range(10, 20)]
        # adjacent windows split the recording without a request twice or lost: [from, until)
        server.clear()
        for a, b in (("+0s", "+7s"), ("+7s", "+19.5s"), ("+19.5s", "+1h")):
            replay_json(str(f), *fast, "--from", a, "--until", b)
        assert [r.target for r in server.requests] == [f"/r/{i}" for i in range(30)]


def test_loop_repeats_until_its_bound(tmp_path: Path) -> None:
    f = tmp_path / "a.gor"
    record(f, [get(f"/r/{i}") for i in range(10)], spacing=0.001)
    with RecordingBackend() as server:
        doc = replay_json(str(f), "--to", server.url, "--loop", "--max-requests", "25",
                          "--speed", "max", "--concurrency", "1")  # fmt: skip
        assert [r.target for r in server.requests] == [f"/r/{i % 10}" for i in range(25)]
        assert (doc["sent"], doc["passes"]) == (25, 3)
        assert doc["stopped"] == "--max-requests 25 reached"
        server.clear()
        t = time.monotonic()
        doc = replay_json(str(f), "--to", server.url, "--loop", "--rate", "40",
                          "--duration", "1s")  # fmt: skip
        assert time.monotonic() - t < 15
        assert 35 <= len(server.requests) <= 41 and doc["sent"] == len(server.requests)


def test_sigint_stops_an_endless_loop_with_a_summary(tmp_path: Path) -> None:
    f = tmp_path / "a.gor"
    record(f, [get(f"/r/{i}") for i in range(5)], spacing=0.001)
    with RecordingBackend() as server:
        proc = subprocess.Popen(
            [*REPLAY, str(f), "--to", server.url, "--loop", "--rate", "100", "--format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            server.wait_for(lambda b: len(b.requests) >= 20, timeout=15)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        assert proc.returncode == 0, err
        doc = json.loads(out)
        assert doc["stopped"] == "stopped by SIGINT"
        assert doc["sent"] == len(server.requests) >= 20


def test_a_second_sigint_abandons_requests_in_flight(tmp_path: Path) -> None:
    f = tmp_path / "a.gor"
    record(f, [get("/hang")])
    with RecordingBackend() as server:
        proc = subprocess.Popen(
            [*REPLAY, str(f), "--to", server.url, "--loop", "--rate", "50", "--timeout", "60s",
             "--format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            server.wait_for(lambda b: len(b.requests) >= 5, timeout=15)
            proc.send_signal(signal.SIGINT)
            # two signals sent at once may merge into one pending signal: let the first land
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            t = time.monotonic()
            out, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        assert time.monotonic() - t < 10, "waited for the hung requests' 60 s timeout"
        doc = json.loads(out)
        assert doc["stopped"].startswith("stopped by SIGINT twice:"), doc["stopped"]
        assert "abandoned" in doc["stopped"] and "Traceback" not in err, err


# ----- filters and mutations -----


def test_filters_choose_what_is_replayed(tmp_path: Path) -> None:
    reqs = [
        get("/api/keep", extra="x-tenant: acme\r\n"),
        get("/api/other-tenant", extra="x-tenant: acme-2\r\n"),
        get("/web/keep-not", extra="x-tenant: acme\r\n"),
        b"POST /api/post HTTP/1.1\r\nhost: h\r\nx-tenant: acme\r\ncontent-length: 0\r\n\r\n",
        get("/api/no-tenant"),
        get("/api/keep-2", extra="x-tenant: acme\r\n"),
    ]
    record(tmp_path / "a.gor", reqs)
    with RecordingBackend() as server:
        doc = replay_json(str(tmp_path / "a.gor"), "--to", server.url, "--speed", "max",
                          "--concurrency", "1", "--method", "GET", "--path-regex", "^/api/",
                          "--header", "X-Tenant: ^acme$")  # fmt: skip
        assert [r.target for r in server.requests] == ["/api/keep", "/api/keep-2"]
    assert doc["skipped"] == {"filtered": 4}


def test_mutations_reach_the_server(tmp_path: Path) -> None:
    raw = (
        b"POST /api/orders/7?x=1 HTTP/1.1\r\nhost: prod.example.com\r\nauthorization: secret\r\n"
        b"connection: keep-alive, x-hop\r\nx-hop: 1\r\nkeep-alive: timeout=5\r\n"
        b"x-keep: yes\r\ncontent-length: 2\r\n\r\nhi"
    )
    record(tmp_path / "a.gor", [raw])
    with RecordingBackend() as server:
        replay_json(str(tmp_path / "a.gor"), "--to", server.url,
                    "--rewrite-path", r"^/api/(.*)=/v2/\1", "--set-header", "x-env: staging",
                    "--remove-header", "authorization", "--host", "orders.test")  # fmt: skip
        replay_json(str(tmp_path / "a.gor"), "--to", server.url, "--keep-host")
        mutated, kept = server.requests
    assert mutated.target == "/v2/orders/7?x=1" and mutated.body == b"hi"
    names = [k.lower() for k, _ in mutated.headers]
    assert mutated.header("host") == "orders.test" and mutated.header("x-env") == "staging"
    assert mutated.header("x-keep") == "yes"
    for gone in ("authorization", "x-hop", "keep-alive", "x-shadowlane-shadow"):
        assert gone not in names, (gone, mutated.headers)
    assert kept.target == "/api/orders/7?x=1" and kept.header("host") == "prod.example.com"
    assert kept.header("authorization") == "secret"


# ----- exit status and output -----


def test_could_not_run_is_exit_2_naming_what_failed(tmp_path: Path) -> None:
    good = tmp_path / "a.gor"
    record(good, [get("/x")])
    (tmp_path / "bad.gor").write_bytes(b"this is not a recording\n")
    (tmp_path / "empty").mkdir()
    port = dead_port()
    cases = [
        ((str(tmp_path / "missing.gor"), "--to", "http://127.0.0.1:1"), "missing.gor: no such"),
        ((str(tmp_path / "bad.gor"), "--to", "http://127.0.0.1:1"), "not a GoReplay payload"),
        ((str(tmp_path / "empty"), "--to", "http://127.0.0.1:1"), "no recordings in it"),
        ((str(good),), "where to?"),
        ((str(good), "--to", "ftp://x"), "--to: "),
        ((str(good), "--to", "http://127.0.0.1:1", "--speed", "fast"), "not a speed"),
        ((str(good), "--to", "http://127.0.0.1:1", "--from", "noon"), "not a time"),
        ((str(good), "--to", "http://127.0.0.1:1", "--secondary", "http://a:1"), "needs --primary"),
        ((str(good), "--to", f"http://127.0.0.1:{port}"), f"cannot reach --to http://127.0.0.1:{port}"),
        ((str(good), "--to", "http://127.0.0.1:1", "--shadow", "s"), "--shadow needs -c"),
    ]  # fmt: skip
    for args, message in cases:
        res = replay(*args)
        assert res.returncode == 2, (args, res.returncode, res.stdout, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
        assert res.stdout == "", (args, res.stdout)


def test_failures_over_the_threshold_exit_1(tmp_path: Path) -> None:
    f = tmp_path / "a.gor"
    record(f, [get("/ok/1"), get("/reset"), get("/ok/2"), get("/hang"), get("/ok/3")])
    with RecordingBackend() as server:
        base = (str(f), "--to", server.url, "--speed", "max", "--timeout", "500ms")
        doc = replay_json(*base, code=1)
        assert (doc["sent"], doc["errors"], doc["timeouts"], doc["failures"]) == (5, 1, 1, 2)
        assert {e["uri"] for e in doc["examples"]} == {"/reset", "/hang"}
        assert replay_json(*base, "--max-failures", "2")["exit"] == 0
        assert replay_json(*base, "--max-failures", "1", code=1)["exit"] == 1
        assert replay_json(*base, "--max-failures", "40%")["ok"] is True
        assert replay_json(*base, "--max-failures", "39%", code=1)["ok"] is False


def test_json_summary_shape_and_text_summary(tmp_path: Path) -> None:
    f = tmp_path / "a.gor"
    record(f, [get("/a"), get("/status/500"), b"garbage"], spacing=0.01)
    with RecordingBackend() as server:
        doc = replay_json(str(f), "--to", server.url)
        text = replay(str(f), "--to", server.url)
    assert set(doc) == {
        "ok", "exit", "sent", "answered", "errors", "timeouts", "target", "skipped",
        "compared", "matched", "noise", "differing", "unanswered", "divergences", "unchecked",
        "failures", "max_failures", "duration_s", "send_span_s", "recorded_span_s", "rate",
        "max_lag_s", "passes", "store", "examples",
    }  # fmt: skip
    assert doc["answered"] == {"2xx": 1, "5xx": 1} and doc["skipped"] == {"invalid": 1}
    assert doc["ok"] and doc["exit"] == 0 and doc["target"] == server.url
    assert text.returncode == 0 and text.stderr == ""
    assert text.stdout.startswith(f"replayed 2 request(s) to {server.url}")
    assert "answered   2xx 1, 5xx 1" in text.stdout and "ok: 0 failure(s)" in text.stdout


def test_dry_run_counts_and_sends_nothing(tmp_path: Path) -> None:
    f = tmp_path / "a.gor"
    post = b"POST /p HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n"
    record(f, [get("/a"), post, get("/b")], spacing=2.0)
    res = replay(str(f), "--dry-run", "--speed", "2x", "--format", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["requests"], doc["methods"], doc["recorded_span_s"]) == (
        3,
        {"GET": 2, "POST": 1},
        4.0,
    )
    assert doc["expected_duration_s"] == pytest.approx(2.0)


def test_progress_bar_only_on_a_terminal(tmp_path: Path) -> None:
    f = tmp_path / "a.gor"
    record(f, [get(f"/p/{i}") for i in range(6)], spacing=0.15)
    with RecordingBackend() as server:
        master, slave = pty.openpty()
        try:
            proc = subprocess.run([*REPLAY, str(f), "--to", server.url], stdout=subprocess.PIPE,
                                  stderr=slave, timeout=TIMEOUT)  # fmt: skip
            os.close(slave)
            slave = -1
            seen = b""
            while select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal's other side is closed and drained
                    break
                if not chunk:
                    break
                seen += chunk
        finally:
            if slave >= 0:
                os.close(slave)
            os.close(master)
        plain = replay(str(f), "--to", server.url, "--speed", "max")
    assert proc.returncode == 0
    text = seen.decode()
    assert "/6" in text and "/s" in text and "ETA" in text and "errors 0" in text, text
    assert "[####################] 6/6 100%" in text, text
    assert plain.stderr == ""  # not a terminal: nothing


# ----- live comparison: primary, secondary, candidate -----


def _versioned(price: int) -> Callable[[Recorded], Reply]:
    def handler(req: Recorded) -> Reply:
        body = {"path": req.target, "price": price, "nonce": os.urandom(6).hex()}
        return Reply(headers=[("Content-Type", "application/json")], body=json.dumps(body).encode())

    return handler


def test_live_primary_and_secondary_compare_into_the_store_for_report(tmp_path: Path) -> None:
    f = tmp_path / "a.gor"
    record(f, [get(f"/item/{i}") for i in range(20)], spacing=0.001)
    store = f"sqlite:///{tmp_path / 'live.db'}"
    with (
        RecordingBackend(_versioned(10)) as primary,
        RecordingBackend(_versioned(10)) as secondary,
        RecordingBackend(_versioned(12)) as candidate,
    ):
        doc = replay_json(
            str(f), "--to", candidate.url, "--primary", primary.url, "--secondary",
            secondary.url, "--store", store, "--speed", "max", "--max-failures", "100%",
        )  # fmt: skip
        assert len(primary.requests) == len(secondary.requests) == len(candidate.requests) == 20
        # the primary and the secondary get the recorded request with their own Host
        assert primary.requests[0].header("host") == f"127.0.0.1:{primary.port}"
    assert (doc["compared"], doc["differing"], doc["failures"]) == (20, 20, 20)
    assert doc["primary"]["answered"] == {"2xx": 20} and doc["secondary"]["sent"] == 20
    rep = subprocess.run(
        [sys.executable, "-m", "shadowlane", "report", "--store", store, "--format", "json"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert rep.returncode == 0, rep.stderr
    (row,) = json.loads(rep.stdout)["comparisons"]
    assert (row["route"], row["target"], row["compared"]) == (
        "replay",
        f"127.0.0.1:{candidate.port}",
        20,
    )
    fields = {f["field"]: f for f in row["fields"]}
    assert fields["body.price"]["reported"] and fields["body.price"]["raw"] == 20
    assert not fields["body.nonce"]["reported"] and fields["body.nonce"]["noise"] == 20
    text = subprocess.run(
        [sys.executable, "-m", "shadowlane", "report", "--store", store],
        capture_output=True, text=True, timeout=TIMEOUT,
    ).stdout  # fmt: skip
    assert "body.price" in text and "replay" in text


def test_recordings_of_several_instances_replay_merged_by_time(tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    record(rec / "i1.gor", [get(f"/a/{i}") for i in range(5)], spacing=2.0, prefix="a")
    record(rec / "i2.gor.gz", [get(f"/b/{i}") for i in range(5)], spacing=2.0,
           start=T0 + S, prefix="b", gz=True)  # fmt: skip
    with RecordingBackend() as server:
        doc = replay_json(str(rec), "--to", server.url, "--speed", "max", "--concurrency", "1")
        got = [r.target for r in server.requests]
    assert got == [p for i in range(5) for p in (f"/a/{i}", f"/b/{i}")]
    assert doc["recorded_span_s"] == pytest.approx(9.0)


def test_to_backend_and_route_from_a_config(tmp_path: Path) -> None:
    with RecordingBackend() as server:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            "backends:\n"
            f"  v1: {{endpoints: ['http://127.0.0.1:{dead_port()}']}}\n"
            f"  v2: {{endpoints: ['{server.url}']}}\n"
            "routes:\n"
            "  - {name: api, match: {path_prefix: /api}, backend: v1}\n"
            "  - {name: rest, backend: v1}\n"
        )
        record(tmp_path / "a.gor", [get("/api/1"), get("/web/1"), get("/api/2")])
        doc = replay_json(str(tmp_path / "a.gor"), "-c", str(cfg), "--to-backend", "v2",
                          "--route", "api", "--speed", "max", "--concurrency", "1")  # fmt: skip
        assert [r.target for r in server.requests] == ["/api/1", "/api/2"]
    assert doc["skipped"] == {"not_routed": 1} and doc["target"] == "v2"


def test_as_a_configured_shadow_requests_are_routed_and_changed_like_its_copies(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "c.yaml"
    dead = f"http://127.0.0.1:{dead_port()}"
    with RecordingBackend() as server:
        cfg.write_text(
            "backends:\n"
            f"  v1: {{endpoints: ['{dead}']}}\n"
            f"  s: {{endpoints: ['{server.url}']}}\n"
            "routes:\n"
            "  - name: api\n"
            "    match: {path_prefix: /api}\n"
            "    backend: v1\n"
            "    shadows:\n"
            "      - backend: s\n"
            "        rewrite_path: {regex: '^/api/(.*)', replacement: '/v2/\\1'}\n"
            "        headers: {set: {x-shadow-env: staging}, remove: [authorization]}\n"
            "        max_body: 10\n"
            "  - name: web\n"
            "    match: {path_prefix: /web}\n"
            "    backend: v1\n"
            "    shadows: [{backend: s, match: {methods: [POST]}, host_suffix: ''}]\n"
            "  - {name: other, backend: v1}\n"
        )
        big = b"POST /api/big HTTP/1.1\r\nhost: prod.example.com\r\ncontent-length: 11\r\n\r\n"
        record(
            tmp_path / "a.gor",
            [
                get("/api/x", extra="authorization: secret\r\n"),
                get("/web/a"),
                b"POST /web/b HTTP/1.1\r\nhost: prod.example.com\r\ncontent-length: 1\r\n\r\nb",
                get("/other"),
                big + b"hello world",
            ],
        )
        doc = replay_json(str(tmp_path / "a.gor"), "-c", str(cfg), "--shadow", "s",
                          "--speed", "max", "--concurrency", "1")  # fmt: skip
        api, web = server.requests
    assert doc["skipped"] == {"not_routed": 2, "skipped_body": 1} and doc["target"] == "s"
    assert api.target == "/v2/x" and api.header("x-shadowlane-shadow") == "api"
    assert api.header("host") == "prod.example.com-shadow" and api.header("authorization") is None
    assert api.header("x-shadow-env") == "staging"
    assert web.target == "/web/b" and web.header("x-shadowlane-shadow") == "web"
    assert web.header("host") == "prod.example.com"


def test_compare_settings_come_from_the_config(tmp_path: Path) -> None:
    def answer(req: Recorded) -> Reply:
        body = {"path": req.target, "nonce": os.urandom(4).hex()}
        return Reply(headers=[("Content-Type", "application/json")], body=json.dumps(body).encode())

    with RecordingBackend(answer) as server:
        record(tmp_path / "a.gor", [get(f"/api/{i}", server.port) for i in range(5)],
               port=server.port)  # fmt: skip
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"backends: {{v1: {{endpoints: ['{server.url}']}}}}\n"
            "routes:\n"
            "  - name: api\n"
            "    backend: v1\n"
            "    compare: {ignore: [body.nonce]}\n"
        )
        base = (str(tmp_path / "a.gor"), "--to", server.url, "--compare", "recorded")
        plain = replay_json(*base, code=1)
        configured = replay_json(*base, "-c", str(cfg), "--route", "api",
                                 "--store", f"sqlite:///{tmp_path / 'r.db'}")  # fmt: skip
    assert (plain["compared"], plain["differing"]) == (5, 5)
    assert (configured["compared"], configured["matched"], configured["differing"]) == (5, 5, 0)
