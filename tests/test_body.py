"""`Body`: a request body kept as the chunks it came in, joined only for a reader that parses it.

The shadow copies write `parts` as they are; these tests pin what the readers that do need one
bytes get (the whole body, joined once and shared) and that a report's example never joins more
than its limit needs.
"""

from __future__ import annotations

from shadowlane.wire.messages import EMPTY_BODY, Body, body_of


def test_data_joins_once_and_later_readers_share_it() -> None:
    parts = [b"abc", b"defg", b"h"]
    body = Body(list(parts), 8)
    whole = body.data()
    assert whole == b"abcdefgh"
    assert body.parts == [whole]  # kept joined: the next reader gets the same object
    assert body.data() is whole
    assert body.size == 8


def test_one_chunk_is_its_own_data() -> None:
    chunk = b"x" * 1000
    body = Body([chunk], len(chunk))
    assert body.data() is chunk  # no copy for a body that came in one read


def test_prefix_takes_only_the_chunks_it_needs() -> None:
    parts = [b"ab", b"cd", b"ef", b"gh"]
    body = Body(parts, 8)
    assert body.prefix(3) == b"abc"
    assert body.prefix(1) == b"a"
    assert body.prefix(100) == b"abcdefgh"
    assert body.parts is parts  # a prefix never replaces the chunks with a joined body


def test_empty_bodies() -> None:
    assert EMPTY_BODY.size == 0 and EMPTY_BODY.data() == b"" and EMPTY_BODY.prefix(10) == b""
    assert body_of(b"") is EMPTY_BODY
    one = body_of(b"payload")
    assert one.parts == [b"payload"] and one.size == 7
