"""The request-head verdict in-process: the bad-request tables, and the framing of good heads.

``tests/test_http_bad_requests.py`` proves end to end, through a proxy process, that each bad
request is answered, closed and never reaches a backend. Here the same tables
(``support.bad_requests``) run in-process, in two layers:

1. ``decide_head`` alone, on header lists, with no parser: every table whose fault is in the
   head's fields (framing, Host, version, method, expectation, size). The rules llhttp enforces
   first (two Content-Lengths, one that is not digits, Content-Length with Transfer-Encoding)
   hold here too, so the verdict stands without the parser.
2. A ``ServerConnection`` fed the tables' raw bytes, with a fake transport and an application
   that records what it is handed: every table, the syntax faults only llhttp sees and the bad
   chunks included, gets its answer, the close, and no request reaches the application.

Then the decisions on good heads: the body framing, the Host name, the origin-form target,
``100-continue``, and the order in which the rules are checked.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass

import httptools
import pytest

from shadowlane.wire import request_head as rh
from shadowlane.wire.messages import Headers
from shadowlane.wire.request_head import (
    Framing,
    Rejection,
    RequestHead,
    decide_head,
    parse_host,
    parser_rejection,
)
from shadowlane.wire.server import Exchange, ServerConnection, ServerLimits, ServerState
from support import bad_requests as cases
from support.bad_requests import GOOD_HOST, MAX_HEADER, head


def fields(lines: Iterable[str]) -> Headers:
    """Header lines as the server's `on_header` collects them: lower-cased names, values as
    llhttp delivers them (leading whitespace gone)."""
    out: Headers = []
    for line in lines:
        name, _, value = line.partition(":")
        out.append((name.lower().encode("latin-1"), value.lstrip(" \t").encode("latin-1")))
    return out


def verdict(
    *lines: str,
    method: str = "POST",
    target: str = "/",
    version: str = "1.1",
    host: str | None = GOOD_HOST,
    max_header_size: int = MAX_HEADER,
) -> RequestHead | Rejection:
    """`decide_head` for a head with `Host: host` (none when None) and then `lines`."""
    headers = fields([f"Host: {host}"] if host is not None else [])
    headers += fields(lines)
    return decide_head(method.encode(), target.encode(), version, headers, max_header_size)


def accepted(result: RequestHead | Rejection) -> RequestHead:
    assert isinstance(result, RequestHead), f"rejected: {result!r}"
    return result


def rejected(result: RequestHead | Rejection, status: int = 400) -> Rejection:
    assert isinstance(result, Rejection), f"accepted: {result!r}"
    assert result.status == status, result
    return result


# -- 1. the bad-request tables against the verdict alone ---------------------------------------


@pytest.mark.parametrize(
    "lines", [c[0] for c in cases.LENGTH_AND_CHUNKED.values()], ids=cases.LENGTH_AND_CHUNKED.keys()
)
def test_length_and_chunked(lines: list[str]) -> None:
    assert rejected(verdict(*lines)) is rh.LENGTH_AND_CHUNKED


@pytest.mark.parametrize(
    "values", cases.TWO_CONTENT_LENGTHS.values(), ids=cases.TWO_CONTENT_LENGTHS.keys()
)
def test_two_content_lengths(values: tuple[str, str]) -> None:
    result = verdict(*(f"Content-Length: {v}" for v in values))
    assert rejected(result) is rh.DUPLICATE_CONTENT_LENGTH


@pytest.mark.parametrize(
    "value", cases.MALFORMED_CONTENT_LENGTHS.values(), ids=cases.MALFORMED_CONTENT_LENGTHS.keys()
)
def test_malformed_content_length(value: str) -> None:
    assert rejected(verdict(f"Content-Length: {value}")) is rh.MALFORMED_CONTENT_LENGTH


@pytest.mark.parametrize(
    "lines",
    cases.TRANSFER_ENCODING_NOT_CHUNKED.values(),
    ids=cases.TRANSFER_ENCODING_NOT_CHUNKED.keys(),
)
def test_transfer_encoding_not_exactly_chunked(lines: list[str]) -> None:
    result = rejected(verdict(*lines))
    assert result in (rh.UNSUPPORTED_TRANSFER_ENCODING, rh.DUPLICATE_TRANSFER_ENCODING)


def test_bad_chunks_have_a_good_head() -> None:
    """The chunk tables' faults are in the body: the head is accepted as chunked, and it is
    the parser that refuses the body (layer 2)."""
    assert accepted(verdict("Transfer-Encoding: chunked")).framing is Framing.CHUNKED


def test_missing_host() -> None:
    assert rejected(verdict("X-A: b", method="GET", host=None)) is rh.MISSING_HOST


@pytest.mark.parametrize("second", cases.SECOND_HOSTS.values(), ids=cases.SECOND_HOSTS.keys())
def test_duplicate_host(second: str) -> None:
    assert rejected(verdict(f"Host: {second}", method="GET")) is rh.DUPLICATE_HOST


@pytest.mark.parametrize("value", cases.MALFORMED_HOSTS.values(), ids=cases.MALFORMED_HOSTS.keys())
def test_malformed_host(value: str) -> None:
    assert rejected(verdict(method="GET", host=value)) is rh.MALFORMED_HOST


@pytest.mark.parametrize("version", ["2.0", *cases.UNKNOWN_VERSIONS])
def test_unknown_version(version: str) -> None:
    result = verdict(method="GET", version=version)
    assert rejected(result, 505) is rh.VERSION_NOT_SUPPORTED


def test_connect() -> None:
    result = verdict(method="CONNECT", target="example.test:443", host="example.test:443")
    assert rejected(result, 501) is rh.CONNECT_NOT_SUPPORTED


def test_unsupported_expectation() -> None:
    result = verdict(cases.UNSUPPORTED_EXPECTATION, method="GET")
    assert rejected(result, 417) is rh.UNSUPPORTED_EXPECTATION


@pytest.mark.parametrize(
    "lines", [[cases.ONE_HUGE_HEADER], cases.MANY_HEADERS], ids=["one-huge", "many"]
)
def test_head_over_the_size_limit(lines: list[str]) -> None:
    assert rejected(verdict(*lines, method="GET"), 431) is rh.HEADER_TOO_LARGE


def test_head_just_under_the_size_limit() -> None:
    accepted(verdict(cases.JUST_UNDER_THE_LIMIT, method="GET"))


def test_size_limit_counts_target_and_every_field() -> None:
    """`len(target) + sum(len(name) + len(value) + 4)`: ": " and CRLF per field."""
    lines = ["X-A: " + "a" * 10]
    size = len("/") + len("host") + len(GOOD_HOST) + 4 + len("x-a") + 10 + 4
    accepted(verdict(*lines, method="GET", max_header_size=size))
    rejected(verdict(*lines, method="GET", max_header_size=size - 1), 431)


# -- 2. the tables' raw bytes through the server's parser callbacks, in-process ----------------


class FakeTransport:
    """Just what ServerConnection uses of a transport; records writes and the close."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default


