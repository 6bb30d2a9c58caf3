"""HTTP/1.1 framing for the admin server: h11 does the protocol, this module does the I/O.

One `AdminConnection` per client runs request/response cycles until either side closes, an
error makes the connection unusable, or the idle timeout passes. The admin server is not on the
hot path, so it favours clarity and strictness over speed: every read has a deadline, a request
head is bounded by h11's `max_incomplete_event_size` and a body by `Limits.max_body`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

import h11

from shadowlane.admin.messages import AdminRequest, AdminResponse, error_response

__all__ = ["AdminConnection", "Dispatch", "Limits"]

log = logging.getLogger(__name__)

Dispatch = Callable[[AdminRequest], Awaitable[AdminResponse]]

#: Framing headers belong to this module; a handler setting them would corrupt the stream.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds that keep one admin client from holding memory or a connection forever."""

    max_body: int = 1 << 20
    max_header: int = 16 * 1024
    #: A connection with no complete request within this many seconds (from the end of the
    #: previous response, or from accept) is closed; also bounds writing one response.
    idle_timeout: float = 60.0
    read_chunk: int = 64 * 1024


class _BodyTooLarge(Exception):
    pass


class AdminConnection:
    """Serves one client connection (keep-alive and pipelining) until it ends."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dispatch: Dispatch,
        limits: Limits,
        closing: Callable[[], bool],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._dispatch = dispatch
        self._limits = limits
        self._closing = closing
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header)
        self._loop = asyncio.get_running_loop()
        #: True while waiting for the first byte of the next request: safe to close on shutdown.
        self.idle = True

    def close_if_idle(self) -> bool:
        """Close the connection now if no request is in progress; say whether it did."""
        if self.idle:
            self._writer.close()
            return True
        return False

    def abort(self) -> None:
        """Drop the connection without waiting for anything (shutdown grace period is over)."""
        self._writer.transport.abort()

    async def run(self) -> None:
        """Serve request/response cycles; never raises for client misbehaviour."""
        try:
            while await self._cycle():
                pass
        except (TimeoutError, ConnectionError):
            pass  # idle timeout, slow reader or peer reset: nothing more to say to this client
        except Exception:
            log.exception("admin connection failed")
        finally:
            self.idle = False
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def _cycle(self) -> bool:
        """One request and its response. Returns whether the connection stays open."""
        deadline = self._loop.time() + self._limits.idle_timeout
        try:
            event = await self._next_event(deadline)
            if isinstance(event, h11.ConnectionClosed):
                return False
            if not isinstance(event, h11.Request):  # pragma: no cover - h11 guarantees this
                raise h11.RemoteProtocolError("expected a request", error_status_hint=400)
            head_only = event.method == b"HEAD"
            if _head_size(event) > self._limits.max_header:
                # h11 bounds only a head still incomplete; one that arrived whole in a single
                # read is measured here so the limit holds however the bytes were chunked.
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            body = await self._read_body(event, deadline)
        except h11.RemoteProtocolError as exc:
            # Malformed request or head too large: answer if h11 still lets us, then close.
            if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                message = str(exc) or http.HTTPStatus(status).phrase
                if status == 431:
                    message = "request head too large"
                await self._send(error_response(status, message), head_only=False, close=True)
            return False
        except _BodyTooLarge:
            # The rest of the body is never read, so the connection cannot be reused.
            limit = self._limits.max_body
            response = error_response(413, "request body too large", max_bytes=limit)
            await self._send(response, head_only=False, close=True)
            return False

        request = _admin_request(event, body)
        try:
            response = await self._dispatch(request)
        except Exception:  # the app already maps handler errors; this is a last line of defence
            log.exception("admin dispatch failed for %s %s", request.method, request.path)
            response = error_response(500, "internal error")
        close = self._closing()
        await self._send(response, head_only=head_only, close=close)
        if close or self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
            return False
        self._h11.start_next_cycle()
        return True

    async def _next_event(self, deadline: float) -> h11.Event:
        while True:
            event = self._h11.next_event()
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type)  # PAUSED cannot happen: we never pipeline ahead
                return event
            if self._h11.their_state is h11.IDLE and not self._h11.trailing_data[0]:
                self.idle = True
                if self._closing():
                    return h11.ConnectionClosed()
            try:
                async with asyncio.timeout_at(deadline):
                    data = await self._reader.read(self._limits.read_chunk)
            finally:
                self.idle = False
            self._h11.receive_data(data)  # b"" is EOF, which h11 turns into ConnectionClosed

    async def _read_body(self, request: h11.Request, deadline: float) -> bytes:
        limit = self._limits.max_body
        for name, value in request.headers:
            # h11 has already validated Content-Length as a single non-negative integer.
            if name == b"content-length" and int(value) > limit:
                raise _BodyTooLarge
        if self._h11.client_is_waiting_for_100_continue:
            self._write(h11.InformationalResponse(status_code=100, headers=[]))
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(deadline)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise _BodyTooLarge
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:  # pragma: no cover - h11 raises on EOF inside a body
                raise h11.RemoteProtocolError("unexpected event in body", error_status_hint=400)

    async def _send(self, response: AdminResponse, *, head_only: bool, close: bool) -> None:
        status = response.status
        try:
            reason = http.HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            reason = b""
        no_body = status < 200 or status in (204, 304)
        headers: list[tuple[str, str]] = []
        if not no_body:
            headers.append(("content-type", response.content_type))
            headers.append(("content-length", str(len(response.body))))
        headers.extend(
            (name, value)
            for name, value in response.headers
            if name.lower() not in _FRAMING_HEADERS
        )
        if close:
            headers.append(("connection", "close"))
        self._write(h11.Response(status_code=status, headers=headers, reason=reason))
        if response.body and not (no_body or head_only):
            self._write(h11.Data(data=response.body))
        self._write(h11.EndOfMessage())
        async with asyncio.timeout(self._limits.idle_timeout):
            await self._writer.drain()

    def _write(self, event: h11.Event) -> None:
        data = self._h11.send(event)
        if data:
            self._writer.write(data)


def _head_size(event: h11.Request) -> int:
    """The request head's size on the wire, give or take whitespace."""
    size = len(event.method) + len(event.target) + 12  # request line: spaces, version, CRLF
    for name, value in event.headers:
        size += len(name) + len(value) + 4  # ": " and CRLF
    return size


def _admin_request(event: h11.Request, body: bytes) -> AdminRequest:
    target = event.target.decode("latin-1")
    path, _, query_string = target.partition("?")
    query: dict[str, str] = {}
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        query.setdefault(key, value)
    headers: dict[str, str] = {}
    for raw_name, raw_value in event.headers:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return AdminRequest(
        method=event.method.decode("latin-1"),
        path=path,
        query=query,
        headers=headers,
        body=body,
    )
