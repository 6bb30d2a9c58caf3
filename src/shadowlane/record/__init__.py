"""Recording traffic (GoReplay's format) and reading recordings back for replay."""

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
    iter_merged,
    recording_files,
)

__all__ = [
    "RECORD_KINDS",
    "REPLAYED",
    "REQUEST",
    "RESPONSE",
    "SEPARATOR",
    "FormatError",
    "Payload",
    "decode",
    "encode",
    "iter_file",
    "iter_merged",
    "recording_files",
]