class AnsweringApp:
    """Records each exchange it is handed and answers it 200 on the next loop iteration, as
    the proxy answers once its backend did."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def handle(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)
        asyncio.get_running_loop().call_soon(exchange.respond, 200, b"ok\n")


@dataclass
class Served:
    statuses: list[int]  #: the status of each answer written, in order
    written: bytes
    closed: bool
    targets: list[bytes]  #: the request targets the application was handed, in order
    exchanges: list[Exchange]


def serve(*segments: bytes) -> Served:
    """Feed `segments` (one `data_received` each) to a fresh ServerConnection."""

    async def run() -> Served:
        app = AnsweringApp()
        conn = ServerConnection(ServerState(app, ServerLimits(max_header_size=MAX_HEADER)))
        transport = FakeTransport()
        conn.connection_made(transport)
        for segment in segments:
            conn.data_received(segment)
        for _ in range(20):  # let the answers (and the requests they release) run
            await asyncio.sleep(0)
        written = bytes(transport.written)
        statuses = [int(s) for s in re.findall(rb"(?m)^HTTP/1\.1 (\d{3}) ", written)]
        targets = [ex.request.target for ex in app.exchanges]
        return Served(statuses, written, transport.closed, targets, app.exchanges)

    return asyncio.run(run())


def check_rejected(data: bytes, status: int = 400) -> Served:
    """The in-process twin of test_http_bad_requests.check_rejected: one answer with `status`,
    `connection: close`, the connection closed, and nothing handed to the application."""
    served = serve(data)
    assert served.statuses == [status], served.written[:300]
    assert b"connection: close\r\n" in served.written
    assert served.closed
    assert served.targets == []
    return served


def _raw(table: dict[str, bytes]) -> list[object]:
    return [pytest.param(data, id=name) for name, data in table.items()]


# Every table of test_http_bad_requests.py, as (bytes, the status the proxy answers today).
# Where that test accepts either 400 or 505, the answer today is the one given here.
RAW_CASES: list[object] = [
    *(
        pytest.param(head(*lines) + body, 400, id=f"length-and-chunked-{name}")
        for name, (lines, body) in cases.LENGTH_AND_CHUNKED.items()
    ),
    *(
        pytest.param(head(*(f"Content-Length: {v}" for v in values)) + b"abcd", 400, id=name)
        for name, values in cases.TWO_CONTENT_LENGTHS.items()
    ),
    *(
        pytest.param(head(f"Content-Length: {value}") + b"abc", 400, id=f"content-length-{name}")
        for name, value in cases.MALFORMED_CONTENT_LENGTHS.items()
    ),
    *(
        pytest.param(head(*lines) + cases.CHUNKED_BODY, 400, id=f"te-{name}")
        for name, lines in cases.TRANSFER_ENCODING_NOT_CHUNKED.items()
    ),
    *(
        pytest.param(head("Transfer-Encoding: chunked") + body, 400, id=f"chunk-{name}")
        for name, body in cases.BAD_CHUNKS.items()
    ),
    pytest.param(
        head("Transfer-Encoding: chunked") + cases.BAD_SECOND_CHUNK, 400, id="bad-second-chunk"
    ),
    *(
        pytest.param(head("X-Folded: first", f"{fold}continued", method="GET"), 400, id=name)
        for name, fold in cases.LINE_FOLDS.items()
    ),
    *(pytest.param(d, 400, id=n) for n, d in cases.BARE_CR_OR_LF_IN_REQUEST_LINE.items()),
    *(pytest.param(d, 400, id=n) for n, d in cases.BARE_CR_OR_LF_IN_HEADERS.items()),
    *(pytest.param(d, 400, id=f"ws-{n}") for n, d in cases.WHITESPACE_BEFORE_COLON.items()),
    pytest.param(head(cases.NUL_IN_HEADER_VALUE, method="GET"), 400, id="nul"),
    pytest.param(head(method="GET", target=cases.SPACE_IN_TARGET), 400, id="space-in-target"),
    pytest.param(cases.MISSING_HOST, 400, id="missing-host"),
    *(
        pytest.param(cases.host_request(GOOD_HOST, second), 400, id=f"duplicate-host-{name}")
        for name, second in cases.SECOND_HOSTS.items()
    ),
    *(
        pytest.param(cases.host_request(value), 400, id=f"host-{name}")
        for name, value in cases.MALFORMED_HOSTS.items()
    ),
    pytest.param(cases.HTTP_2_0, 505, id="http-2.0"),
    *(
        pytest.param(cases.unknown_version_request(v), 505, id=f"http-{v}")
        for v in cases.UNKNOWN_VERSIONS
    ),
    pytest.param(cases.HTTP_0_9_SIMPLE, 505, id="http-0.9-simple"),
    pytest.param(cases.VERSION_TWO_DIGITS, 400, id="http-1.10"),
    *(pytest.param(d, 501, id=n) for n, d in cases.CONNECTS.items()),
    pytest.param(cases.LOWERCASE_METHOD, 400, id="lowercase-method"),
    pytest.param(head(cases.UNSUPPORTED_EXPECTATION, method="GET"), 417, id="expect-teapot"),
    pytest.param(head(cases.ONE_HUGE_HEADER, method="GET"), 431, id="one-huge-header"),
    pytest.param(head(*cases.MANY_HEADERS, method="GET"), 431, id="many-headers"),
]


@pytest.mark.parametrize(("data", "status"), RAW_CASES)
def test_server_rejects_in_process(data: bytes, status: int) -> None:
    check_rejected(data, status)


def test_server_accepts_the_head_just_under_the_limit() -> None:
    served = serve(head(cases.JUST_UNDER_THE_LIMIT, method="GET", target="/under"))
    assert served.statuses == [200] and served.targets == [b"/under"]


def test_server_answers_the_valid_requests_pipelined_before_a_bad_one() -> None:
    good1 = b"GET /first HTTP/1.1\r\nHost: example.test\r\n\r\n"
    good2 = b"POST /two HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\n\r\nabc"
    bad = b"GET /three HTTP/1.1\r\nHost: example.test\r\nX-A: b\r\n c\r\n\r\n"
    served = serve(good1 + good2 + bad)
    assert served.statuses == [200, 200, 400]
    assert served.targets == [b"/first", b"/two"]
    assert served.closed


def test_server_cuts_off_a_head_that_never_ends() -> None:
    """Bounded in `data_received`, before the head is complete (the verdict never runs)."""
    pieces = [b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Slow: "]
    pieces += [b"s" * 64] * (2 * MAX_HEADER // 64)
    served = serve(*pieces)
    assert served.statuses == [431] and served.closed and served.targets == []


@pytest.mark.parametrize(
    ("lines", "content_length", "chunked"),
    [
        ([], None, False),
        (["Content-Length: 0"], 0, False),
        (["Content-Length: 3"], 3, False),
        (["Transfer-Encoding: chunked"], None, True),
    ],
    ids=["no-body", "length-0", "length-3", "chunked"],
)
def test_server_frames_the_exchange_as_decided(
    lines: list[str], content_length: int | None, chunked: bool
) -> None:
    body = b"3\r\nabc\r\n0\r\n\r\n" if chunked else b"abc"[: content_length or 0]
    served = serve(head(*lines) + body)
    assert served.statuses == [200]
    (ex,) = served.exchanges
    assert (ex.content_length, ex.chunked, ex.has_body) == (
        content_length,
        chunked,
        chunked or bool(content_length),
    )


# -- 3. good heads: framing, Host, target, expectation -----------------------------------------


def test_no_body() -> None:
    result = accepted(verdict(method="GET"))
    assert (result.framing, result.content_length, result.expect_continue) == (
        Framing.NONE,
        None,
        False,
    )
    assert (result.method, result.target, result.host) == ("GET", b"/", GOOD_HOST)


@pytest.mark.parametrize(
    ("value", "length"),
    [("0", 0), ("3", 3), ("3 ", 3), ("0" * 30 + "3", 3), (str(2**64 - 1), 2**64 - 1)],
    ids=["zero", "three", "trailing-space", "leading-zeros", "largest"],
)
def test_content_length(value: str, length: int) -> None:
    """A trailing space is how llhttp delivers `Content-Length: 3 `; 2**64 - 1 is the largest
    length llhttp accepts, and so the largest accepted here."""
    result = accepted(verdict(f"Content-Length: {value}"))
    assert (result.framing, result.content_length) == (Framing.LENGTH, length)


def test_content_length_beyond_what_llhttp_accepts() -> None:
    result = verdict(f"Content-Length: {2**64}")
    assert rejected(result) is rh.MALFORMED_CONTENT_LENGTH


@pytest.mark.parametrize("value", ["chunked", "Chunked", "CHUNKED", "chunked "])
def test_chunked(value: str) -> None:
    result = accepted(verdict(f"Transfer-Encoding: {value}"))
    assert (result.framing, result.content_length) == (Framing.CHUNKED, None)


def test_chunked_from_an_http_1_0_client() -> None:
    result = verdict("Transfer-Encoding: chunked", version="1.0")
    assert rejected(result) is rh.CHUNKED_HTTP_10


@pytest.mark.parametrize(
    ("lines", "expect"),
    [
        (["Content-Length: 5", "Expect: 100-continue"], True),
        (["Transfer-Encoding: chunked", "Expect: 100-continue"], True),
        (["Content-Length: 5", "Expect: 100-Continue "], True),
        (["Content-Length: 0", "Expect: 100-continue"], False),  # no body to wait for
        (["Expect: 100-continue"], False),
        (["Content-Length: 5"], False),
    ],
    ids=["length", "chunked", "case-and-space", "length-0", "no-body", "no-expect"],
)
def test_expect_continue(lines: list[str], expect: bool) -> None:
    assert accepted(verdict(*lines)).expect_continue is expect


def test_http_1_0_expectation_is_ignored() -> None:
    """RFC 9110 10.1.1: an HTTP/1.0 client's Expect is neither answered nor refused."""
    result = accepted(verdict("Content-Length: 5", "Expect: teapot", version="1.0"))
    assert result.expect_continue is False


