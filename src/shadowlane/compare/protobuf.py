"""Protobuf messages as JSON-like trees, by field number (no schema) or by field name (with one).

A compared gRPC answer is lifted to field paths by the same machinery as a JSON body (ignore
rules, unordered arrays, modes, the walk that skips equal subtrees), so a message is turned into
the tree a JSON document parses to: dicts keyed by field name or number, lists, scalars.

Without a schema the wire format is all there is, and it is ambiguous; the rules, in order:
- each field is keyed by its number as text (`"2"`); a number seen more than once in a message
  is a list of its values in wire order, seen once it is a single value (the wire cannot tell a
  repeated field with one element from a singular one);
- varint: the unsigned integer as sent (no zigzag, no sign: the wire does not say which);
  fixed64 and fixed32: unsigned integers (they may be doubles or floats: the wire does not say);
- length-delimited: the empty string when empty; text when it is valid UTF-8 with no control
  characters (short text often also parses as a message: `hi` is field 13 = 105); otherwise a
  sub-message when it parses cleanly as one; otherwise text when it is valid UTF-8; otherwise
  the bytes in base64 (as in protobuf's JSON mapping);
- groups (wire types 3 and 4, deprecated since proto2) and wire types 6 and 7 are refused: a
  payload holding one is not a message (at the top level: compared as base64 bytes).

The raw decoder is our own, not protobuf's: deciding "does this parse cleanly as a message"
needs a strict parser (field number 0, oversized varints, groups, a length past the end are all
refusals), and the package's parsers are lenient in ways that turn ordinary strings into
messages. It also keeps the schema-less case free of the dependency.

With a schema (a message descriptor from the configured descriptor set) the message is parsed by
the `protobuf` package and walked by its descriptor: fields by proto name (`display_name`), a
repeated field always a list, a map a dict keyed by the map's keys, an enum by its value name
(its number when the schema does not know it), bytes in base64, and fields the schema does not
know (a newer server's) by number, decoded as above. Only fields present on the wire appear
(proto3 defaults are not filled in), so both sides are treated alike.
"""

from __future__ import annotations

import base64
from typing import Any

#: sub-messages nested deeper than this are left as bytes (protobuf's own limit is 100)
MAX_DEPTH = 64
_MAX_FIELD = (1 << 29) - 1


class NotProtobuf(ValueError):
    """The bytes are not a well-formed protobuf message (by the strict rules above)."""


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 64:
                break
            return value, pos
        shift += 7
        if shift >= 70:
            break
    raise NotProtobuf("bad varint")


def base64_text(chunk: bytes) -> str:
    """Bytes as a leaf value: base64, as protobuf's JSON mapping writes `bytes` fields."""
    return base64.b64encode(chunk).decode("ascii")


def _length_delimited(chunk: bytes, depth: int) -> Any:
    if not chunk:
        return ""
    try:
        text: str | None = chunk.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        return text
    if depth < MAX_DEPTH:
        try:
            return decode_raw(chunk, depth + 1)
        except NotProtobuf:
            pass
    return text if text is not None else base64_text(chunk)


#: field numbers as dict keys, made once (the same few numbers come back in every message)
_KEYS = [str(n) for n in range(256)]


