"""HPACK (RFC 7541) for h2's connections, compiled: the header codec h2 calls for every block.

Why not the `hpack` package's codec: it is pure Python and about a fifth of the proxy's CPU on
an HTTP/2 request (a profile of `h2load -c10 -m10` through it: `Encoder.encode` 9%,
`Decoder.decode` 9%, with a logger call and a tuple subclass per header), and h2 lets its
connection's codec be swapped (`H2Connection.encoder` and `.decoder`, read at each use). This
is the same algorithm on the same tables (hpack's static table and nghttp2's Huffman decoding
state machine, imported from the package), raising the package's exceptions, which is what h2
catches; `tests/test_hpack.py` holds it to the package's codec on generated header lists. h2
still does all the framing.

What differs from the package, on purpose: the encoder never Huffman-codes (RFC 7541 lets an
encoder choose per string; a header seen twice is one indexed byte either way, and encoding it
was most of the package's encoder time), and the decoder returns plain `(name, value)` tuples
of bytes (what h2 asks for with `raw=True`; a never-indexed field's flag is not kept: the proxy
decides what it forwards never-indexed itself).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from hpack import NeverIndexedHeaderTuple
from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_table import (
    HUFFMAN_COMPLETE,
    HUFFMAN_EMIT_SYMBOL,
    HUFFMAN_FAIL,
    HUFFMAN_TABLE,
)
from hpack.table import HeaderTable

DEFAULT_TABLE_SIZE: Final = 4096
DEFAULT_MAX_HEADER_LIST_SIZE: Final = 1 << 16
#: an integer of more continuation bytes than this is no header a peer would send (2^56)
MAX_INTEGER_BYTES: Final = 8

_STATIC: Final[list[tuple[bytes, bytes]]] = [(n, v) for n, v in HeaderTable.STATIC_TABLE]
_STATIC_LEN: Final = len(_STATIC)
#: (name, value) -> its static index, and name -> the first static index with that name
_STATIC_FULL: Final[dict[tuple[bytes, bytes], int]] = {}
_STATIC_NAME: Final[dict[bytes, int]] = {}
for _i, _entry in enumerate(_STATIC, 1):
    _STATIC_FULL.setdefault(_entry, _i)
    _STATIC_NAME.setdefault(_entry[0], _i)

#: nghttp2's Huffman decoding machine, as three flat lists (indexed state * 16 + nibble)
_H_NEXT: Final[list[int]] = [int(t[0]) for t in HUFFMAN_TABLE]
_H_FLAGS: Final[list[int]] = [int(t[1]) for t in HUFFMAN_TABLE]
_H_SYMBOL: Final[list[int]] = [int(t[2]) for t in HUFFMAN_TABLE]
_H_COMPLETE: Final = int(HUFFMAN_COMPLETE)
_H_EMIT: Final = int(HUFFMAN_EMIT_SYMBOL)
_H_FAIL: Final = int(HUFFMAN_FAIL)


def entry_size(name: bytes, value: bytes) -> int:
    return 32 + len(name) + len(value)


def decode_huffman(data: bytes) -> bytes:
    """A Huffman-coded string literal (RFC 7541 5.2), decoded a nibble at a time."""
    state = 0
    flags = _H_COMPLETE
    out = bytearray()
    for byte in data:
        i = (state << 4) + (byte >> 4)
        state = _H_NEXT[i]
        flags = _H_FLAGS[i]
        if flags & _H_FAIL:
            raise HPACKDecodingError("Invalid Huffman string")
        if flags & _H_EMIT:
            out.append(_H_SYMBOL[i])
        i = (state << 4) + (byte & 0x0F)
        state = _H_NEXT[i]
        flags = _H_FLAGS[i]
        if flags & _H_FAIL:
            raise HPACKDecodingError("Invalid Huffman string")
        if flags & _H_EMIT:
            out.append(_H_SYMBOL[i])
    if not flags & _H_COMPLETE:
        raise HPACKDecodingError("Incomplete Huffman string")
    return bytes(out)


def encode_integer(out: bytearray, value: int, prefix: int, first: int) -> None:
    """RFC 7541 5.1: `value` in a `prefix`-bit prefix of a byte whose high bits are `first`."""
    limit = (1 << prefix) - 1
    if value < limit:
        out.append(first | value)
        return
    out.append(first | limit)
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


class _Reader:
    """A position in one header block; every read is bounded by the block's end."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)

    def integer(self, prefix: int) -> int:
        data = self.data
        if self.pos >= self.end:
            raise HPACKDecodingError("Truncated header block")
        limit = (1 << prefix) - 1
        value = data[self.pos] & limit
        self.pos += 1
        if value < limit:
            return value
        shift = 0
        for _ in range(MAX_INTEGER_BYTES):
            if self.pos >= self.end:
                raise HPACKDecodingError("Truncated header block")
            byte = data[self.pos]
            self.pos += 1
            value += (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise HPACKDecodingError("Integer too long")

    def string(self) -> bytes:
        if self.pos >= self.end:
            raise HPACKDecodingError("Truncated header block")
        huffman = self.data[self.pos] & 0x80
        length = self.integer(7)
        start = self.pos
        if length > self.end - start:
            raise HPACKDecodingError("Truncated header block")
        self.pos = start + length
        raw = self.data[start : self.pos]
        return decode_huffman(raw) if huffman else raw


class DynamicTable:
    """One connection side's dynamic table (RFC 7541 2.3.2, 4.1-4.4): entries newest first,
    the oldest evicted while `size` is past `maxsize`, an entry bigger than the whole table
    empties it. The decoder's and the encoder's are this one class.

    `indexed` (the encoder's): it also keeps, for each (name, value) and each name in the
    table, the insertion number of its newest entry, so that encoding a header is two dict
    look-ups, not a scan. Insertion numbers need no storing: entries are added at the front and
    evicted from the back, so the entry at position `i` (0 the newest) was inserted as
    `inserted - i`."""

    __slots__ = ("by_field", "by_name", "entries", "indexed", "inserted", "maxsize", "size")

    def __init__(self, indexed: bool = False) -> None:
        #: newest first
        self.entries: deque[tuple[bytes, bytes]] = deque()
        #: RFC 7541 4.1 sizes: of the entries, and the most they may add up to
        self.size = 0
        self.maxsize = DEFAULT_TABLE_SIZE
        self.indexed = indexed
        #: entries ever inserted (the newest one's number)
        self.inserted = 0
        #: with `indexed`: the newest insertion number of each (name, value) and of each name
        #: in the table (empty otherwise)
        self.by_field: dict[tuple[bytes, bytes], int] = {}
        self.by_name: dict[bytes, int] = {}

    def resize(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.evict()

    def evict(self) -> None:
        entries = self.entries
        while self.size > self.maxsize and entries:
            name, value = entries.pop()
            self.size -= entry_size(name, value)
            if self.indexed:
                number = self.inserted - len(entries)  # the evicted one's
                if self.by_field.get((name, value)) == number:
                    del self.by_field[(name, value)]
                if self.by_name.get(name) == number:
                    del self.by_name[name]

    def add(self, name: bytes, value: bytes) -> None:
        size = entry_size(name, value)
        if size > self.maxsize:
            self.entries.clear()
            self.by_field.clear()
            self.by_name.clear()
            self.size = 0
            return
        self.inserted += 1
        self.entries.appendleft((name, value))
        if self.indexed:
            number = self.inserted
            self.by_field[(name, value)] = number
            self.by_name[name] = number
        self.size += size
        self.evict()

    def get(self, index: int) -> tuple[bytes, bytes]:
        """The entry at HPACK `index`: the static table's first, then this one's, newest first
        (RFC 7541 2.3.3)."""
        if 0 < index <= _STATIC_LEN:
            return _STATIC[index - 1]
        dyn = index - _STATIC_LEN - 1
        if index > 0 and dyn < len(self.entries):
            return self.entries[dyn]
        raise InvalidTableIndex(f"Invalid table index {index}")

    def index_of(self, number: int) -> int:
        """The HPACK index of the entry inserted as `number` (the newest is
        `_STATIC_LEN + 1`)."""
        return _STATIC_LEN + 1 + self.inserted - number


class Decoder:
    """Decodes header blocks for one connection (its dynamic table lives here)."""

    __slots__ = ("_table", "max_allowed_table_size", "max_header_list_size")

    def __init__(self, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        self._table = DynamicTable()
        #: the decoded size (RFC 7541 4.1 sizes) past which a block is refused: h2 sets it
        #: from the SETTINGS_MAX_HEADER_LIST_SIZE it sent
        self.max_header_list_size = max_header_list_size
        #: the most recent SETTINGS_HEADER_TABLE_SIZE sent and acknowledged (h2 sets it)
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE

    @property
    def header_table_size(self) -> int:
        return self._table.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._table.resize(value)

    def decode(self, data: bytes, raw: bool = True) -> list[tuple[bytes, bytes]]:
        """The header list of one block, as (name, value) bytes, in order. `raw` is h2's
        argument: only raw bytes are returned (h2 always asks for them)."""
        r = _Reader(bytes(data))
        table = self._table
        headers: list[tuple[bytes, bytes]] = []
        inflated = 0
        limit = self.max_header_list_size
        while r.pos < r.end:
            first = r.data[r.pos]
            header: tuple[bytes, bytes]
            if first & 0x80:  # indexed field
                index = r.integer(7)
                if index == 0:
                    raise InvalidTableIndex("Invalid table index 0")
                header = table.get(index)
            elif first & 0x40:  # literal, with incremental indexing
                index = r.integer(6)
                name = table.get(index)[0] if index else r.string()
                header = (name, r.string())
                table.add(header[0], header[1])
            elif first & 0x20:  # dynamic table size update
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                size = r.integer(5)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                table.resize(size)
                continue
            else:  # literal without indexing, or never indexed
                index = r.integer(4)
                name = table.get(index)[0] if index else r.string()
                header = (name, r.string())
            headers.append(header)
            inflated += entry_size(header[0], header[1])
            if inflated > limit:
                raise OversizedHeaderListError(
                    f"A header list larger than {limit} has been received"
                )
        if table.maxsize > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        return headers


class Encoder:
    """Encodes header blocks for one connection: static and dynamic indexing, literals raw."""

    __slots__ = ("_pending", "_table")

    def __init__(self) -> None:
        self._table = DynamicTable(indexed=True)
        #: table sizes set since the last block: the smallest and the last are announced
        self._pending: list[int] = []

    @property
    def header_table_size(self) -> int:
        return self._table.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE: the table follows it at once, and the next
        block announces it (RFC 7541 4.2)."""
        self._pending.append(value)
        self._table.resize(value)

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        """One header block. `headers`: (name, value) pairs, bytes or str, a
        `NeverIndexedHeaderTuple` (or a third item True) for a field never to be indexed.
        `huffman` is the package's argument; literals are never Huffman-coded here."""
        out = bytearray()
        table = self._table
        pending = self._pending
        if pending:
            smallest = min(pending)
            if smallest < pending[-1]:
                encode_integer(out, smallest, 5, 0x20)
            encode_integer(out, pending[-1], 5, 0x20)
            pending.clear()
        for h in headers:
            name = h[0]
            value = h[1]
            if isinstance(name, str):
                name = name.encode()
            if isinstance(value, str):
                value = value.encode()
            assert isinstance(name, bytes) and isinstance(value, bytes)
            never = isinstance(h, NeverIndexedHeaderTuple) or (len(h) > 2 and bool(h[2]))
            if not never:
                index = _STATIC_FULL.get((name, value), 0)
                if index:
                    encode_integer(out, index, 7, 0x80)
                    continue
                number = table.by_field.get((name, value), 0)
                if number:
                    encode_integer(out, table.index_of(number), 7, 0x80)
                    continue
            number = table.by_name.get(name, 0)
            name_index = table.index_of(number) if number else _STATIC_NAME.get(name, 0)
            if never:
                encode_integer(out, name_index, 4, 0x10)
            else:
                encode_integer(out, name_index, 6, 0x40)
            if not name_index:
                encode_integer(out, len(name), 7, 0)
                out += name
            encode_integer(out, len(value), 7, 0)
            out += value
            if not never:
                table.add(name, value)
        return bytes(out)


def install(conn: Any) -> None:
    """Give an `h2.connection.H2Connection` this codec, before it encodes or decodes anything
    (its limits as h2 set them are kept; h2 updates them on the codec it finds)."""
    decoder = Decoder(int(conn.decoder.max_header_list_size))
    decoder.max_allowed_table_size = int(conn.decoder.max_allowed_table_size)
    conn.decoder = decoder
    conn.encoder = Encoder()
