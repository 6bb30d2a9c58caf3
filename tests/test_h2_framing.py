"""The listener's HTTP/2 framing (wire/h2_framing.py) against the `h2` library's client.

The framing replaced h2 on the server side for speed; h2 stays its oracle. An h2 client (the
library, unchanged) talks to `ServerFraming` byte for byte: whatever the client does that
RFC 9113 allows, the server hears as the client meant it and answers in frames the client
accepts (h2 raises on anything it finds wrong); whatever a broken client sends (raw frames,
built with hyperframe) ends in a GOAWAY naming the RFC's error and an `H2Error`, or in the
single stream's refusal where the RFC allows one. The end-to-end tests (test_http2.py, curl,
h2load, grpcio) run the same code over real sockets; this file walks the corners they do not
reach, quickly and deterministically, and by hypothesis over random client behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    DataReceived as ClientData,
)
from h2.events import (
    ResponseReceived,
    SettingsAcknowledged,
)
from h2.events import (
    StreamEnded as ClientEnded,
)
from h2.events import (
    TrailersReceived as ClientTrailers,
)
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shadowlane.wire.h2_framing import (
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    NO_ERROR,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_CLOSED,
    ClientFraming,
    ConnectionTerminated,
    DataReceived,
    Event,
    H2Error,
    RequestReceived,
    ServerFraming,
    SettingsChanged,
    StreamEnded,
    StreamGone,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from shadowlane.wire.h2_framing import (
    ResponseReceived as ResponseHead,
)
from shadowlane.wire.hpack import Encoder

WINDOW = 1 << 20
HEAD = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/p")]


def h2_answer(
    srv: Any,
    sid: int,
    head: list[tuple[bytes, bytes]],
    body: bytes,
    trailers: list[tuple[bytes, bytes]] | None,
    exchange: Callable[[], None],
) -> None:
    """An h2 server connection `srv` answers `sid` as a server does: `head`, DATA within the
    windows (`exchange()` between tries, so WINDOW_UPDATEs come), trailers or an empty
    END_STREAM."""
    srv.send_headers(sid, head, end_stream=False)
    out = bytearray(body)
    for _ in range(10_000):
        while out:
            room = min(srv.local_flow_control_window(sid), srv.max_outbound_frame_size)
            if room <= 0:
                break
            chunk = bytes(out[:room])
            del out[:room]
            srv.send_data(sid, chunk, end_stream=not out and trailers is None)
        exchange()
        if not out:
            break
    assert not out, "the answer never fit the windows"
    if trailers is not None:
        srv.send_headers(sid, trailers, end_stream=True)
    elif not body:
        srv.end_stream(sid)
    exchange()


@dataclass
class Heard:
    """What the server side heard, per stream."""

    heads: dict[int, list[tuple[bytes, bytes]]] = field(default_factory=dict)
    bodies: dict[int, bytearray] = field(default_factory=dict)
    trailers: dict[int, list[tuple[bytes, bytes]]] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)
    reset: dict[int, int] = field(default_factory=dict)
    windows: int = 0
    goaway: int | None = None


class Pair:
    """An h2 client and our server framing, wired back to back in memory."""

    def __init__(self, max_streams: int = 128, client_settings: dict[int, int] | None = None):
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        if client_settings:
            self.client.update_settings(client_settings)
        self.server = ServerFraming(max_streams, 65536, WINDOW)
        self.server.initiate_connection()
        self.server.increment_flow_control_window((16 << 20) - 65535)
        self.heard = Heard()
        self.client_events: list[object] = []
        self.exchange()

    def to_server(self, data: bytes) -> list[Event]:
        events = self.server.receive_data(data)
        h = self.heard
        for ev in events:
            sid = ev.stream_id
            if isinstance(ev, RequestReceived):
                h.heads[sid] = ev.headers
                h.bodies[sid] = bytearray()
            elif isinstance(ev, DataReceived):
                h.bodies[sid] += ev.data
                self.server.acknowledge_received_data(ev.flow_length, sid)
            elif isinstance(ev, TrailersReceived):
                h.trailers[sid] = ev.headers
            elif isinstance(ev, StreamEnded):
                h.ended.add(sid)
            elif isinstance(ev, StreamReset):
                h.reset[sid] = ev.error_code
            elif isinstance(ev, WindowUpdated):
                h.windows += 1
            elif isinstance(ev, ConnectionTerminated):
                h.goaway = ev.last_stream_id
        return events

    def exchange(self) -> None:
        """Move bytes both ways until neither side has anything to say."""
        for _ in range(100):
            c = self.client.data_to_send()
            if c:
                self.to_server(c)
            s = self.server.data_to_send()
            if s:
                for ev in self.client.receive_data(s):
                    self.client_events.append(ev)
                    if isinstance(ev, ClientData):
                        self.client.acknowledge_received_data(
                            ev.flow_controlled_length, ev.stream_id
                        )
            if not c and not s:
                return
        raise AssertionError("the two sides never went quiet")

    def answer(self, sid: int, body: bytes, trailers: list[tuple[bytes, bytes]] | None = None):
        """Send an answer as the server's connection does: head, DATA within the windows
        (re-tried as WINDOW_UPDATEs come), trailers or an empty END_STREAM."""
        head = [(b":status", b"200"), (b"x-a", b"1")]
        h2_answer(self.server, sid, head, body, trailers, self.exchange)

    def client_answers(self) -> dict[int, bytes]:
        bodies: dict[int, bytearray] = {}
        for ev in self.client_events:
            if isinstance(ev, ResponseReceived):
                bodies[ev.stream_id] = bytearray()
            elif isinstance(ev, ClientData):
                bodies[ev.stream_id] += ev.data
        return {sid: bytes(b) for sid, b in bodies.items()}

    def ended_for_client(self) -> set[int]:
        return {ev.stream_id for ev in self.client_events if isinstance(ev, ClientEnded)}

    def send_body(self, sid: int, body: bytes, pad: int = 0) -> None:
        out = bytearray(body)
        for _ in range(10_000):
            while out:
                room = min(
                    self.client.local_flow_control_window(sid),
                    self.client.max_outbound_frame_size,
                ) - (pad + 1 if pad else 0)
                if room <= 0:
                    break
                chunk = bytes(out[:room])
                del out[:room]
                self.client.send_data(sid, chunk, end_stream=not out, pad_length=pad or None)
            self.exchange()
            if not out:
                return
        raise AssertionError("the upload never fit the windows")


def test_requests_bodies_and_answers_both_ways_within_the_windows() -> None:
    """Five streams upload 300 KiB each (padded DATA on one) and get 200 KiB back each: every
    byte arrives, the server never lets a window go negative, and the client's h2 takes every
    frame of ours."""
    p = Pair(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    sids = []
    for i in range(5):
        sid = p.client.get_next_available_stream_id()
        p.client.send_headers(sid, [*HEAD, (b"x-i", b"%d" % i)])
        sids.append(sid)
    for i, sid in enumerate(sids):
        p.send_body(sid, bytes([i]) * 300_000, pad=7 if i == 2 else 0)
    for i, sid in enumerate(sids):
        assert p.heard.heads[sid][-1] == (b"x-i", b"%d" % i)
        assert bytes(p.heard.bodies[sid]) == bytes([i]) * 300_000
        assert sid in p.heard.ended
        p.answer(sid, bytes([i + 1]) * 200_000)
    assert p.client_answers() == {sid: bytes([i + 1]) * 200_000 for i, sid in enumerate(sids)}
    assert p.ended_for_client() == set(sids)
    assert p.server.streams == {}  # both sides ended: every stream left the table


def test_trailers_continuation_and_a_big_header_table() -> None:
    """Request trailers; a header block of 40 KiB (the client splits it into HEADERS and
    CONTINUATIONs); answer trailers; a client that shrinks our HPACK table."""
    p = Pair(client_settings={SettingCodes.HEADER_TABLE_SIZE: 256})
    sid = p.client.get_next_available_stream_id()
    big = [(b"x-big-%d" % i, b"v" * 1000) for i in range(40)]
    p.client.send_headers(sid, [*HEAD, *big])
    p.client.send_data(sid, b"abc")
    p.client.send_headers(sid, [(b"x-trailer", b"t")], end_stream=True)
    p.exchange()
    assert p.heard.heads[sid][4:] == big
    assert p.heard.trailers[sid] == [(b"x-trailer", b"t")]
    assert bytes(p.heard.bodies[sid]) == b"abc" and sid in p.heard.ended
    p.answer(sid, b"body", trailers=[(b"grpc-status", b"0")])
    trailers = [ev for ev in p.client_events if isinstance(ev, ClientTrailers)]
    assert [list(t.headers) for t in trailers] == [[(b"grpc-status", b"0")]]
    # answers bigger than the client's frame size are cut into HEADERS + CONTINUATION
    sid2 = p.client.get_next_available_stream_id()
    p.client.send_headers(sid2, HEAD, end_stream=True)
    p.exchange()
    p.server.send_headers(sid2, [(b":status", b"200"), *big], end_stream=True)
    p.exchange()
    heads = [ev for ev in p.client_events if isinstance(ev, ResponseReceived)]
    assert list(heads[-1].headers)[1:] == big


def test_ping_settings_and_a_grown_window_wake_the_streams() -> None:
    p = Pair(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 10})
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, HEAD, end_stream=True)
    p.exchange()
    assert p.server.local_flow_control_window(sid) == 10
    p.client.ping(b"12345678")
    p.exchange()
    assert any(type(ev).__name__ == "PingAckReceived" for ev in p.client_events)
    assert any(isinstance(ev, SettingsAcknowledged) for ev in p.client_events)
    before = p.heard.windows
    p.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100_000})
    p.exchange()
    assert p.heard.windows == before + 1  # the stream windows grew: the server hears it
    assert p.server.streams[sid].send_window == 100_000
    assert p.server.local_flow_control_window(sid) == 65535  # the connection's is smaller


def test_streams_past_the_limit_are_refused_alone_and_the_hpack_table_stays_in_step() -> None:
    """A client that ignores SETTINGS_MAX_CONCURRENT_STREAMS gets that one stream refused; the
    refused block is still decoded, so a later block that indexes its fields reads right."""
    srv = ServerFraming(2, 65536, WINDOW)
    srv.initiate_connection()
    enc = Encoder()  # one encoder for the whole connection, as a client's is
    fields = [*HEAD, (b"x-same", b"indexed")]

    def headers(sid: int) -> bytes:
        return _raw(0x1, 0x4, sid, enc.encode(fields))

    heard = srv.receive_data(
        PREFACE + SettingsFrame(0).serialize() + headers(1) + headers(3) + headers(5)
    )
    assert [ev.stream_id for ev in heard if isinstance(ev, RequestReceived)] == [1, 3]
    resets = [(sid, payload) for t, _, sid, payload in _frames(srv.data_to_send()) if t == 0x3]
    assert resets == [(5, REFUSED_STREAM.to_bytes(4, "big"))]
    # the client resets stream 1, opens 7 with a block that indexes what 5's block added
    heard = srv.receive_data(RstStreamFrame(1).serialize() + headers(7))
    assert [type(ev).__name__ for ev in heard] == ["StreamReset", "RequestReceived"]
    request = heard[1]
    assert isinstance(request, RequestReceived) and request.headers == fields


def test_late_frames_on_a_stream_we_reset_are_ignored_and_the_window_comes_back() -> None:
    p = Pair()
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, HEAD)
    p.exchange()
    p.server.reset_stream(sid, NO_ERROR)
    assert [t for t, *_ in _frames(p.server.data_to_send())] == [0x3]
    window = p.server.conn_recv_window + p.server.conn_pending
    # the client sent these before it read the reset
    data = b"".join(
        f.serialize()
        for f in (_data(sid, b"x" * 9000), _data(sid, b"y" * 9000, end=True), _wu(sid, 5))
    )
    assert p.server.receive_data(data) == []
    assert p.server.data_to_send() == b""  # no second RST_STREAM, no error
    # the connection window lost nothing: the bytes are owed back, as if the app took them
    assert p.server.conn_recv_window + p.server.conn_pending == window
    with pytest.raises(StreamGone):
        p.server.send_data(sid, b"late")
    p.server.reset_stream(sid, NO_ERROR)  # a second reset is a no-op
    assert p.server.data_to_send() == b""


def test_client_reset_and_goaway_reach_the_server() -> None:
    p = Pair()
    a = p.client.get_next_available_stream_id()
    p.client.send_headers(a, HEAD)
    p.exchange()
    p.client.reset_stream(a, 8)
    p.exchange()
    assert p.heard.reset == {a: 8}
    assert a not in p.server.streams
    p.client.close_connection(last_stream_id=0)
    p.exchange()
    assert p.heard.goaway == 0


# -- broken clients: raw frames -----------------------------------------------------------------


def _data(sid: int, body: bytes, end: bool = False) -> DataFrame:
    f = DataFrame(sid)
    f.data = body
    if end:
        f.flags.add("END_STREAM")
    return f


def _wu(sid: int, n: int) -> WindowUpdateFrame:
    f = WindowUpdateFrame(sid)
    f.window_increment = n
    return f


def _headers(sid: int, fields: list[tuple[bytes, bytes]], *flags: str) -> HeadersFrame:
    f = HeadersFrame(sid)
    f.data = Encoder().encode(fields)
    for flag in flags:
        f.flags.add(flag)
    return f


def _started() -> ServerFraming:
    srv = ServerFraming(128, 65536, WINDOW)
    srv.initiate_connection()
    srv.increment_flow_control_window((16 << 20) - 65535)
    srv.receive_data(PREFACE + SettingsFrame(0).serialize())
    srv.data_to_send()
    return srv


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of each frame the server sent."""
    out = []
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big")
        out.append((data[pos + 3], data[pos + 4], sid, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    assert pos == len(data), "a frame cut short"
    return out


def _goaway_code(data: bytes) -> int:
    """The error code of the GOAWAY at the end of what the server sent."""
    last = _frames(data)[-1]
    assert last[0] == 0x7, "the last frame is no GOAWAY"
    return int.from_bytes(last[3][4:8], "big")


def _settings(**values: int) -> SettingsFrame:
    f = SettingsFrame(0)
    for name, value in values.items():
        f.settings[getattr(SettingCodes, name)] = value
    return f


def _raw(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
    )


def _split_block(fields: list[tuple[bytes, bytes]]) -> list[bytes]:
    """One header block as HEADERS and CONTINUATION frames of 16 KiB (stream 1)."""
    block = Encoder().encode(fields)
    pieces = [block[i : i + 16384] for i in range(0, len(block), 16384)]
    return [
        _raw(0x1 if i == 0 else 0x9, 0x4 if i == len(pieces) - 1 else 0, 1, piece)
        for i, piece in enumerate(pieces)
    ]


OPEN_1 = [_headers(1, HEAD, "END_HEADERS")]
CONNECTION_ERRORS: list[tuple[str, list[Frame | bytes], int]] = [
    ("DATA on stream 0", [_raw(0x0, 0, 0, b"x")], PROTOCOL_ERROR),
    ("DATA on an idle stream", [_data(1, b"x")], PROTOCOL_ERROR),
    ("HEADERS on stream 0", [_raw(0x1, 0x4, 0, Encoder().encode(HEAD))], PROTOCOL_ERROR),
    ("an even stream id", [_headers(2, HEAD, "END_HEADERS")], PROTOCOL_ERROR),
    (
        "a stream id going down",
        [_headers(5, HEAD, "END_HEADERS", "END_STREAM"), _headers(3, HEAD, "END_HEADERS")],
        STREAM_CLOSED,
    ),
    (
        "DATA after END_STREAM",
        [_headers(1, HEAD, "END_HEADERS", "END_STREAM"), _data(1, b"x")],
        STREAM_CLOSED,
    ),
    ("an interrupted header block", [_headers(1, HEAD), _data(1, b"x")], PROTOCOL_ERROR),
    ("CONTINUATION out of nowhere", [ContinuationFrame(1)], PROTOCOL_ERROR),
    (
        "a block that is no HPACK",
        [_raw(0x1, 0x4, 1, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")],
        COMPRESSION_ERROR,
    ),
    (
        "a header list past the limit",
        _split_block([*HEAD, (b"x", b"v" * 70000)]),
        ENHANCE_YOUR_CALM,
    ),
    (
        "a header block without end",
        [_headers(1, HEAD), *[ContinuationFrame(1, data=b"\x00" * 16384) for _ in range(9)]],
        ENHANCE_YOUR_CALM,
    ),
    (
        "trailers without END_STREAM",
        [*OPEN_1, _headers(1, [(b"x", b"1")], "END_HEADERS")],
        PROTOCOL_ERROR,
    ),
    ("a frame larger than 16 KiB", [_raw(0x0, 0, 1, b"x" * 16385)], FRAME_SIZE_ERROR),
    ("a zero WINDOW_UPDATE", [_wu(0, 0)], PROTOCOL_ERROR),
    ("a connection window past 2^31-1", [_wu(0, (1 << 31) - 1)], FLOW_CONTROL_ERROR),
    ("a stream window past 2^31-1", [*OPEN_1, _wu(1, (1 << 31) - 1)], FLOW_CONTROL_ERROR),
    ("WINDOW_UPDATE on an idle stream", [_wu(7, 1)], PROTOCOL_ERROR),
    ("a short WINDOW_UPDATE", [_raw(0x8, 0, 0, b"\x00\x01")], FRAME_SIZE_ERROR),
    ("RST_STREAM on stream 0", [_raw(0x3, 0, 0, b"\x00\x00\x00\x08")], PROTOCOL_ERROR),
    ("RST_STREAM on an idle stream", [RstStreamFrame(9)], PROTOCOL_ERROR),
    ("PING on a stream", [_raw(0x6, 0, 1, b"12345678")], PROTOCOL_ERROR),
    ("a short PING", [_raw(0x6, 0, 0, b"1234")], FRAME_SIZE_ERROR),
    ("PRIORITY on stream 0", [_raw(0x2, 0, 0, b"\x00\x00\x00\x01\x10")], PROTOCOL_ERROR),
    ("a stream that depends on itself", [_raw(0x2, 0, 3, b"\x00\x00\x00\x03\x10")], PROTOCOL_ERROR),
    ("SETTINGS on a stream", [_raw(0x4, 0, 1, b"")], PROTOCOL_ERROR),
    (
        "SETTINGS ACK with a payload",
        [_raw(0x4, 1, 0, b"\x00\x01\x00\x00\x00\x00")],
        FRAME_SIZE_ERROR,
    ),
    ("SETTINGS of 5 bytes", [_raw(0x4, 0, 0, b"\x00\x01\x00\x00\x00")], FRAME_SIZE_ERROR),
    ("ENABLE_PUSH of 2", [_settings(ENABLE_PUSH=2)], PROTOCOL_ERROR),
    (
        "INITIAL_WINDOW_SIZE past 2^31-1",
        [_raw(0x4, 0, 0, b"\x00\x04\x80\x00\x00\x00")],
        FLOW_CONTROL_ERROR,
    ),
    ("MAX_FRAME_SIZE below 16 KiB", [_settings(MAX_FRAME_SIZE=100)], PROTOCOL_ERROR),
    (
        "PUSH_PROMISE from a client",
        [*OPEN_1, PushPromiseFrame(1, promised_stream_id=2)],
        PROTOCOL_ERROR,
    ),
    ("padding longer than the frame", [*OPEN_1, _raw(0x0, 0x8, 1, b"\x05abc")], PROTOCOL_ERROR),
    (
        "a body longer than its Content-Length",
        [_headers(1, [*HEAD, (b"content-length", b"2")], "END_HEADERS"), _data(1, b"abc")],
        PROTOCOL_ERROR,
    ),
    (
        "a body shorter than its Content-Length",
        [_headers(1, [*HEAD, (b"content-length", b"5")], "END_HEADERS"), _data(1, b"ab", end=True)],
        PROTOCOL_ERROR,
    ),
    (
        "a stream window overrun",
        [*OPEN_1, *[_data(1, b"x" * 16384) for _ in range(65)]],
        FLOW_CONTROL_ERROR,
    ),
]


@pytest.mark.parametrize(
    ("frames", "code"),
    [(f, c) for _, f, c in CONNECTION_ERRORS],
    ids=[n for n, _, _ in CONNECTION_ERRORS],
)
def test_broken_clients_get_a_goaway_naming_the_error(
    frames: list[Frame | bytes], code: int
) -> None:
    srv = _started()
    data = b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames)
    with pytest.raises(H2Error) as err:
        srv.receive_data(data)
    assert err.value.code == code
    assert _goaway_code(srv.data_to_send()) == code
    assert srv.receive_data(_data(1, b"x").serialize()) == []  # nothing is read after it


def test_a_bad_preface_or_first_frame_is_a_protocol_error() -> None:
    for data in (
        b"GET / HTTP/1.1\r\n\r\n" * 2,
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
        PREFACE + PingFrame(0).serialize(),
    ):
        srv = ServerFraming(128, 65536, WINDOW)
        with pytest.raises(H2Error) as err:
            srv.receive_data(data)
        assert err.value.code == PROTOCOL_ERROR


def test_frames_split_anywhere_read_the_same() -> None:
    """A request in bytes cut at every offset (preface, frame heads, payloads) is heard the
    same as the whole."""
    frames = PREFACE + SettingsFrame(0).serialize() + _headers(1, HEAD, "END_HEADERS").serialize()
    frames += _data(1, b"hello", end=True).serialize() + GoAwayFrame(0).serialize()
    whole = _kinds(ServerFraming(128, 65536, WINDOW).receive_data(frames))
    assert whole == [
        "SettingsChanged",
        "RequestReceived",
        "DataReceived",
        "StreamEnded",
        "ConnectionTerminated",
    ]
    for cut in range(1, len(frames)):
        srv = ServerFraming(128, 65536, WINDOW)
        assert _kinds(srv.receive_data(frames[:cut]) + srv.receive_data(frames[cut:])) == whole


def _kinds(events: list[Event]) -> list[str]:
    return [type(ev).__name__ for ev in events]


def test_priority_frames_and_unknown_types_are_ignored() -> None:
    srv = _started()
    data = PriorityFrame(3, depends_on=1).serialize() + _raw(0xEE, 0, 0, b"extension")
    data += _headers(1, HEAD, "END_HEADERS", "END_STREAM", "PRIORITY").serialize()
    assert _kinds(srv.receive_data(data)) == ["RequestReceived", "StreamEnded"]


# -- random client behaviour ------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.binary(max_size=40_000), st.booleans()),
        st.tuples(st.just("reset"), st.integers(0, 20)),
        st.tuples(st.just("answer"), st.integers(0, 20), st.integers(0, 100_000)),
        st.tuples(st.just("ping"), st.binary(min_size=8, max_size=8)),
        st.tuples(st.just("window"), st.integers(1000, 1 << 20)),
    ),
    min_size=3,
    max_size=25,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_random_clients_are_heard_as_they_meant_and_take_every_answer(
    script: list[tuple[object, ...]],
) -> None:
    """Streams opened with bodies (and trailers or not), reset, answered, pings and window
    changes, in any order: the server hears each request's head and body exactly, the h2 client
    never finds a frame of ours wrong (it would raise), and each answer arrives whole."""
    p = Pair(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    opened: list[int] = []
    sent: dict[int, bytes] = {}
    answered: dict[int, bytes] = {}
    reset: set[int] = set()
    for op in script:
        kind = op[0]
        if kind == "open":
            body, trailers = op[1], op[2]
            assert isinstance(body, bytes)
            sid = p.client.get_next_available_stream_id()
            p.client.send_headers(sid, HEAD, end_stream=not body and not trailers)
            if body and trailers:
                _body_then_trailers(p, sid, body)
            elif body:
                p.send_body(sid, body)
            elif trailers:
                p.client.send_headers(sid, [(b"x-t", b"1")], end_stream=True)
            p.exchange()
            opened.append(sid)
            sent[sid] = body
        elif kind == "reset" and opened:
            sid = opened[int(op[1]) % len(opened)]
            if sid not in reset and sid not in answered:
                p.client.reset_stream(sid, 8)
                p.exchange()
                reset.add(sid)
        elif kind == "answer" and opened:
            sid = opened[int(op[1]) % len(opened)]
            if sid not in reset and sid not in answered and sid in p.server.streams:
                body = b"a" * int(op[2])
                p.answer(sid, body)
                answered[sid] = body
        elif kind == "ping":
            p.client.ping(op[1])
            p.exchange()
        elif kind == "window":
            p.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: int(op[1])})
            p.exchange()
    for sid in opened:
        if sid not in reset:
            assert bytes(p.heard.bodies[sid]) == sent[sid]
            assert sid in p.heard.ended
    assert {s: b for s, b in p.client_answers().items() if s in answered} == answered
    assert set(answered) <= p.ended_for_client()
    assert set(p.heard.reset) == reset
    assert p.server.data_to_send() == b""
    event(f"answered {min(len(answered), 3)}+ streams, {len(reset) and 'some'} reset")


def _body_then_trailers(p: Pair, sid: int, body: bytes) -> None:
    out = bytearray(body)
    for _ in range(10_000):
        while out:
            room = min(p.client.local_flow_control_window(sid), p.client.max_outbound_frame_size)
            if room <= 0:
                break
            p.client.send_data(sid, bytes(out[:room]))
            del out[:room]
        p.exchange()
        if not out:
            break
    p.client.send_headers(sid, [(b"x-t", b"1")], end_stream=True)


# -- the client role (towards HTTP/2 backends), against h2's server ------------------------------


class ClientPair:
    """Our client framing and an h2 server (the library), back to back in memory."""

    def __init__(self, server_settings: dict[int, int] | None = None) -> None:
        self.client = ClientFraming(65536, WINDOW)
        self.client.initiate_connection()
        self.client.increment_flow_control_window((16 << 20) - 65535)
        self.server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.server.initiate_connection()
        if server_settings:
            self.server.update_settings(server_settings)
        self.requests: dict[int, list[tuple[bytes, bytes]]] = {}
        self.uploads: dict[int, bytearray] = {}
        self.server_ended: set[int] = set()
        self.heard: list[Event] = []
        self.exchange()

    def exchange(self) -> None:
        for _ in range(100):
            c = self.client.data_to_send()
            if c:
                for ev in self.server.receive_data(c):
                    sid = getattr(ev, "stream_id", 0)
                    if type(ev).__name__ == "RequestReceived":
                        self.requests[sid] = list(ev.headers)
                        self.uploads[sid] = bytearray()
                    elif isinstance(ev, ClientData):  # h2's DataReceived, on its server here
                        self.uploads[sid] += ev.data
                        self.server.acknowledge_received_data(ev.flow_controlled_length, sid)
                    elif isinstance(ev, ClientEnded):
                        self.server_ended.add(sid)
            s = self.server.data_to_send()
            if s:
                for ev in self.client.receive_data(s):
                    self.heard.append(ev)
                    if isinstance(ev, DataReceived):
                        self.client.acknowledge_received_data(ev.flow_length, ev.stream_id)
            if not c and not s:
                return
        raise AssertionError("the two sides never went quiet")

    def request(self, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=not body)
        out = bytearray(body)
        for _ in range(10_000):
            while out:
                room = min(
                    self.client.local_flow_control_window(sid), self.client.max_outbound_frame_size
                )
                if room <= 0:
                    break
                chunk = bytes(out[:room])
                del out[:room]
                self.client.send_data(sid, chunk, end_stream=not out)
            self.exchange()
            if not out:
                return sid
        raise AssertionError("the upload never fit the windows")

    def answer(self, sid: int, body: bytes, **kw: object) -> None:
        """The h2 server answers `sid` (within its windows, as WINDOW_UPDATEs come)."""
        head = kw.get("head", [(b":status", b"200")])
        h2_answer(self.server, sid, head, body, kw.get("trailers"), self.exchange)  # type: ignore[arg-type]

    def heard_body(self, sid: int) -> bytes:
        return b"".join(
            ev.data for ev in self.heard if isinstance(ev, DataReceived) and ev.stream_id == sid
        )

    def kinds(self, sid: int) -> list[str]:
        """What the stream's answer was made of (window updates left out)."""
        return [
            type(ev).__name__
            for ev in self.heard
            if ev.stream_id == sid and not isinstance(ev, WindowUpdated)
        ]


REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"b"), (b":path", b"/call")]