def test_http_1_0_without_host() -> None:
    result = accepted(verdict(method="GET", version="1.0", host=None))
    assert result.host == ""


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("example.test", "example.test"),
        ("Example.TEST:8080", "example.test"),
        (" example.test ", "example.test"),
        ("[::1]", "[::1]"),
        ("[::1]:8080", "[::1]"),
        ("127.0.0.1:80", "127.0.0.1"),
    ],
)
def test_host_name(value: str, name: str) -> None:
    assert accepted(verdict(method="GET", host=value)).host == name
    assert parse_host(value.encode()) == name


@pytest.mark.parametrize("value", ["", "a b", "a/b", "user@a", "a:", "a:x", "[::1", "[::1]x"])
def test_malformed_host_names(value: str) -> None:
    assert parse_host(value.encode()) is None


def test_empty_host_on_http_1_1() -> None:
    """`Host:` with no value counts as a Host header (so it is not missing) and names no host:
    the request goes on with one empty Host, as test_http_bad_requests allows."""
    result = accepted(verdict(method="GET", host=""))
    assert result.host == "" and result.headers == [(b"host", b"")]


def test_origin_form_keeps_the_headers() -> None:
    headers = fields([f"Host: {GOOD_HOST}", "X-A: b"])
    result = accepted(decide_head(b"GET", b"/p?q=1", "1.1", headers, MAX_HEADER))
    assert result.headers is headers and result.target == b"/p?q=1"


