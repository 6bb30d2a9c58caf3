"""The parts of `shadowlane replay` that decide without sending: pacing, window times, parsing
recorded messages, and which recorded requests go in which order (real files on disk).

The end-to-end behaviour against real servers is in test_replay.py.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from shadowlane.record import REQUEST, RESPONSE, Payload, encode
from shadowlane.replay.command import split_rewrite
from shadowlane.replay.messages import Invalid, parse_answer, parse_request
from shadowlane.replay.pacing import (
    MAX_SPEED,
    Pacer,
    parse_rate,
    parse_speed,
    parse_threshold,
    parse_time,
)
from shadowlane.replay.source import ANSWER_WINDOW_NS, Counts, Filters, Source, Window

S = 1_000_000_000
T0 = 1_746_100_800 * S  # 2025-05-01T12:00:00Z


# ----- pacing -----


def test_speed_scales_the_recorded_offsets_from_the_first_request() -> None:
    p = Pacer(speed=2.0)
    assert [p.due(T0 + k * S) for k in (0, 1, 3, 3, 10)] == [0.0, 0.5, 1.5, 1.5, 5.0]


def test_max_wait_caps_each_gap_and_backwards_time_is_no_gap() -> None:
    p = Pacer(speed=1.0, max_wait=2.0)
    dues = [p.due(T0 + k * S) for k in (0, 1, 100, 99, 101)]
    assert dues == [0.0, 1.0, 3.0, 3.0, 5.0]


def test_rate_ignores_the_recording_and_max_speed_is_now() -> None:
    r = Pacer(rate=4.0)
    assert [r.due(T0 + k * 7 * S) for k in range(4)] == [0.0, 0.25, 0.5, 0.75]
    m = Pacer(speed=MAX_SPEED)
    assert {m.due(T0 + k * S) for k in range(5)} == {0.0}


def test_a_new_pass_follows_the_last_request_without_a_gap() -> None:
    p = Pacer(speed=1.0)
    first = [p.due(T0 + k * S) for k in range(3)]
    p.new_pass()
    second = [p.due(T0 + k * S) for k in range(3)]
    assert first == [0.0, 1.0, 2.0] and second == [2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    ("text", "value"),
    [("1x", 1.0), ("2x", 2.0), ("2", 2.0), ("0.5x", 0.5), ("200%", 2.0), ("max", 0.0), ("0", 0.0)],
)
def test_speeds(text: str, value: float) -> None:
    assert parse_speed(text) == value


@pytest.mark.parametrize("text", ["fast", "-1x", "x", "inf", "nan"])
def test_bad_speeds_say_what_to_write(text: str) -> None:
    with pytest.raises(ValueError, match="speed"):
        parse_speed(text)


def test_rates_and_thresholds() -> None:
    assert parse_rate("50") == 50.0 and parse_rate("12.5/s") == 12.5
    with pytest.raises(ValueError):
        parse_rate("0")
    assert parse_threshold("0") == (0.0, False)
    assert parse_threshold("10") == (10.0, False)
    assert parse_threshold("0.5%") == (0.5, True)
    for bad in ("1.5", "-1", "x%", ""):
        with pytest.raises(ValueError):
            parse_threshold(bad)


# ----- window times -----


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("2025-05-01T12:00:00Z", ("at", T0)),
        ("2025-05-01T14:00:00.250+02:00", ("at", T0 + S // 4)),
        ("1746100800", ("at", T0)),
        ("1746100800.5", ("at", T0 + S // 2)),
        (str(T0 + 7), ("at", T0 + 7)),  # nanoseconds, as the payload headers write them
        ("+30s", ("offset", 30 * S)),
        ("+1m30s", ("offset", 90 * S)),
        ("+250ms", ("offset", S // 4)),
        ("+0", ("offset", 0)),
    ],
)
def test_window_times(text: str, spec: tuple[str, int]) -> None:
    assert parse_time(text) == spec


@pytest.mark.parametrize(
    ("text", "why"),
    [("2025-05-01T12:00:00", "UTC offset"), ("yesterday", "not a time"), ("+soon", "offset")],
)
def test_bad_window_times(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_time(text)


# ----- --rewrite-path -----


def test_rewrite_splits_at_the_first_equals_outside_groups_and_classes() -> None:
    assert split_rewrite(r"^/api/(.*)=/v2/\1") == (r"^/api/(.*)", r"/v2/\1")
    assert split_rewrite(r"^/a(?=b)[=]x=/y") == (r"^/a(?=b)[=]x", "/y")
    assert split_rewrite(r"^/k\=v=/kv") == (r"^/k\=v", "/kv")


# ----- recorded messages -----


def test_a_chunked_request_is_parsed_whole_and_hop_by_hop_headers_are_not_replayed() -> None:
    raw = (
        b"POST /up?x=1 HTTP/1.1\r\nHost: Prod.Example:8080\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: keep-alive, x-hop\r\nX-Hop: 1\r\nTE: trailers\r\nExpect: 100-continue\r\n"
        b"X-Request-Id: abc\r\nContent-Type: application/octet-stream\r\n\r\n"
        b"3\r\n\x00\r\n\r\n4;ext=1\r\n\xff\xfe\x00\x01\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    rec = parse_request(raw)
    req = rec.request
    assert (req.method, req.target, req.path, req.query) == ("POST", b"/up?x=1", "/up", "x=1")
    assert req.host == "prod.example" and req.request_id == "abc"
    assert rec.body == b"\x00\r\n\xff\xfe\x00\x01"
    assert [k for k, _ in rec.headers] == [b"host", b"x-request-id", b"content-type"]
    assert not rec.upgrade


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"GET / HTTP/1.1\r\nHost: a", "head is cut short"),
        (b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", "body is cut short"),
        (b"\x16\x03\x01\x02\x00binary", "not an HTTP"),
    ],
)
def test_records_that_are_not_whole_requests_are_invalid(raw: bytes, why: str) -> None:
    with pytest.raises(Invalid, match=why):
        parse_request(raw)


def test_protocol_switches_are_marked() -> None:
    ws = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert parse_request(ws).upgrade
    assert parse_request(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n").upgrade


def test_recorded_answers_become_captured_answers() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
    c = parse_answer(chunked, "GET", 0.25, 1024)
    assert (c.status, c.body, c.truncated, c.seconds, c.failure) == (200, b"abc", False, 0.25, "")
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    final = parse_answer(interim, "POST", 0, 1024)
    assert (final.status, final.body, final.headers) == (201, b"ok", [(b"content-length", b"2")])
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"
    assert parse_answer(head, "HEAD", 0, 1024).truncated is False
    cut = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", "GET", 0, 1024)
    assert cut.truncated and cut.body == b"ab"
    capped = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabcde", "GET", 0, 3)
    assert capped.truncated and capped.body == b"abc"
    until_close = parse_answer(b"HTTP/1.0 200 OK\r\n\r\nto the end", "GET", 0, 1024)
    assert until_close.body == b"to the end" and not until_close.truncated
    with pytest.raises(Invalid):
        parse_answer(b"garbage", "GET", 0, 1024)


# ----- selection, join, order -----


def _req(path: str, method: str = "GET", extra: bytes = b"") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: h\r\n%s\r\n" % (method.encode(), path.encode(), extra)


def _ans(status: int, body: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


def _write(path: Path, payloads: list[Payload], gz: bool = False) -> str:
    data = b"".join(encode(p) for p in payloads)
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def _paths(src: Source) -> list[str]:
    return [it.rec.request.path for it in src]


def _source(files: list[str], **kw: object) -> Source:
    opts: dict[str, object] = {"answers": False, "answer_limit": 1024, "by_answer_time": False}
    opts.update(kw)
    window = opts.pop("window", Window(None, None))
    filters = opts.pop("filters", Filters())
    return Source(files, window, filters, **opts)  # type: ignore[arg-type]


def test_window_is_half_open_and_offsets_count_from_the_first_record(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.gor", [Payload(REQUEST, f"r{k}", T0 + k * S, 0, _req(f"/{k}"))
                                    for k in range(10)])  # fmt: skip
    inside = _source([f], window=Window(parse_time("+3s"), parse_time("+6s")))
    assert _paths(inside) == ["/3", "/4", "/5"]
    assert inside.counts.window == 7
    absolute = _source([f], window=Window(("at", T0 + 6 * S), None))
    assert _paths(absolute) == ["/6", "/7", "/8", "/9"]


def test_filters_all_must_hold_and_each_skip_is_counted_once(tmp_path: Path) -> None:
    import re

    recs = [
        _req("/api/a", "GET", b"X-Tenant: acme\r\n"),
        _req("/api/b", "POST", b"X-Tenant: acme\r\nContent-Length: 0\r\n"),
        _req("/other", "GET", b"X-Tenant: acme\r\n"),
        _req("/api/c", "GET", b"X-Tenant: other\r\n"),
        _req("/api/d", "GET"),
        b"not http at all",
    ]
    f = _write(tmp_path / "a.gor", [Payload(REQUEST, f"r{k}", T0 + k, 0, r)
                                    for k, r in enumerate(recs)])  # fmt: skip
    flt = Filters(frozenset({"GET"}), re.compile(r"^/api/"), (("x-tenant", re.compile("^acme$")),))
    src = _source([f], filters=flt)
    assert _paths(src) == ["/api/a"]
    assert (src.counts.filtered, src.counts.invalid, src.counts.read) == (4, 1, 6)


def test_several_files_merge_by_time_gzip_included(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.gor", [Payload(REQUEST, f"a{k}", T0 + 2 * k * S, 0, _req(f"/a{k}"))
                                    for k in range(3)])  # fmt: skip
    b = _write(tmp_path / "b.gor.gz", [Payload(REQUEST, f"b{k}", T0 + (2 * k + 1) * S, 0,
                                       _req(f"/b{k}")) for k in range(3)], gz=True)  # fmt: skip
    assert _paths(_source([a, b])) == ["/a0", "/b0", "/a1", "/b1", "/a2", "/b2"]


def test_answers_are_joined_by_id_even_when_written_later(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "a.gor",
        [
            Payload(REQUEST, "x", T0, 0, _req("/x")),
            Payload(REQUEST, "y", T0 + S, 0, _req("/y")),
            Payload(RESPONSE, "y", T0 + S, 10, _ans(201, b"y")),
            Payload(REQUEST, "z", T0 + 2 * S, 0, _req("/z")),
            Payload(RESPONSE, "x", T0, 3 * S, _ans(200, b"x")),  # slow: after z started
        ],
    )
    items = list(_source([f], answers=True))
    assert [(i.rec.request.path, i.answer and i.answer.body) for i in items] == [
        ("/x", b"x"),
        ("/y", b"y"),
        ("/z", None),
    ]
    assert items[2].unanswered and items[0].answered_ns == T0 + 3 * S


def test_an_answer_is_not_waited_for_past_the_answer_window(tmp_path: Path) -> None:
    late = T0 + ANSWER_WINDOW_NS + S
    f = _write(
        tmp_path / "a.gor",
        [
            Payload(REQUEST, "x", T0, 0, _req("/x")),
            Payload(REQUEST, "y", late, 0, _req("/y")),
            Payload(RESPONSE, "x", T0, 5, _ans(200)),
        ],
    )
    items = list(_source([f], answers=True))
    assert [i.unanswered for i in items] == [True, True]


def test_writes_go_in_the_order_their_primary_answered(tmp_path: Path) -> None:
    # a starts first but answers last: live shadowing admits b, c, then a
    f = _write(
        tmp_path / "a.gor",
        [
            Payload(REQUEST, "a", T0, 0, _req("/a")),
            Payload(REQUEST, "b", T0 + 1, 0, _req("/b")),
            Payload(RESPONSE, "b", T0 + 1, 10, _ans(200)),
            Payload(REQUEST, "c", T0 + 20, 0, _req("/c")),
            Payload(RESPONSE, "c", T0 + 20, 10, _ans(200)),
            Payload(RESPONSE, "a", T0, 50, _ans(200)),
            Payload(REQUEST, "d", T0 + 100, 0, _req("/d")),
        ],
    )
    assert _paths(_source([f], answers=True, by_answer_time=True)) == ["/b", "/c", "/a", "/d"]
    assert _paths(_source([f], answers=True)) == ["/a", "/b", "/c", "/d"]


def test_counts_keep_the_selected_span(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.gor", [Payload(REQUEST, f"r{k}", T0 + k * S, 0, _req(f"/{k}"))
                                    for k in range(5)])  # fmt: skip
    counts = Counts()
    list(_source([f], counts=counts))
    assert (counts.first_ns, counts.last_ns, counts.read) == (T0, T0 + 4 * S, 5)
