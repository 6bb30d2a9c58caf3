"""GoReplay's file format: what `record:` writes and `shadowlane replay` reads.

One payload is a header line, the raw HTTP message as it went over the wire, and a separator:

    1 8a3f0c52e1b94d7aa0c1f3e2 1733090000123456789 0\\n
    POST /orders/_bulk HTTP/1.1\\r\\n ... \\r\\n\\r\\n<body>
    \\n🐵🙈🙉\\n

The header is `type id timestamp latency` (GoReplay's `payloadHeader`): type `1` a request, `2`
the original answer to it, `3` an answer seen at replay; `id` joins a request to its answers
(24 hex digits in GoReplay; any token without spaces is read); `timestamp` is nanoseconds since
the epoch (for a request: when it started; for an answer: when the request started, as GoReplay
writes it); `latency` is nanoseconds from the request's start to the answer (0 for requests).
GoReplay 1.0 wrote only three fields; a missing latency reads as 0. Files may be gzipped (GoReplay's
`.gz` output), which the reader sees from the magic bytes, not the name.

Using GoReplay's format, not one of our own, is what lets a team replay our recordings with
GoReplay and theirs with us (issue: record/replay). The format has one weakness it shares with
GoReplay: a message containing the separator itself splits there. The writer refuses such a
message (counted) rather than writing a file neither tool can read back.
"""

from __future__ import annotations

import gzip
import heapq
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

REQUEST = 1
RESPONSE = 2
REPLAYED = 3
RECORD_KINDS = (REQUEST, RESPONSE, REPLAYED)
SEPARATOR = "\n🐵🙈🙉\n".encode()
_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Payload:
    """One record: a request (`kind` 1) or an answer (2 recorded, 3 replayed)."""

    kind: int
    id: str
    #: nanoseconds since the epoch at which the request started
    ts_ns: int
    #: nanoseconds from the request's start to the end of this answer (0 for a request)
    latency_ns: int
    #: the raw HTTP message
    data: bytes


class FormatError(ValueError):
    """A file that is not GoReplay's format; says where."""


def encode(p: Payload) -> bytes:
    """The bytes of one record, separator included."""
    if p.data.find(SEPARATOR) >= 0:
        raise FormatError("message contains the payload separator; it cannot be recorded")
    if not p.id or any(c in p.id for c in " \n"):
        raise FormatError(f"bad payload id {p.id!r}")
    header = b"%d %s %d %d\n" % (p.kind, p.id.encode("ascii"), p.ts_ns, p.latency_ns)
    return header + p.data + SEPARATOR


def decode(record: bytes, where: str = "") -> Payload:
    """One record without its separator."""
    nl = record.find(b"\n")
    if nl < 0:
        raise FormatError(f"{where}: record without a header line")
    fields = record[:nl].split()
    if len(fields) < 3 or len(fields[0]) != 1 or fields[0] not in (b"1", b"2", b"3"):
        raise FormatError(f"{where}: not a GoReplay payload header: {record[:nl][:80]!r}")
    try:
        ts = int(fields[2])
        latency = int(fields[3]) if len(fields) > 3 else 0
    except ValueError:
        raise FormatError(f"{where}: bad timestamp or latency: {record[:nl][:80]!r}") from None
    return Payload(
        int(fields[0]), fields[1].decode("ascii", "replace"), ts, latency, record[nl + 1 :]
    )


def _open(path: str | os.PathLike[str]) -> BinaryIO:
    raw = open(path, "rb")  # noqa: SIM115 - handed to the caller, closed by iter_file
    magic = raw.read(2)
    raw.seek(0)
    if magic == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def iter_file(path: str | os.PathLike[str]) -> Iterator[Payload]:
    """Every record of one file, in file order; memory bounded by the largest record."""
    with _open(path) as f:
        yield from _records(f, os.fspath(path))


def iter_file_from(path: str | os.PathLike[str], offset: int) -> Iterator[Payload]:
    """The records of one file from byte `offset` on: a record boundary of a plain file, or
    the start of a gzip member (what the `.idx` beside our recordings lists, record/index.py)."""
    where = os.fspath(path)
    with open(path, "rb") as raw:
        raw.seek(offset)
        magic = raw.read(2)
        raw.seek(offset)
        if magic == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                yield from _records(f, f"{where}@{offset}")  # type: ignore[arg-type]
        else:
            yield from _records(raw, f"{where}@{offset}")


def _records(f: BinaryIO, where: str) -> Iterator[Payload]:
    buf = b""
    n = 0
    while True:
        chunk = f.read(_READ_CHUNK)
        if chunk:
            buf += chunk
        start = 0
        while True:
            i = buf.find(SEPARATOR, start)
            if i < 0:
                break
            n += 1
            yield decode(buf[start:i], f"{where}: record {n}")
            start = i + len(SEPARATOR)
        buf = buf[start:]
        if not chunk:
            break
    if buf.strip():
        # GoReplay's scanner takes a last record without a separator too
        n += 1
        yield decode(buf, f"{where}: record {n}")


def iter_merged(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Payload]:
    """Records of several files (instances, workers) merged by timestamp.

    Each file is in time order already (a writer appends as requests start); a stable merge of
    the files keeps a request before its answer, which has the same timestamp."""
    streams = [iter_file(p) for p in paths]
    keyed = (((p.ts_ns, i, n, p) for n, p in enumerate(stream)) for i, stream in enumerate(streams))
    for _ts, _i, _n, payload in heapq.merge(*keyed):
        yield payload


def recording_files(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Files named directly, plus the recordings (`*.gor`, `*.gor.gz`) in directories named."""
    out: list[str] = []
    for p in paths:
        path = os.fspath(p)
        if os.path.isdir(path):
            names = sorted(
                n for n in os.listdir(path) if n.endswith((".gor", ".gor.gz", ".log", ".log.gz"))
            )
            out += [os.path.join(path, n) for n in names]
        else:
            out.append(path)
    return out
