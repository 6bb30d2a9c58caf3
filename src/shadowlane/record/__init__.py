"""Recording traffic (GoReplay's format) and reading recordings back for replay.

`goreplay` is the format; `recorder` the event loop's half of a recording (sample, bound, hand
over), `writer` the thread that writes files, `redact` what never reaches them, `index` seeking
a file by time.
"""

from __future__ import annotations

from shadowlane.record.goreplay import (
    RECORD_KINDS,
    REPLAYED,
    REQUEST,
    RESPONSE,
    SEPARATOR,
    FormatError,
    Payload,
    decode,
    encode,
    iter_file,
    iter_file_from,
    iter_merged,
    recording_files,
)
from shadowlane.record.index import Block, iter_since, read_index, seek_offset
from shadowlane.record.recorder import Recorder, RecordItem, encode_item, payload_id
from shadowlane.record.redact import KEY_FILE, build_redaction, load_secret
from shadowlane.record.writer import RecordWriter

__all__ = [
    "KEY_FILE",
    "RECORD_KINDS",
    "REPLAYED",
    "REQUEST",
    "RESPONSE",
    "SEPARATOR",
    "Block",
    "FormatError",
    "Payload",
    "RecordItem",
    "RecordWriter",
    "Recorder",
    "build_redaction",
    "decode",
    "encode",
    "encode_item",
    "iter_file",
    "iter_file_from",
    "iter_merged",
    "iter_since",
    "load_secret",
    "payload_id",
    "read_index",
    "recording_files",
    "seek_offset",
]