def test_client_calls_with_bodies_both_ways_and_trailers() -> None:
    """Three calls upload 200 KiB each and get 300 KiB back with gRPC-style trailers, past
    every initial window (the h2 server's is 64 KiB): both sides give windows back."""
    p = ClientPair(server_settings={SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    sids = [p.request([*REQ, (b"x-i", b"%d" % i)], bytes([i]) * 200_000) for i in range(3)]
    assert sids == [1, 3, 5]
    for i, sid in enumerate(sids):
        assert p.requests[sid][-1] == (b"x-i", b"%d" % i)
        assert bytes(p.uploads[sid]) == bytes([i]) * 200_000 and sid in p.server_ended
        p.answer(sid, bytes([i + 7]) * 300_000, trailers=[(b"grpc-status", b"0")])
        assert p.heard_body(sid) == bytes([i + 7]) * 300_000
        assert p.kinds(sid)[0] == "ResponseReceived"
        assert p.kinds(sid)[-2:] == ["TrailersReceived", "StreamEnded"]
    assert p.client.streams == {}


def test_client_skips_1xx_heads_and_reads_a_head_answer_without_body() -> None:
    p = ClientPair()
    sid = p.request(REQ, b"x")
    p.server.send_headers(sid, [(b":status", b"100")])
    p.answer(sid, b"done", head=[(b":status", b"200"), (b"content-length", b"4")])
    heads = [ev for ev in p.heard if isinstance(ev, ResponseHead)]
    assert [h.headers[0] for h in heads] == [(b":status", b"200")]
    head_req = [(b":method", b"HEAD"), *REQ[1:]]
    sid = p.request(head_req)
    p.server.send_headers(
        sid, [(b":status", b"200"), (b"content-length", b"1000")], end_stream=True
    )
    p.exchange()
    assert p.kinds(sid) == ["ResponseReceived", "StreamEnded"]


def test_client_hears_settings_resets_and_goaway() -> None:
    p = ClientPair(server_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 7})
    assert p.client.remote_max_concurrent_streams == 7
    assert any(isinstance(ev, SettingsChanged) for ev in p.heard)
    a = p.request(REQ, b"x")
    b = p.request(REQ, b"y")
    p.server.reset_stream(a, REFUSED_STREAM)
    p.exchange()
    resets = [ev for ev in p.heard if isinstance(ev, StreamReset)]
    assert [(r.stream_id, r.error_code) for r in resets] == [(a, REFUSED_STREAM)]
    p.server.close_connection(last_stream_id=a)
    p.exchange()
    (goaway,) = [ev for ev in p.heard if isinstance(ev, ConnectionTerminated)]
    assert goaway.last_stream_id == a and b > a  # b was never processed: safe to retry
    # our own reset of a stream, then its late answer, is ignored
    p.client.reset_stream(b, 8)
    assert p.client.receive_data(_raw(0x0, 0x1, b, b"late")) == []


def _client_started() -> ClientFraming:
    c = ClientFraming(65536, WINDOW)
    c.initiate_connection()
    c.receive_data(SettingsFrame(0).serialize())
    c.send_headers(1, REQ, end_stream=True)
    c.data_to_send()
    return c


CLIENT_ERRORS: list[tuple[str, list[bytes], int]] = [
    ("DATA before the head", [_raw(0x0, 0x1, 1, b"x")], PROTOCOL_ERROR),
    (
        "HEADERS on a stream never opened",
        [_raw(0x1, 0x5, 3, Encoder().encode([(b":status", b"200")]))],
        PROTOCOL_ERROR,
    ),
    ("a PUSH_PROMISE", [PushPromiseFrame(1, promised_stream_id=2).serialize()], PROTOCOL_ERROR),
    (
        "HEADERS on an even (pushed) stream",
        [_raw(0x1, 0x5, 2, Encoder().encode([(b":status", b"200")]))],
        PROTOCOL_ERROR,
    ),
    (
        "a 1xx head that ends the stream",
        [_raw(0x1, 0x5, 1, Encoder().encode([(b":status", b"103")]))],
        PROTOCOL_ERROR,
    ),
    (
        "an answer shorter than its Content-Length",
        [
            _raw(0x1, 0x4, 1, Encoder().encode([(b":status", b"200"), (b"content-length", b"9")])),
            _raw(0x0, 0x1, 1, b"short"),
        ],
        PROTOCOL_ERROR,
    ),
]


@pytest.mark.parametrize(
    ("frames", "code"), [(f, c) for _, f, c in CLIENT_ERRORS], ids=[n for n, _, _ in CLIENT_ERRORS]
)
def test_broken_backends_get_a_goaway_naming_the_error(frames: list[bytes], code: int) -> None:
    c = _client_started()
    with pytest.raises(H2Error) as err:
        c.receive_data(b"".join(frames))
    assert err.value.code == code
    assert _goaway_code(c.data_to_send()) == code


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.binary(max_size=70_000), st.integers(0, 150_000), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    st.integers(1000, 1 << 20),
)
def test_random_calls_reach_h2s_server_and_come_back_whole(
    calls: list[tuple[bytes, int, bool]], window: int
) -> None:
    p = ClientPair(server_settings={SettingCodes.INITIAL_WINDOW_SIZE: window})
    sids = [p.request(REQ, body) for body, _, _ in calls]
    for sid, (body, size, trailers) in zip(sids, calls, strict=True):
        assert bytes(p.uploads[sid]) == body and sid in p.server_ended
        p.answer(sid, b"r" * size, trailers=[(b"grpc-status", b"0")] if trailers else None)
        assert p.heard_body(sid) == b"r" * size
        assert p.kinds(sid)[-1] == "StreamEnded"
    assert p.client.streams == {}


def test_client_stream_ids_run_out_at_2_to_the_31() -> None:
    """A connection to a backend carries about a billion streams (odd 31-bit ids): the last
    one is sendable, the one after it is not (wire.h2_upstream replaces the connection while
    enough are left for the streams it has handed out)."""
    c = _client_started()
    assert c.streams_left == (2**31 - 1 - 3) // 2 + 1
    c.next_stream_id = 2**31 - 3
    assert c.streams_left == 2
    c.send_headers(2**31 - 3, REQ, end_stream=True)
    c.send_headers(2**31 - 1, REQ, end_stream=True)
    assert c.streams_left == 0
    with pytest.raises(StreamGone):
        c.send_headers(c.get_next_available_stream_id(), REQ, end_stream=True)
    sids = [sid for t, _, sid, _ in _frames(c.data_to_send()) if t == 0x1]
    assert sids == [2**31 - 3, 2**31 - 1]
