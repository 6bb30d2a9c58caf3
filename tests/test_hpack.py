"""The compiled HPACK codec (wire/hpack.py) against the `hpack` package's, on generated input.

h2 frames HTTP/2 and calls a codec per header block; the proxy gives its connections ours. What
must hold, for sequences of blocks on one connection (the dynamic table carries over): what our
encoder writes, the package's decoder reads back as the list given (and ours does too); what
the package's encoder writes, with or without Huffman coding, ours reads as the package's
decoder does; table size changes are announced and followed; and bytes that are no header
block raise the package's `HPACKDecodingError` (which h2 turns into a connection error), never
anything else, and never a list the package's decoder would not give.
"""

from __future__ import annotations

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowlane.wire.hpack import Decoder, Encoder, decode_huffman, install

#: names and values drawn from what HTTP/2 carries (so the static and dynamic tables hit) and
#: from arbitrary bytes (so they miss)
COMMON_NAMES = [b":method", b":path", b":status", b":authority", b"content-type",
                b"x-request-id", b"grpc-status", b"accept-encoding", b"cookie"]  # fmt: skip
COMMON_VALUES = [b"GET", b"POST", b"/", b"200", b"404", b"application/grpc", b"gzip, deflate",
                 b"", b"0"]  # fmt: skip
names = st.one_of(st.sampled_from(COMMON_NAMES), st.binary(min_size=1, max_size=40))
values = st.one_of(st.sampled_from(COMMON_VALUES), st.binary(max_size=300))
field = st.tuples(names, values, st.booleans())
block = st.lists(field, max_size=20)
blocks = st.lists(block, min_size=1, max_size=8)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def as_input(fields: list[tuple[bytes, bytes, bool]]) -> list[object]:
    """(name, value, sensitive) as h2 hands them over: sensitive ones never-indexed."""
    return [
        hpack.NeverIndexedHeaderTuple(n, v) if never else hpack.HeaderTuple(n, v)
        for n, v, never in fields
    ]


@SETTINGS
@given(blocks)
def test_what_we_encode_the_package_decodes_as_given(
    seq: list[list[tuple[bytes, bytes, bool]]],
) -> None:
    ours, theirs, mine = Encoder(), hpack.Decoder(), Decoder()
    for fields in seq:
        data = ours.encode(as_input(fields))
        expected = [(n, v) for n, v, _ in fields]
        assert [(bytes(n), bytes(v)) for n, v in theirs.decode(data, raw=True)] == expected
        assert mine.decode(data) == expected


@SETTINGS
@given(blocks, st.booleans())
def test_what_the_package_encodes_we_decode_as_it_does(
    seq: list[list[tuple[bytes, bytes, bool]]], huffman: bool
) -> None:
    theirs, reference, mine = hpack.Encoder(), hpack.Decoder(), Decoder()
    for fields in seq:
        data = theirs.encode(as_input(fields), huffman=huffman)
        expected = [(bytes(n), bytes(v)) for n, v in reference.decode(data, raw=True)]
        assert mine.decode(data) == expected == [(n, v) for n, v, _ in fields]


@SETTINGS
@given(blocks, st.lists(st.integers(min_value=0, max_value=8192), min_size=1, max_size=4))
def test_table_size_changes_are_announced_and_followed(
    seq: list[list[tuple[bytes, bytes, bool]]], sizes: list[int]
) -> None:
    ours, theirs = Encoder(), hpack.Decoder()
    theirs.max_allowed_table_size = 8192
    mine = Decoder()
    mine.max_allowed_table_size = 8192
    for i, fields in enumerate(seq):
        ours.header_table_size = sizes[i % len(sizes)]
        data = ours.encode(as_input(fields))
        expected = [(n, v) for n, v, _ in fields]
        assert [(bytes(n), bytes(v)) for n, v in theirs.decode(data, raw=True)] == expected
        assert mine.decode(data) == expected
        assert mine.header_table_size == theirs.header_table_size == sizes[i % len(sizes)]


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64))
def test_bytes_that_are_no_header_block_raise_the_packages_error(data: bytes) -> None:
    mine, theirs = Decoder(), hpack.Decoder()
    try:
        got = mine.decode(data)
    except hpack.HPACKDecodingError:
        return  # h2 turns it into a connection error (GOAWAY COMPRESSION_ERROR)
    # accepted: then it is what the package reads too
    assert [(bytes(n), bytes(v)) for n, v in theirs.decode(data, raw=True)] == got


def test_a_header_list_over_the_limit_is_refused() -> None:
    data = hpack.Encoder().encode([(b"x-big", b"v" * 2000)] * 40)
    mine = Decoder(max_header_list_size=64 * 1024)
    with pytest.raises(hpack.OversizedHeaderListError):
        mine.decode(data)


def test_a_table_bigger_than_allowed_is_refused() -> None:
    enc = hpack.Encoder()
    enc.header_table_size = 8192
    data = enc.encode([(b"a", b"b")])
    with pytest.raises(hpack.InvalidTableSizeError):
        Decoder().decode(data)  # allowed: the default 4096


def test_huffman_strings_decode_as_the_package_decodes_them() -> None:
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

    coder = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    for text in (b"www.example.com", b"no-cache", bytes(range(256)), b""):
        assert decode_huffman(coder.encode(text)) == text
    with pytest.raises(hpack.HPACKDecodingError):
        decode_huffman(b"\xff\xff\xff\xff")  # the EOS symbol is never valid in a string


def test_install_keeps_the_limits_h2_set() -> None:
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    conn = H2Connection(H2Configuration(client_side=False))
    limit = conn.decoder.max_header_list_size
    install(conn)
    assert isinstance(conn.decoder, Decoder) and isinstance(conn.encoder, Encoder)
    assert conn.decoder.max_header_list_size == limit
