"""`record:` on a route or a shadow: where recordings go, what they hold, their bounds, redaction.

A recording is written in GoReplay's format (record/goreplay.py) to rotating files in `dir`, by
a writer thread that the event loop only hands records to (record/writer.py); docs/recording.md
says what each key does. Everything that could make a recording silently useless is checked
here: a redaction path that could never match a body, a header name that is not one, a sampling
key in another syntax than the shadows' (the same users must be recorded and shadowed when both
sample by the same key).
"""

from __future__ import annotations

import os
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field

from shadowlane.config.base import _Model, _none_to_empty
from shadowlane.config.comparison import HeaderNames, _check_field_path
from shadowlane.config.sampling import Percent, _check_sample_by
from shadowlane.config.units import Size, Timeout


def _check_body_path(value: str) -> str:
    """A field path rule as the comparison writes them, limited to bodies: what is masked is a
    value inside a JSON body (headers are removed by `redact.headers`, not masked)."""
    text = _check_field_path(value)
    root = re.split(r"[.\[]", text, maxsplit=1)[0]
    if root not in ("body", "**"):
        raise ValueError(
            f"bad redaction path {value!r}: must start with body (or **); "
            "headers are removed with redact.headers"
        )
    return text


BodyPaths = Annotated[
    list[Annotated[str, AfterValidator(_check_body_path)]],
    BeforeValidator(_none_to_empty(list)),
]


def _check_query_names(value: list[str]) -> list[str]:
    for name in value:
        if not name or any(c in name for c in "&=# "):
            raise ValueError(f"not a query argument name: {name!r}")
    return value


QueryNames = Annotated[
    list[str], BeforeValidator(_none_to_empty(list)), AfterValidator(_check_query_names)
]


def _check_env_name(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"not an environment variable name: {value!r}")
    return value


class RedactConfig(_Model, frozen=True):
    """What never reaches a recording file (nor, for a route, the comparison store's examples).

    Headers are removed; JSON body fields and query arguments are replaced by `~h:` and 12 hex
    digits of SHA-256(secret + value), so equal values stay equal after masking.
    """

    #: header names removed from recorded requests and answers (case-insensitive)
    headers: HeaderNames = Field(default_factory=list)
    #: JSON body field paths masked (`body.password`, `body.items[*].card`, `**.token`);
    #: written `json` in the file (`json_` here: BaseModel has a method of that name)
    json_: BodyPaths = Field(default_factory=list, alias="json")
    #: query argument names whose values are masked
    query: QueryNames = Field(default_factory=list)
    #: an environment variable holding the masking secret (to share one across instances and
    #: directories); without it, a random secret is kept in `<dir>/.shadowlane-redact.key`
    secret_env: Annotated[str | None, AfterValidator(_check_env_name)] = None

    def __bool__(self) -> bool:
        return bool(self.headers or self.json_ or self.query)


def _check_dir(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if os.path.exists(value) and not os.path.isdir(value):
        raise ValueError(f"not a directory: {value}")
    return value


def _positive_size(value: int) -> int:
    if value <= 0:
        raise ValueError("must be > 0")
    return value


class RecordConfig(_Model, frozen=True):
    """Recording of a route's requests (or of the copies a shadow is sent) to GoReplay files."""

    #: the directory the files go to (created if missing)
    dir: Annotated[str, AfterValidator(_check_dir)]
    #: also record each answer (the primary's on a route, the shadow's on a shadow): GoReplay's
    #: type 2 payloads, with the latency
    answers: bool = False
    percent: Percent = 100.0
    #: consistent sampling, as a shadow's `sample_by`
    sample_by: Annotated[str | None, AfterValidator(_check_sample_by)] = None
    #: a file is closed and a new one started past this size (bytes on disk) ...
    max_file_size: Annotated[Size, AfterValidator(_positive_size)] = 256 * 1024**2
    #: ... or this age
    max_file_age: Timeout = 3600.0
    #: gzip the files (`.gor.gz`, one gzip member per index block). Off by default, as in
    #: GoReplay (which compresses only a file named `.gz`): compressing costs the proxy's cores
    #: more than the recording itself (bench: record-100 vs record-100-gzip)
    gzip: bool = False
    #: a request whose body is bigger is not recorded (`skipped_body`); an answer's body is cut
    #: here (and marked, see docs/recording.md)
    max_body: Size = 1024**2
    #: bytes waiting for the writer; past it records are dropped (`dropped`), never waited for
    queue: Annotated[Size, AfterValidator(_positive_size)] = 64 * 1024**2
    redact: Annotated[RedactConfig, BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=RedactConfig
    )

    @property
    def sample_key(self) -> tuple[str, str] | None:
        """`sample_by` split as (kind, name), as `ShadowConfig.sample_key`."""
        if self.sample_by is None:
            return None
        kind, _, name = self.sample_by.partition(":")
        return kind, name
