"""HTTP/2 framing, compiled: bytes in, events out; headers and data in, frames out.

The listener (`H2ServerConnection`, wire.h2_server) and the HTTP/2 backends
(`H2ClientConnection`, wire.h2_upstream) used to drive the `h2` library's `H2Connection`.
Measured in process (an h2 client, 10 streams a batch, GET and a 13-byte answer), h2 cost 34
us of CPU per request on the server side alone: its frame objects, its per-stream state
machine of enum transitions, its validation generators and its logging calls, all
interpreted. That was more than the proxy's whole HTTP/1.1 path per request, and it capped
HTTP/2 at a third of nginx (issue 15). This module does the same job for the two roles the
proxy has (`ServerFraming` towards clients, `ClientFraming` towards backends; no push, no
priority tree) in compiled code, with the same kind of sans-I/O surface as h2's:
`receive_data` returns events, `send_headers`/`send_data`/`end_stream`/`reset_stream` queue
frames, `data_to_send` hands them over. h2 is its oracle in the tests: h2's client and server
drive it, frame by frame and by hypothesis.

What it enforces (RFC 9113), and how it answers:

* Connection errors (a GOAWAY naming the error, then `H2Error` raised to the caller, who
  closes): a bad client preface, a first frame other than SETTINGS, a frame larger than
  16,384 bytes, frames on stream 0 that belong to a stream and the reverse, an even or
  decreasing stream id, a header block interrupted or not decodable (COMPRESSION_ERROR) or
  larger than the header list limit (ENHANCE_YOUR_CALM), DATA or HEADERS after the peer
  ended the stream (STREAM_CLOSED), a peer that overruns its windows (FLOW_CONTROL_ERROR), a
  body longer or shorter than its Content-Length, bad SETTINGS values, a zero WINDOW_UPDATE
  or one that overflows 2^31-1, a PUSH_PROMISE (push is never enabled), an answer's DATA
  before its head. RFC 9113 5.4.1 allows a connection error where a stream error would do;
  h2 answered the same cases the same way.
* A stream past SETTINGS_MAX_CONCURRENT_STREAMS is refused on its own (RST_STREAM
  REFUSED_STREAM: the client may retry it) after its header block is decoded, as every block
  must be to keep the HPACK table in step. h2 closed the whole connection for it.
* Frames on a stream this side reset are ignored (5.1), DATA's bytes given back to the
  connection window; PRIORITY is read and ignored; unknown frame types are ignored.

Streams are named states (`OPEN`, `HALF_CLOSED_REMOTE`, `HALF_CLOSED_LOCAL`; closed streams
leave the table) moved by `_remote_end` and `_local_end`, as in h11.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from hpack.exceptions import HPACKError, OversizedHeaderListError

from shadowlane.wire.hpack import Decoder, Encoder

__all__ = [
    "CANCEL",
    "COMPRESSION_ERROR",
    "ENHANCE_YOUR_CALM",
    "FLOW_CONTROL_ERROR",
    "FRAME_SIZE_ERROR",
    "INTERNAL_ERROR",
    "NO_ERROR",
    "PREFACE",
    "PROTOCOL_ERROR",
    "REFUSED_STREAM",
    "STREAM_CLOSED",
    "ClientFraming",
    "ConnectionTerminated",
    "DataReceived",
    "Event",
    "H2Error",
    "RequestReceived",
    "ResponseReceived",
    "ServerFraming",
    "SettingsChanged",
    "StreamEnded",
    "StreamGone",
    "StreamReset",
    "TrailersReceived",
    "WindowUpdated",
]

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types (RFC 9113 6)
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_PRIORITY: Final = 0x2
_RST_STREAM: Final = 0x3
_SETTINGS: Final = 0x4
_PUSH_PROMISE: Final = 0x5
_PING: Final = 0x6
_GOAWAY: Final = 0x7
_WINDOW_UPDATE: Final = 0x8
_CONTINUATION: Final = 0x9

# flags
_END_STREAM: Final = 0x1
_ACK: Final = 0x1
_END_HEADERS: Final = 0x4
_PADDED: Final = 0x8
_PRIORITY_FLAG: Final = 0x20

# error codes (RFC 9113 7)
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
COMPRESSION_ERROR: Final = 0x9
ENHANCE_YOUR_CALM: Final = 0xB

# settings (RFC 9113 6.5.2)
_HEADER_TABLE_SIZE: Final = 0x1
_ENABLE_PUSH: Final = 0x2
_MAX_CONCURRENT_STREAMS: Final = 0x3
_INITIAL_WINDOW_SIZE: Final = 0x4
_MAX_FRAME_SIZE: Final = 0x5
_MAX_HEADER_LIST_SIZE: Final = 0x6
_ENABLE_CONNECT_PROTOCOL: Final = 0x8

_DEFAULT_WINDOW: Final = 65535
_MAX_WINDOW: Final = (1 << 31) - 1
_MAX_STREAM_ID: Final = (1 << 31) - 1
_DEFAULT_FRAME_SIZE: Final = 16384
_MAX_FRAME_SIZE_LIMIT: Final = (1 << 24) - 1
#: streams this side reset, remembered so that their late frames are ignored, not errors
_RESET_MEMORY: Final = 1024

# stream states (RFC 9113 5.1); a closed stream is not in the table
OPEN: Final = 0
HALF_CLOSED_REMOTE: Final = 1  # the client ended its side: the answer is still going out
HALF_CLOSED_LOCAL: Final = 2  # the answer ended: the upload is still coming

_FRAME_HEAD: Final = struct.Struct(">BHBBL")
_SETTING: Final = struct.Struct(">HL")
_U32: Final = struct.Struct(">L")
_GOAWAY_HEAD: Final = struct.Struct(">LL")


class H2Error(Exception):
    """A connection error: the GOAWAY naming `code` is queued; the connection must close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamGone(Exception):
    """Something was sent on a stream that is closed (reset by the client meanwhile)."""