def test_asterisk_form() -> None:
    result = accepted(verdict(method="OPTIONS", target="*"))
    assert result.target == b"*"


@pytest.mark.parametrize(
    ("target", "origin", "authority"),
    [
        ("http://Example.test:81/p?q=1", b"/p?q=1", b"Example.test:81"),
        ("http://example.test", b"/", b"example.test"),
        ("https://example.test/a/b", b"/a/b", b"example.test"),
    ],
)
def test_absolute_form(target: str, origin: bytes, authority: bytes) -> None:
    """RFC 9112 3.2.2: the target's authority replaces any Host header."""
    result = accepted(verdict("X-A: b", method="GET", target=target, host="other.test"))
    assert result.target == origin
    assert result.headers == [(b"x-a", b"b"), (b"host", authority)]
    assert result.host == authority.partition(b":")[0].lower().decode()


def test_absolute_form_without_a_host() -> None:
    assert rejected(verdict(method="GET", target="http:///p")) is rh.MALFORMED_TARGET


# -- the order of the rules: a head with two faults always gets the same answer ----------------


@pytest.mark.parametrize(
    ("kwargs", "lines", "want"),
    [
        ({"version": "2.0"}, ["Transfer-Encoding: gzip"], rh.VERSION_NOT_SUPPORTED),
        ({}, ["Transfer-Encoding: gzip", "Expect: teapot"], rh.UNSUPPORTED_TRANSFER_ENCODING),
        ({}, ["Expect: teapot", "Transfer-Encoding: gzip"], rh.UNSUPPORTED_EXPECTATION),
        ({}, ["Transfer-Encoding: gzip", cases.ONE_HUGE_HEADER], rh.UNSUPPORTED_TRANSFER_ENCODING),
        ({"host": None}, [cases.ONE_HUGE_HEADER], rh.HEADER_TOO_LARGE),
        ({"version": "1.0"}, ["Transfer-Encoding: chunked", "Host: b"], rh.CHUNKED_HTTP_10),
        ({"host": None, "method": "CONNECT"}, [], rh.MISSING_HOST),
        ({"method": "CONNECT", "target": "http:///p"}, [], rh.CONNECT_NOT_SUPPORTED),
        ({"target": "http:///p", "host": "a b"}, [], rh.MALFORMED_TARGET),
        ({"target": "http://a b/"}, [], rh.MALFORMED_TARGET),
    ],
    ids=[
        "version-before-headers",
        "headers-in-order-te",
        "headers-in-order-expect",
        "headers-before-size",
        "size-before-host",
        "framing-before-host",
        "host-before-method",
        "method-before-target",
        "target-before-host-name",
        "target-unparsable",
    ],
)
def test_first_rule_broken_decides(
    kwargs: dict[str, str | None], lines: list[str], want: Rejection
) -> None:
    assert verdict(*lines, **kwargs) is want


# -- what the parser refuses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "status", "reason"),
    [
        ("Invalid HTTP version", 505, "Invalid HTTP version"),
        ("Expected CRLF after version", 400, "Expected CRLF after version"),
        ("Duplicate Content-Length\nmore", 400, "Duplicate Content-Length"),
        ("  ", 400, "malformed request"),
        ("x" * 300, 400, "x" * 200),
    ],
    ids=["version", "malformed-version", "first-line-only", "empty", "cut-at-200"],
)
def test_parser_rejection(message: str, status: int, reason: str) -> None:
    result = parser_rejection(httptools.HttpParserError(message))
    assert (result.status, result.reason) == (status, reason)
