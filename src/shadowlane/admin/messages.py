"""The request and response types admin handlers see, and helpers to build responses.

Handlers get a fully read, decoded request (the admin API is small JSON and Prometheus text, so
buffering the body, bounded by the server, is simpler than streaming) and return one value
describing the whole response; all HTTP framing stays in `admin.server`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "AdminRequest",
    "AdminResponse",
    "Handler",
    "error_response",
    "json_response",
    "text_response",
]


@dataclass(slots=True)
class AdminRequest:
    """One admin request, read completely.

    `path` is the path as sent (still percent-encoded, without the query); `query` holds the first
    value of each query parameter, decoded; `headers` has lower-case names, repeated headers joined
    with ", "; `params` holds the decoded `{name}` segments of the matched route pattern.
    """

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body parsed as JSON (raises `orjson.JSONDecodeError`, a `ValueError`, if invalid)."""
        return orjson.loads(self.body)


@dataclass(slots=True)
class AdminResponse:
    """A whole response. The server sets Content-Length and framing; `headers` adds the rest."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: Sequence[tuple[str, str]] = ()


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]


def json_response(
    obj: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()
) -> AdminResponse:
    """`obj` serialized with orjson (dataclasses, datetimes and non-str dict keys included)."""
    body = orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    return AdminResponse(status=status, body=body, headers=headers)


def text_response(
    text: str,
    status: int = 200,
    content_type: str = "text/plain; charset=utf-8",
    headers: Sequence[tuple[str, str]] = (),
) -> AdminResponse:
    """A UTF-8 text response (plain text by default; pass text/html for the dashboard)."""
    return AdminResponse(
        status=status, body=text.encode("utf-8"), content_type=content_type, headers=headers
    )


def error_response(
    status: int, message: str, headers: Sequence[tuple[str, str]] = (), **extra: Any
) -> AdminResponse:
    """The one error shape of the admin API: `{"error": message, ...extra}`."""
    return json_response({"error": message, **extra}, status=status, headers=headers)