class Event:
    """What the client did, in the order its frames said it."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class RequestReceived(Event):
    """A stream's request head; `ended`: the HEADERS carried END_STREAM (no body follows)."""

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        super().__init__(stream_id)
        self.headers = headers
        self.ended = ended


class ResponseReceived(Event):
    """A stream's final answer head (client role; 1xx heads are read and dropped)."""

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(stream_id)
        self.headers = headers


class DataReceived(Event):
    """Body bytes; `flow_length` (the frame with its padding) is what the window lost."""

    def __init__(self, stream_id: int, data: bytes, flow_length: int) -> None:
        super().__init__(stream_id)
        self.data = data
        self.flow_length = flow_length


class TrailersReceived(Event):
    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(stream_id)
        self.headers = headers


class StreamEnded(Event):
    """The client's side of the stream ended (after its last DATA, HEADERS or trailers)."""


class StreamReset(Event):
    def __init__(self, stream_id: int, error_code: int) -> None:
        super().__init__(stream_id)
        self.error_code = error_code


class WindowUpdated(Event):
    """Send window grew: for `stream_id`, or for every stream when it is 0 (a connection
    WINDOW_UPDATE, or a larger SETTINGS_INITIAL_WINDOW_SIZE)."""


class SettingsChanged(Event):
    """The peer's SETTINGS were applied (its limits, e.g. `remote_max_concurrent_streams`)."""


class ConnectionTerminated(Event):
    """The peer's GOAWAY."""

    def __init__(self, error_code: int, last_stream_id: int) -> None:
        super().__init__(0)
        self.error_code = error_code
        self.last_stream_id = last_stream_id


