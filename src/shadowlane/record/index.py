"""The `.idx` beside each of our recordings, and seeking a recording by time with it.

The writer ends a block every `INDEX_RECORDS` records or `INDEX_INTERVAL` seconds and appends
one JSON line per block: `{"offset", "length", "records", "ts", "min_ts", "max_ts"}`. `offset`
is where the block starts in the file (a gzip member's start in a `.gor.gz`), `ts` the first
record's timestamp, `min_ts`/`max_ts` the block's extremes (nanoseconds since the epoch).

Records are appended as requests end, stamped with when they started, so a file is in time
order only within the longest request; `min_ts`/`max_ts` make seeking exact anyway: every
record at or after T is in a block whose `max_ts` >= T, so reading from the first such block
and keeping records >= T misses none. A file without an index (GoReplay's, or ours cut short)
is read from its start.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from shadowlane.record.goreplay import Payload, iter_file, iter_file_from


@dataclass(frozen=True, slots=True)
class Block:
    offset: int
    length: int
    records: int
    ts: int
    min_ts: int
    max_ts: int


def index_path(path: str | os.PathLike[str]) -> str:
    return os.fspath(path) + ".idx"


def read_index(path: str | os.PathLike[str]) -> list[Block]:
    """The blocks of a recording's index ([] when it has none); a torn last line is skipped."""
    try:
        with open(index_path(path), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out: list[Block] = []
    for line in lines:
        try:
            d = json.loads(line)
            out.append(Block(int(d["offset"]), int(d["length"]), int(d["records"]),
                             int(d["ts"]), int(d["min_ts"]), int(d["max_ts"])))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            continue
    return out


def seek_offset(path: str | os.PathLike[str], ts_ns: int) -> int | None:
    """Where to start reading for the records at or after `ts_ns`: 0 without an index, None
    when the index says no record is that late."""
    blocks = read_index(path)
    if not blocks:
        return 0
    for b in blocks:
        if b.max_ts >= ts_ns:
            return b.offset
    # past the last indexed block there may be records not indexed yet (an open file)
    last = blocks[-1]
    end = last.offset + last.length
    return end if os.path.getsize(path) > end else None


def iter_since(path: str | os.PathLike[str], ts_ns: int) -> Iterator[Payload]:
    """The records of one file stamped at or after `ts_ns`, read from the first block that can
    hold one (a request and its answers share a timestamp, so pairs stay together)."""
    offset = seek_offset(path, ts_ns)
    if offset is None:
        return
    records = iter_file(path) if offset == 0 else iter_file_from(path, offset)
    for p in records:
        if p.ts_ns >= ts_ns:
            yield p
