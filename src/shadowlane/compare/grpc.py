"""gRPC answers for the comparison: the status, the framed messages, and the schema per method.

A gRPC answer is an HTTP/2 answer with `content-type: application/grpc[+proto]` whose body is a
sequence of length-prefixed messages (1 byte compressed flag, 4 bytes big-endian length) and
whose status is in the trailers (`grpc-status`, `grpc-message`), or in the headers of a
trailers-only answer. Lifting (compare.diff) asks this module for three things:
- `status_fields`: `status.grpc` (the code's name, `NOT_FOUND`) and `status.grpc_message`;
- `GrpcAnswer.decode`: the body as a list of message trees (compare.protobuf), one per message;
- `GrpcSchema.message_class`: the response type of the call, from the request path
  `/pkg.Service/Method` and the configured descriptor set, so fields get their proto names.

The schema is built lazily (the first gRPC answer of a method) and pickles as the descriptor
set's bytes, so compiled settings can be handed to another process and rebuilt there.
"""

from __future__ import annotations

import struct
import threading
import zlib
from typing import Any
from urllib.parse import unquote

from shadowlane.compare.protobuf import base64_text, decode_top, decode_with
from shadowlane.config import build_descriptor_set, read_descriptor_set

#: the codes of grpc/status.h, by number; `status.grpc` holds the name
STATUS_NAMES: dict[int, str] = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}

#: header and trailer names lifted as `status.*` instead of `headers.*` / `trailers.*`
STATUS_HEADERS = frozenset((b"grpc-status", b"grpc-message"))

_PREFIX = struct.Struct(">BI")


def is_grpc(content_type: bytes) -> bool:
    """`application/grpc` and `application/grpc+proto` (parameters allowed); not `+json`."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media in (b"application/grpc", b"application/grpc+proto")


def status_name(value: bytes) -> str:
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return STATUS_NAMES.get(int(text), text)
    return text


Headers = list[tuple[bytes, bytes]]


def status_fields(headers: Headers, trailers: Headers) -> dict[str, Any]:
    """`status.grpc` and `status.grpc_message` from the trailers, else from the headers (a
    trailers-only answer); nothing for an answer that carries neither."""
    out: dict[str, Any] = {}
    for source in (headers, trailers):  # trailers last: they win when both carry one
        for name, value in source:
            lname = name.lower()
            if lname == b"grpc-status":
                out["status.grpc"] = status_name(value)
            elif lname == b"grpc-message":
                out["status.grpc_message"] = unquote(value.decode("latin-1"), errors="replace")
    return out


def split_messages(body: bytes) -> list[tuple[int, bytes]] | None:
    """The (compressed flag, payload) of each framed message; None if the framing is broken."""
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(body)
    while pos < end:
        if pos + 5 > end:
            return None
        flag, size = _PREFIX.unpack_from(body, pos)
        pos += 5
        if flag > 1 or pos + size > end:
            return None
        out.append((flag, body[pos : pos + size]))
        pos += size
    return out


def _gunzip(payload: bytes, cap: int) -> bytes | None:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(payload, cap)
    except zlib.error:
        return None
    if d.unconsumed_tail or not d.eof:
        return None
    return out


class GrpcAnswer:
    """How to decode one answer's body: its message type (or none) and its `grpc-encoding`."""

    __slots__ = ("cap", "encoding", "message_class")

    def __init__(self, message_class: Any, encoding: bytes, cap: int) -> None:
        self.message_class = message_class
        self.encoding = encoding
        #: at most this many bytes per decompressed message (the compare `max_body`)
        self.cap = cap

    def decode(self, body: bytes) -> list[Any] | None:
        """One tree per message, in order; None when the body is not framed as gRPC.

        A compressed message (flag 1) is gunzipped when `grpc-encoding` is gzip and decoded;
        under any other encoding (deflate, snappy, ...), or when it does not decompress within
        the cap, it is compared as opaque bytes (its base64 text).
        """
        frames = split_messages(body)
        if frames is None:
            return None
        out: list[Any] = []
        for flag, payload in frames:
            if flag:
                gzipped = self.encoding in (b"gzip", b"x-gzip")
                plain = _gunzip(payload, self.cap) if gzipped else None
                if plain is None:
                    out.append(base64_text(payload))
                    continue
                payload = plain
            if self.message_class is not None:
                out.append(decode_with(payload, self.message_class))
            else:
                out.append(decode_top(payload))
        return out


def method_of(path: str) -> tuple[str, str] | None:
    """`("pkg.Service", "Method")` from a request path `/pkg.Service/Method[?query]`."""
    path = path.split("?", 1)[0]
    parts = path.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class GrpcSchema:
    """A descriptor set (`protoc --include_imports --descriptor_set_out`) and the services whose
    answers are decoded with it (all of the set's when none are named)."""

    def __init__(self, data: bytes, services: tuple[str, ...] = (), source: str = "") -> None:
        self.data = data
        self.services = services
        #: the file it was read from, for messages
        self.source = source
        self._lock = threading.Lock()
        self._pool: Any = None
        #: (request class, response class) per path
        self._classes: dict[str, tuple[Any, Any]] = {}

    @classmethod
    def load(cls, path: str, services: tuple[str, ...] = ()) -> GrpcSchema:
        found = read_descriptor_set(path)  # ValueError now, at start or reload
        schema = cls(found.data, services, path)
        schema._pool = found.pool
        return schema

    def __reduce__(self) -> tuple[Any, ...]:
        return (GrpcSchema, (self.data, self.services, self.source))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GrpcSchema):
            return NotImplemented
        return self.data == other.data and self.services == other.services

    def __hash__(self) -> int:
        return hash((self.data, self.services))

    def __repr__(self) -> str:
        return f"GrpcSchema({self.source or len(self.data)!r}, services={list(self.services)!r})"

    def pool(self) -> Any:
        """The descriptor pool, built once; raises ValueError naming what is wrong."""
        with self._lock:
            if self._pool is None:
                self._pool = build_descriptor_set(self.data, self.source or "descriptor set").pool
            return self._pool

    def message_class(self, path: str, *, request: bool = False) -> Any:
        """The response (or, with `request`, the request) message class of the call at `path`,
        or None (not a gRPC path, a service not in the set or not named, an unknown method):
        then fields go by number."""
        key = path.split("?", 1)[0]
        with self._lock:
            found = self._classes.get(key)
        if found is None:
            found = self._find(key)
            with self._lock:
                if len(self._classes) >= 4096:
                    self._classes.clear()
                self._classes[key] = found
        return found[0] if request else found[1]

    def _find(self, path: str) -> tuple[Any, Any]:
        method = method_of(path)
        if method is None:
            return (None, None)
        service_name, method_name = method
        if self.services and service_name not in self.services:
            return (None, None)
        pool = self.pool()
        try:
            service = pool.FindServiceByName(service_name)
        except KeyError:
            return (None, None)
        m = service.methods_by_name.get(method_name)
        if m is None:
            return (None, None)
        from google.protobuf import message_factory

        return (
            message_factory.GetMessageClass(m.input_type),
            message_factory.GetMessageClass(m.output_type),
        )