class _Stream:
    __slots__ = (
        "expected",
        "head_done",
        "no_body",
        "pending",
        "received",
        "recv_window",
        "send_window",
        "state",
    )

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.state = OPEN
        #: the peer's head (request, or final answer) has come: HEADERS now are trailers
        self.head_done = False
        #: an answer to HEAD: its Content-Length describes a body that is not sent
        self.no_body = False
        self.send_window = send_window
        #: what the client may still send before a WINDOW_UPDATE
        self.recv_window = recv_window
        #: bytes the application took but not yet given back (see `acknowledge_received_data`)
        self.pending = 0
        #: the peer's Content-Length, or -1
        self.expected = -1
        self.received = 0


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The Content-Length the wire enforces on the DATA, or -1 (absent, or not a plain number:
    the head rules answer that one 400 themselves)."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() and len(value) < 19 else -1
    return -1


def _auto_increment(window: int, processed: int, maximum: int) -> bool:
    """h2's rule for giving window back: half the window processed, or the window empty and
    at least 1 KiB (a quarter of a small window) processed. Fewer WINDOW_UPDATEs than one per
    acknowledgement, and never a stalled peer."""
    if processed >= maximum // 2:
        return True
    return window <= 0 and processed > min(1024, maximum // 4)


class _Framing:
    """What both roles share: frames in and out, windows, stream ends, SETTINGS, PING."""

    def __init__(self, max_header_list_size: int, window: int) -> None:
        self.decoder = Decoder(max_header_list_size)
        self.encoder = Encoder()
        self.max_header_list_size = max_header_list_size
        #: the stream window our SETTINGS give the peer
        self.initial_recv_window = window
        #: the peer's SETTINGS_INITIAL_WINDOW_SIZE (the window each stream we send starts with)
        self.initial_send_window = _DEFAULT_WINDOW
        #: the peer's SETTINGS_MAX_FRAME_SIZE
        self.max_outbound_frame_size = _DEFAULT_FRAME_SIZE
        #: the peer's SETTINGS_MAX_CONCURRENT_STREAMS (RFC 9113: unlimited until it says)
        self.remote_max_concurrent_streams = _MAX_WINDOW
        self.conn_send_window = _DEFAULT_WINDOW
        self.conn_recv_window = _DEFAULT_WINDOW
        self.conn_recv_max = _DEFAULT_WINDOW
        self.conn_pending = 0
        self.streams: dict[int, _Stream] = {}
        self._reset: dict[int, None] = {}
        self._out = bytearray()
        self._rest = b""
        #: the client's preface is read (a server expects it first; a client sends it)
        self._preface = True
        self._settings_seen = False
        #: the stream whose header block CONTINUATION frames are completing, or 0
        self._cont_sid = 0
        self._cont_end = False
        self._block = bytearray()
        #: a GOAWAY for an error was sent: nothing more is read or sent
        self.failed = False
        #: PING and SETTINGS acknowledgements queued: the owner zeroes it whenever its
        #: transport drains, so it counts what a peer that does not read has made us queue
        self.control_out = 0

    # ----- what a role decides -----
    def _idle(self, sid: int) -> bool:
        """`sid` was never opened (a frame on it is a PROTOCOL_ERROR), as opposed to closed."""
        raise NotImplementedError

    def _last_peer_stream(self) -> int:
        raise NotImplementedError

    def _header_block(self, sid: int, block: bytes, ended: bool, events: list[Event]) -> None:
        raise NotImplementedError

    def _new_stream(self, sid: int, headers: list[Any]) -> _Stream:
        """A stream this side opens by sending HEADERS (client role only)."""
        raise StreamGone(sid)

    # ----- output -----
    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        n = len(payload)
        out = self._out
        out += _FRAME_HEAD.pack(n >> 16, n & 0xFFFF, ftype, flags, sid)
        if n:
            out += payload

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = bytes(out)
        out.clear()
        return data

    def increment_flow_control_window(self, n: int) -> None:
        """Raise the connection's receive window by `n` (beyond the RFC's 64 KiB)."""
        self.conn_recv_window += n
        self.conn_recv_max = max(self.conn_recv_max, self.conn_recv_window)
        self._frame(_WINDOW_UPDATE, 0, 0, _U32.pack(n))

    def goaway(self, last_stream_id: int, code: int) -> None:
        """A GOAWAY that does not end this side's state: the streams up to `last_stream_id`
        still finish (a drain). An error GOAWAY goes through `_fail` instead."""
        self._frame(_GOAWAY, 0, 0, _GOAWAY_HEAD.pack(last_stream_id, code))

    def close_connection(self, code: int = NO_ERROR) -> None:
        if not self.failed:
            self.failed = True
            self.goaway(self._last_peer_stream(), code)

    def send_headers(self, sid: int, headers: list[Any], end_stream: bool = False) -> None:
        """`headers`: (name, value) pairs of bytes; a third item True (or an hpack
        `NeverIndexedHeaderTuple`) for a field never to be indexed."""
        if self.failed:
            raise StreamGone(sid)
        stream = self.streams.get(sid)
        if stream is None:
            stream = self._new_stream(sid, headers)
        elif stream.state == HALF_CLOSED_LOCAL:
            raise StreamGone(sid)
        block = self.encoder.encode(headers)
        limit = self.max_outbound_frame_size
        flags = _END_STREAM if end_stream else 0
        if len(block) <= limit:
            self._frame(_HEADERS, flags | _END_HEADERS, sid, block)
        else:
            self._frame(_HEADERS, flags, sid, block[:limit])
            pos = limit
            while pos < len(block):
                piece = block[pos : pos + limit]
                pos += limit
                self._frame(_CONTINUATION, _END_HEADERS if pos >= len(block) else 0, sid, piece)
        if end_stream:
            self._local_end(sid, stream)

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        """`data` fits the windows and the frame size (`local_flow_control_window` said so)."""
        stream = self.streams.get(sid)
        if stream is None or stream.state == HALF_CLOSED_LOCAL or self.failed:
            raise StreamGone(sid)
        n = len(data)
        if n > stream.send_window or n > self.conn_send_window:
            raise ValueError(f"{n} bytes do not fit the flow-control window of stream {sid}")
        stream.send_window -= n
        self.conn_send_window -= n
        self._frame(_DATA, _END_STREAM if end_stream else 0, sid, data)
        if end_stream:
            self._local_end(sid, stream)

    def end_stream(self, sid: int) -> None:
        self.send_data(sid, b"", end_stream=True)

    def reset_stream(self, sid: int, code: int) -> None:
        """RST_STREAM for an open stream; a no-op for one already closed."""
        if self.streams.pop(sid, None) is None or self.failed:
            return
        self._frame(_RST_STREAM, 0, sid, _U32.pack(code))
        self._remember_reset(sid)

    def local_flow_control_window(self, sid: int) -> int:
        stream = self.streams.get(sid)
        if stream is None:
            return 0
        return min(stream.send_window, self.conn_send_window)

    def acknowledge_received_data(self, n: int, sid: int) -> None:
        """The application took `n` flow-controlled bytes of `sid`: give them back to the
        client, connection and stream, when `_auto_increment` says it is worth a frame."""
        if self.failed or n <= 0:
            return
        self.conn_pending += n
        if _auto_increment(self.conn_recv_window, self.conn_pending, self.conn_recv_max):
            self.conn_recv_window += self.conn_pending
            self._frame(_WINDOW_UPDATE, 0, 0, _U32.pack(self.conn_pending))
            self.conn_pending = 0
        stream = self.streams.get(sid)
        if stream is None or stream.state == HALF_CLOSED_REMOTE:
            return  # the client sends no more on it: its window no longer matters
        stream.pending += n
        if _auto_increment(stream.recv_window, stream.pending, self.initial_recv_window):
            stream.recv_window += stream.pending
            self._frame(_WINDOW_UPDATE, 0, sid, _U32.pack(stream.pending))
            stream.pending = 0

    # ----- stream states -----
    def _remote_end(self, sid: int, stream: _Stream) -> None:
        if stream.state == HALF_CLOSED_LOCAL:
            del self.streams[sid]
        else:
            stream.state = HALF_CLOSED_REMOTE

    def _local_end(self, sid: int, stream: _Stream) -> None:
        if stream.state == HALF_CLOSED_REMOTE:
            del self.streams[sid]
        else:
            stream.state = HALF_CLOSED_LOCAL

    def _remember_reset(self, sid: int) -> None:
        reset = self._reset
        reset[sid] = None
        if len(reset) > _RESET_MEMORY:
            del reset[next(iter(reset))]

    # ----- input -----
    def _fail(self, code: int, message: str) -> H2Error:
        """Queue the GOAWAY for a connection error; the caller raises what this returns."""
        self.close_connection(code)
        return H2Error(code, message)

    def receive_data(self, data: bytes) -> list[Event]:
        """The events the bytes complete; `H2Error` for a connection error (its GOAWAY is in
        `data_to_send`)."""
        events: list[Event] = []
        if self.failed:
            return events
        if self._rest:
            data = self._rest + data
            self._rest = b""
        pos = 0
        end = len(data)
        if not self._preface:
            if end < 24:
                if not PREFACE.startswith(data):
                    raise self._fail(PROTOCOL_ERROR, "not the HTTP/2 preface")
                self._rest = data
                return events
            if data[:24] != PREFACE:
                raise self._fail(PROTOCOL_ERROR, "not the HTTP/2 preface")
            self._preface = True
            pos = 24
        while end - pos >= 9:
            length = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
            if length > _DEFAULT_FRAME_SIZE:
                raise self._fail(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            start = pos + 9
            if end - start < length:
                break
            ftype = data[pos + 3]
            flags = data[pos + 4]
            sid = (
                ((data[pos + 5] & 0x7F) << 24)
                | (data[pos + 6] << 16)
                | (data[pos + 7] << 8)
                | data[pos + 8]
            )
            pos = start + length
            self._receive_frame(ftype, flags, sid, data[start:pos], events)
            if self.failed:
                break
        if pos < end and not self.failed:
            self._rest = data[pos:]
        return events

    def _receive_frame(
        self, ftype: int, flags: int, sid: int, payload: bytes, events: list[Event]
    ) -> None:
        if self._cont_sid:
            if ftype != _CONTINUATION or sid != self._cont_sid:
                raise self._fail(PROTOCOL_ERROR, "a header block interrupted")
            self._continuation(flags, sid, payload, events)
            return
        if not self._settings_seen:
            if ftype != _SETTINGS or flags & _ACK:
                raise self._fail(PROTOCOL_ERROR, "the first frame is not SETTINGS")
            self._settings_seen = True
        if ftype == _DATA:
            self._data(flags, sid, payload, events)
        elif ftype == _HEADERS:
            self._headers(flags, sid, payload, events)
        elif ftype == _WINDOW_UPDATE:
            self._window_update(sid, payload, events)
        elif ftype == _SETTINGS:
            self._settings(flags, sid, payload, events)
        elif ftype == _RST_STREAM:
            self._rst_stream(sid, payload, events)
        elif ftype == _PING:
            if sid:
                raise self._fail(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise self._fail(FRAME_SIZE_ERROR, "PING of a size other than 8")
            if not flags & _ACK:
                self._frame(_PING, _ACK, 0, payload)
                self.control_out += 1
        elif ftype == _PRIORITY:
            if not sid:
                raise self._fail(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise self._fail(FRAME_SIZE_ERROR, "PRIORITY of a size other than 5")
            if (_U32.unpack_from(payload)[0] & 0x7FFFFFFF) == sid:
                raise self._fail(PROTOCOL_ERROR, "a stream depends on itself")
        elif ftype == _GOAWAY:
            if sid:
                raise self._fail(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise self._fail(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
            last, code = _GOAWAY_HEAD.unpack_from(payload)
            events.append(ConnectionTerminated(code, last & 0x7FFFFFFF))
        elif ftype == _CONTINUATION:
            raise self._fail(PROTOCOL_ERROR, "CONTINUATION without a header block")
        elif ftype == _PUSH_PROMISE:
            raise self._fail(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # other types are extensions this side does not speak: ignored (RFC 9113 5.5)

    def _unpad(self, flags: int, payload: bytes) -> bytes:
        if not flags & _PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise self._fail(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _data(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if not sid:
            raise self._fail(PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        self.conn_recv_window -= flow
        if self.conn_recv_window < 0:
            raise self._fail(FLOW_CONTROL_ERROR, "the connection window overrun")
        stream = self.streams.get(sid)
        if stream is None or stream.state == HALF_CLOSED_REMOTE:
            if stream is None and sid in self._reset:
                # late DATA for a stream we reset: its bytes go back to the connection
                self.acknowledge_received_data(flow, sid)
                return
            if stream is None and self._idle(sid):
                raise self._fail(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            raise self._fail(STREAM_CLOSED, f"DATA on closed stream {sid}")
        if not stream.head_done:
            raise self._fail(PROTOCOL_ERROR, f"DATA before the head on stream {sid}")
        stream.recv_window -= flow
        if stream.recv_window < 0:
            raise self._fail(FLOW_CONTROL_ERROR, f"stream {sid}'s window overrun")
        body = self._unpad(flags, payload)
        stream.received += len(body)
        ended = bool(flags & _END_STREAM)
        if stream.expected >= 0 and (
            stream.received > stream.expected or (ended and stream.received != stream.expected)
        ):
            raise self._fail(PROTOCOL_ERROR, f"stream {sid}'s body contradicts Content-Length")
        events.append(DataReceived(sid, body, flow))
        if ended:
            self._remote_end(sid, stream)
            events.append(StreamEnded(sid))

    def _headers(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if not sid:
            raise self._fail(PROTOCOL_ERROR, "HEADERS on stream 0")
        if not sid & 1:
            raise self._fail(PROTOCOL_ERROR, f"HEADERS on an even stream id ({sid})")
        block = self._unpad(flags, payload)
        if flags & _PRIORITY_FLAG:
            if len(block) < 5:
                raise self._fail(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if (_U32.unpack_from(block)[0] & 0x7FFFFFFF) == sid:
                raise self._fail(PROTOCOL_ERROR, "a stream depends on itself")
            block = block[5:]
        ended = bool(flags & _END_STREAM)
        if flags & _END_HEADERS:
            self._header_block(sid, block, ended, events)
        else:
            self._cont_sid = sid
            self._cont_end = ended
            self._block = bytearray(block)

    def _continuation(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        block = self._block
        block += payload
        if len(block) > self.max_header_list_size + 65536:
            raise self._fail(ENHANCE_YOUR_CALM, "a header block without end")
        if flags & _END_HEADERS:
            self._cont_sid = 0
            self._block = bytearray()
            self._header_block(sid, bytes(block), self._cont_end, events)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """Every block is decoded, wanted or not: the HPACK table must stay in step."""
        try:
            return self.decoder.decode(block)
        except OversizedHeaderListError as exc:
            raise self._fail(ENHANCE_YOUR_CALM, f"header list too large: {exc}") from None
        except HPACKError as exc:
            raise self._fail(COMPRESSION_ERROR, f"header block not decodable: {exc}") from None

    def _unknown_stream_headers(self, sid: int) -> None:
        """HEADERS for a stream not in the table (and not one the peer may open now)."""
        if sid in self._reset:
            return  # trailers of a stream we reset (the block is decoded: HPACK state)
        if self._idle(sid):
            raise self._fail(PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
        raise self._fail(STREAM_CLOSED, f"HEADERS on closed stream {sid}")

    def _trailers(
        self,
        sid: int,
        stream: _Stream,
        headers: list[tuple[bytes, bytes]],
        ended: bool,
        events: list[Event],
    ) -> None:
        if stream.state == HALF_CLOSED_REMOTE:
            raise self._fail(STREAM_CLOSED, f"HEADERS after stream {sid} ended")
        if not ended:
            raise self._fail(PROTOCOL_ERROR, f"trailers without END_STREAM on stream {sid}")
        if stream.expected >= 0 and stream.received != stream.expected:
            raise self._fail(PROTOCOL_ERROR, f"stream {sid}'s body contradicts Content-Length")
        events.append(TrailersReceived(sid, headers))
        self._remote_end(sid, stream)
        events.append(StreamEnded(sid))

    def _window_update(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise self._fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE of a size other than 4")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not increment:
            raise self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        if not sid:
            self.conn_send_window += increment
            if self.conn_send_window > _MAX_WINDOW:
                raise self._fail(FLOW_CONTROL_ERROR, "the connection window past 2^31-1")
            events.append(WindowUpdated(0))
            return
        stream = self.streams.get(sid)
        if stream is None:
            if self._idle(sid):
                raise self._fail(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return  # closed: allowed for a while (RFC 9113 5.1)
        stream.send_window += increment
        if stream.send_window > _MAX_WINDOW:
            raise self._fail(FLOW_CONTROL_ERROR, f"stream {sid}'s window past 2^31-1")
        events.append(WindowUpdated(sid))

    def _rst_stream(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if not sid:
            raise self._fail(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise self._fail(FRAME_SIZE_ERROR, "RST_STREAM of a size other than 4")
        if self._idle(sid):
            raise self._fail(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        if self.streams.pop(sid, None) is not None:
            events.append(StreamReset(sid, _U32.unpack(payload)[0]))

    def _settings(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid:
            raise self._fail(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & _ACK:
            if payload:
                raise self._fail(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise self._fail(FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        grown = False
        for pos in range(0, len(payload), 6):
            code, value = _SETTING.unpack_from(payload, pos)
            if code == _INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise self._fail(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta = value - self.initial_send_window
                self.initial_send_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > _MAX_WINDOW:
                        raise self._fail(FLOW_CONTROL_ERROR, "a stream window past 2^31-1")
                grown = grown or delta > 0
            elif code == _MAX_FRAME_SIZE:
                if not _DEFAULT_FRAME_SIZE <= value <= _MAX_FRAME_SIZE_LIMIT:
                    raise self._fail(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.max_outbound_frame_size = value
            elif code == _MAX_CONCURRENT_STREAMS:
                self.remote_max_concurrent_streams = value
            elif code == _HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            elif code in (_ENABLE_PUSH, _ENABLE_CONNECT_PROTOCOL) and value > 1:
                raise self._fail(PROTOCOL_ERROR, f"SETTINGS {code} neither 0 nor 1")
        self._frame(_SETTINGS, _ACK, 0, b"")
        self.control_out += 1
        events.append(SettingsChanged(0))
        if grown:
            events.append(WindowUpdated(0))


class ServerFraming(_Framing):
    """One HTTP/2 connection's framing as the server (our listener) sees it."""

    def __init__(self, max_concurrent_streams: int, max_header_list_size: int, window: int) -> None:
        super().__init__(max_header_list_size, window)
        self.max_concurrent_streams = max_concurrent_streams
        self.highest_inbound_stream_id = 0
        self._preface = False

    def initiate_connection(self) -> None:
        """Our SETTINGS (the first frame a server sends, RFC 9113 3.4)."""
        payload = b"".join(
            [
                _SETTING.pack(_MAX_CONCURRENT_STREAMS, self.max_concurrent_streams),
                _SETTING.pack(_MAX_HEADER_LIST_SIZE, self.max_header_list_size),
                _SETTING.pack(_INITIAL_WINDOW_SIZE, self.initial_recv_window),
            ]
        )
        self._frame(_SETTINGS, 0, 0, payload)

    def _idle(self, sid: int) -> bool:
        return sid > self.highest_inbound_stream_id

    def _last_peer_stream(self) -> int:
        return self.highest_inbound_stream_id

    def _header_block(self, sid: int, block: bytes, ended: bool, events: list[Event]) -> None:
        headers = self._decode(block)
        stream = self.streams.get(sid)
        if stream is not None:
            self._trailers(sid, stream, headers, ended, events)
            return
        if sid <= self.highest_inbound_stream_id:
            self._unknown_stream_headers(sid)
            return
        self.highest_inbound_stream_id = sid
        if len(self.streams) >= self.max_concurrent_streams:
            self._frame(_RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM))
            self._remember_reset(sid)
            return
        stream = _Stream(self.initial_send_window, self.initial_recv_window)
        stream.head_done = True
        self.streams[sid] = stream
        events.append(RequestReceived(sid, headers, ended))
        if ended:
            stream.state = HALF_CLOSED_REMOTE
            events.append(StreamEnded(sid))
        else:
            stream.expected = _content_length(headers)


class ClientFraming(_Framing):
    """One HTTP/2 connection's framing as a client (the proxy towards an h2 backend) sees it:
    streams opened by `send_headers` on `get_next_available_stream_id()`, push refused."""

    def __init__(self, max_header_list_size: int, window: int) -> None:
        super().__init__(max_header_list_size, window)
        self.next_stream_id = 1

    def initiate_connection(self) -> None:
        """The preface and our SETTINGS (push off, our stream window)."""
        self._out += PREFACE
        payload = _SETTING.pack(_ENABLE_PUSH, 0) + _SETTING.pack(
            _INITIAL_WINDOW_SIZE, self.initial_recv_window
        )
        self._frame(_SETTINGS, 0, 0, payload)

    def get_next_available_stream_id(self) -> int:
        return self.next_stream_id

    @property
    def streams_left(self) -> int:
        """Stream ids this connection has left (31 bits of them, odd ones: about a billion,
        10 hours of 30,000 calls a second; then the connection must be replaced)."""
        return max(0, (_MAX_STREAM_ID - self.next_stream_id) // 2 + 1)

    def _new_stream(self, sid: int, headers: list[Any]) -> _Stream:
        if sid != self.next_stream_id or sid > _MAX_STREAM_ID:
            raise StreamGone(sid)
        self.next_stream_id = sid + 2
        stream = _Stream(self.initial_send_window, self.initial_recv_window)
        for h in headers:
            if h[0] == b":method":
                stream.no_body = h[1] == b"HEAD"
                break
        self.streams[sid] = stream
        return stream

    def _idle(self, sid: int) -> bool:
        return sid >= self.next_stream_id or not sid & 1

    def _last_peer_stream(self) -> int:
        return 0  # a server opens no streams (push is off)

    def _header_block(self, sid: int, block: bytes, ended: bool, events: list[Event]) -> None:
        headers = self._decode(block)
        stream = self.streams.get(sid)
        if stream is None:
            self._unknown_stream_headers(sid)
            return
        if stream.head_done:
            self._trailers(sid, stream, headers, ended, events)
            return
        status = b""
        for name, value in headers:
            if name == b":status":
                status = value
                break
        if len(status) == 3 and status[:1] == b"1":
            if ended:
                raise self._fail(PROTOCOL_ERROR, f"a 1xx head ends stream {sid}")
            return  # an informational answer: the final one follows
        stream.head_done = True
        events.append(ResponseReceived(sid, headers))
        if ended:
            self._remote_end(sid, stream)
            events.append(StreamEnded(sid))
        elif not stream.no_body and status != b"204" and status != b"304":
            stream.expected = _content_length(headers)
