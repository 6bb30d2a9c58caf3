"""The data handed from the proxy (hot path) to the comparison engine (off the hot path).

The proxy builds one `CompareJob` per compared request once the primary's answer and the
shadow's (and, with noise cancellation, the secondary's) are all in, and submits it with a
non-blocking call. Everything here is plain data: bytes as received, nothing parsed yet, so the
hot path pays only for the capture.

`Captured` and `CompareJob` are built on the event loop for every compared request, so their
`__init__` is written out: this module is compiled by mypyc, which compiles a method written in
the class but keeps the `__init__` that `dataclass` generates as interpreted Python (three
interpreted calls with keyword arguments per compared request, measured with callgrind: about a
quarter of what comparing identical answers cost the loop). `dataclass` still gives them their
fields, `==` and repr; it does not replace an `__init__` the class defines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Captured:
    """One answer as captured: status, headers (lower-case names), body up to the cap, and the
    trailers an HTTP/2 answer ends with (gRPC puts its status there)."""

    status: int
    headers: Headers
    body: bytes
    #: the body was longer than the capture cap and is cut
    truncated: bool
    #: time from sending the request to the end of the answer
    seconds: float
    #: "" for a complete answer; else why there is none ("error", "timeout")
    failure: str = ""
    #: trailing headers (HTTP/2 trailers: `grpc-status`, `grpc-message`), lower-case names, in
    #: the order received; empty for HTTP/1.1 answers
    trailers: Headers = field(default_factory=list)

    def __init__(  # written out: see the module's docstring
        self,
        status: int,
        headers: Headers,
        body: bytes,
        truncated: bool,
        seconds: float,
        failure: str = "",
        trailers: Headers | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.truncated = truncated
        self.seconds = seconds
        self.failure = failure
        self.trailers = [] if trailers is None else trailers


@dataclass(slots=True)
class CompareJob:
    route: str
    #: the shadow (candidate) backend name
    target: str
    request_id: str
    method: str
    #: path and query as sent by the client
    uri: str
    #: request body, cut to the example cap (kept only for example pairs)
    request_body: bytes
    primary: Captured
    candidate: Captured
    #: the answer of the `secondary` backend (same version as primary), for noise
    secondary: Captured | None
    #: the shadow's compare settings; the engine's own compiled type (see compare.engine).
    #: `Any`, not `object`: mypyc compiles this module and cannot resolve a field annotated
    #: `object` at import (KeyError: 'object')
    settings: Any = None
    ts: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    def __init__(  # written out: see the module's docstring
        self,
        route: str,
        target: str,
        request_id: str,
        method: str,
        uri: str,
        request_body: bytes,
        primary: Captured,
        candidate: Captured,
        secondary: Captured | None,
        settings: Any = None,
        ts: float = 0.0,
        extra: dict[str, object] | None = None,
    ) -> None:
        self.route = route
        self.target = target
        self.request_id = request_id
        self.method = method
        self.uri = uri
        self.request_body = request_body
        self.primary = primary
        self.candidate = candidate
        self.secondary = secondary
        self.settings = settings
        self.ts = ts
        self.extra = {} if extra is None else extra


@dataclass(slots=True)
class Decision:
    """What deciding one job found: all the proxy's process needs for metrics and the store.

    Small on purpose: it is what a comparison child sends back (compare/pool.py), so the
    answers themselves never travel twice; the example pair's bodies are cut to
    `EXAMPLE_BODY_CAP` each.
    """

    #: "match", "noise", "diff", or "error" (the job could not be decided; logged where it was)
    result: str
    differing: list[str]
    noise: list[str]
    #: the example pair (`store.Example`'s fields, as keyword arguments) when anything differed
    example: dict[str, object] | None = None
    #: CPU seconds deciding took where it ran: what `cpu_share` rests for (a round trip's wall
    #: time would also count a child starting up, or waiting for a core on a busy machine)
    cpu: float = 0.0