def decode_raw(data: bytes, depth: int = 0) -> dict[str, Any]:
    """One message without a schema: `{"1": value, "2": [v, v], ...}`; raises NotProtobuf.

    Written for speed: one-byte varints (tags of fields 1-15, small values and lengths) are
    read inline, and a field seen a second time turns into a list only then.
    """
    out: dict[str, Any] = {}
    repeated: set[str] | None = None
    pos, end = 0, len(data)
    keys = _KEYS
    while pos < end:
        key = data[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0 or number > _MAX_FIELD:
            raise NotProtobuf(f"bad field number {number}")
        value: Any
        if wire == 0:
            if pos < end and data[pos] < 0x80:
                value = data[pos]
                pos += 1
            else:
                value, pos = _varint(data, pos, end)
        elif wire == 2:
            if pos < end and data[pos] < 0x80:
                size = data[pos]
                pos += 1
            else:
                size, pos = _varint(data, pos, end)
            if pos + size > end:
                raise NotProtobuf("length past the end")
            value = _length_delimited(data[pos : pos + size], depth)
            pos += size
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise NotProtobuf("fixed field past the end")
            value = int.from_bytes(data[pos : pos + size], "little")
            pos += size
        else:
            raise NotProtobuf(f"wire type {wire} (groups are not decoded)")
        name = keys[number] if number < 256 else str(number)
        if name not in out:
            out[name] = value
        elif repeated is not None and name in repeated:
            out[name].append(value)
        else:
            out[name] = [out[name], value]
            if repeated is None:
                repeated = set()
            repeated.add(name)
    return out


def decode_top(data: bytes) -> Any:
    """A whole message without a schema; a payload that is no message is its base64 string."""
    try:
        return decode_raw(data)
    except NotProtobuf:
        return base64_text(data)


# ---------------------------------------------------------------------------------------------
# With a schema

# FieldDescriptor.TYPE_* numbers (descriptor.proto), written here so that this module needs the
# protobuf package only when a schema is used
_TYPE_GROUP = 10
_TYPE_MESSAGE = 11
_TYPE_BYTES = 12
_TYPE_ENUM = 14


_LABEL_REPEATED = 3


def _is_repeated(fd: Any) -> bool:
    """`is_repeated` from protobuf 6.31 on (7 dropped `label`), `label` before it."""
    flag = getattr(fd, "is_repeated", None)
    return bool(flag) if flag is not None else bool(fd.label == _LABEL_REPEATED)


def _map_key(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _collapse(fields: dict[str, list[Any]]) -> dict[str, Any]:
    return {k: v[0] if len(v) == 1 else v for k, v in fields.items()}


def _unknown_value(wire: int, data: Any) -> Any:
    if wire == 2:
        return _length_delimited(bytes(data), 1)
    if wire in (0, 1, 5):
        return int(data)
    return base64_text(b"")  # a group in the unknown fields: kept as present, not decoded


class _Walker:
    """Converts one parsed message (and its sub-messages) by its descriptor."""

    def __init__(self) -> None:
        from google.protobuf import unknown_fields

        self._unknown = unknown_fields.UnknownFieldSet

    def scalar(self, fd: Any, value: Any) -> Any:
        kind = fd.type
        if kind in (_TYPE_MESSAGE, _TYPE_GROUP):
            return self.message(value)
        if kind == _TYPE_ENUM:
            known = fd.enum_type.values_by_number.get(value)
            return known.name if known is not None else value
        if kind == _TYPE_BYTES:
            return base64_text(value)
        return value

    def message(self, msg: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for fd, value in msg.ListFields():
            name = f"[{fd.full_name}]" if fd.is_extension else fd.name
            if fd.type == _TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
                vfd = fd.message_type.fields_by_name["value"]
                out[name] = {_map_key(k): self.scalar(vfd, value[k]) for k in value}
            elif _is_repeated(fd):
                out[name] = [self.scalar(fd, v) for v in value]
            else:
                out[name] = self.scalar(fd, value)
        unknown: dict[str, list[Any]] = {}
        found: Any = self._unknown(msg)  # iterable at run time; the stubs say otherwise
        for item in found:
            unknown.setdefault(str(item.field_number), []).append(
                _unknown_value(item.wire_type, item.data)
            )
        for key, value in _collapse(unknown).items():
            out.setdefault(key, value)
        return out


def decode_with(data: bytes, message_class: Any) -> Any:
    """A whole message by its schema (`message_class`, a generated or factory class); bytes that
    do not parse as that type are decoded without it."""
    from google.protobuf.message import DecodeError

    try:
        msg = message_class.FromString(data)
    except (DecodeError, RuntimeError, ValueError):
        return decode_top(data)
    return _Walker().message(msg)
