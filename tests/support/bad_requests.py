"""The bad-request tables: requests the proxy must refuse before anything reaches a backend.

One copy for two test modules. ``tests/test_http_bad_requests.py`` sends each case to a real
proxy process and proves, end to end, the answer, the close and a backend that saw nothing.
``tests/test_request_head.py`` runs the same cases in-process against the pure request-head
verdict (``shadowlane.wire.request_head``) and the server's parser callbacks, where a failure
points at the rule instead of at a subprocess.

Each table maps a pytest id to a case; the tests build the request bytes with :func:`head`.
Like the rest of ``support``, nothing here imports ``shadowlane``.
"""

from __future__ import annotations

MAX_HEADER = 2048  #: limits.max_header_size of the proxy the tables are written for

GOOD_HOST = "example.test"


def head(*lines: str, method: str = "POST", target: str = "/") -> bytes:
    """An HTTP/1.1 request head with ``Host: example.test`` and then ``lines``."""
    start = f"{method} {target} HTTP/1.1\r\nHost: {GOOD_HOST}\r\n"
    return (start + "".join(line + "\r\n" for line in lines) + "\r\n").encode("latin-1")


# -- framing: Content-Length and Transfer-Encoding ---------------------------------------------

#: Content-Length and Transfer-Encoding together, either order (CL.TE / TE.CL smuggling), with
#: the body each would frame
LENGTH_AND_CHUNKED: dict[str, tuple[list[str], bytes]] = {
    "cl-then-te": (["Content-Length: 5", "Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "te-then-cl": (["Transfer-Encoding: chunked", "Content-Length: 3"], b"3\r\nabc\r\n0\r\n\r\n"),
}

#: two Content-Length headers (sent with the body ``abcd``)
TWO_CONTENT_LENGTHS: dict[str, tuple[str, str]] = {
    "same-values": ("3", "3"),
    "different-values": ("3", "4"),
}

#: Content-Length values that are not one plain decimal number (sent with the body ``abc``)
MALFORMED_CONTENT_LENGTHS: dict[str, str] = {
    "plus": "+3",
    "list": "3, 3",
    "hex": "0x3",
    "negative": "-1",
    "letters": "abc",
    "empty": "",
    "two-numbers": "3 3",
    "overflow": "99999999999999999999999",
}

#: Transfer-Encoding header lines whose coding is not exactly ``chunked`` (400 rather than 501:
#: the proxy cannot frame the body, so nothing after the head is safe)
TRANSFER_ENCODING_NOT_CHUNKED: dict[str, list[str]] = {
    "gzip": ["Transfer-Encoding: gzip"],
    "gzip-chunked": ["Transfer-Encoding: gzip, chunked"],
    "chunked-chunked": ["Transfer-Encoding: chunked, chunked"],
    "two-headers": ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
    "two-headers-gzip": ["Transfer-Encoding: gzip", "Transfer-Encoding: chunked"],
    "identity": ["Transfer-Encoding: identity"],
}
#: the body sent after each of those heads
CHUNKED_BODY = b"3\r\nabc\r\n0\r\n\r\n"

#: malformed chunked bodies after a good ``Transfer-Encoding: chunked`` head
BAD_CHUNKS: dict[str, bytes] = {
    "non-hex": b"zz\r\nabc\r\n0\r\n\r\n",
    "overflow": b"1ffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    "negative": b"-3\r\nabc\r\n0\r\n\r\n",
    "no-crlf-after-data": b"3\r\nabcXX0\r\n\r\n",
    "junk-after-size": b"3 x\r\nabc\r\n0\r\n\r\n",
    "bare-cr-ext": b"3;ext\rx\r\nabc\r\n0\r\n\r\n",
}
#: a good first chunk, then a junk size: sent in one write, nothing may leave the proxy
BAD_SECOND_CHUNK = b"3\r\nabc\r\nzz\r\ndef\r\n0\r\n\r\n"


# -- head syntax -------------------------------------------------------------------------------

#: obsolete line folding: the character that starts the continuation line
LINE_FOLDS: dict[str, str] = {"space": " ", "tab": "\t"}

BARE_CR_OR_LF_IN_REQUEST_LINE: dict[str, bytes] = {
    "bare-cr-in-target": b"GET /a\rb HTTP/1.1\r\nHost: example.test\r\n\r\n",
    "bare-cr-ends-line": b"GET / HTTP/1.1\rHost: example.test\r\n\r\n",
    "bare-lf-ends-line": b"GET / HTTP/1.1\nHost: example.test\r\n\r\n",
    "bare-lf-in-target": b"GET /a\nb HTTP/1.1\r\nHost: example.test\r\n\r\n",
}

BARE_CR_OR_LF_IN_HEADERS: dict[str, bytes] = {
    "bare-cr-in-value": b"GET / HTTP/1.1\r\nHost: example.test\r\nX-A: b\rc\r\n\r\n",
    "bare-cr-before-crlf": b"GET / HTTP/1.1\r\nHost: example.test\r\nX-A: b\r\r\n\r\n",
    "bare-lf-ends-header": b"GET / HTTP/1.1\r\nHost: example.test\r\nX-A: b\nX-B: c\r\n\r\n",
    "bare-lf-ends-head": b"GET / HTTP/1.1\r\nHost: example.test\r\nX-A: b\r\n\n",
}

#: RFC 9112 5.1: must be rejected, or a lenient backend may read "Host " as Host
WHITESPACE_BEFORE_COLON: dict[str, bytes] = {
    "host": b"GET / HTTP/1.1\r\nHost : example.test\r\n\r\n",
    "other-header": b"GET / HTTP/1.1\r\nHost: example.test\r\nX-A : b\r\n\r\n",
    "tab": b"GET / HTTP/1.1\r\nHost: example.test\r\nX-A\t: b\r\n\r\n",
}

NUL_IN_HEADER_VALUE = "X-A: b\x00c"  #: a header line (GET)
SPACE_IN_TARGET = "/a b"  #: a request target (GET)


# -- Host --------------------------------------------------------------------------------------

MISSING_HOST = b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n"

#: the second Host header's value, after ``Host: example.test``
SECOND_HOSTS: dict[str, str] = {"different": "other.test", "same": "example.test"}

MALFORMED_HOSTS: dict[str, str] = {
    "space": "a b",
    "slash": "a/b",
    "bad-port": "a:port",
    "userinfo": "user@a",
}


def host_request(*values: str) -> bytes:
    """``GET /`` on HTTP/1.1 with one ``Host`` header per value."""
    hosts = "".join(f"Host: {value}\r\n" for value in values)
    return f"GET / HTTP/1.1\r\n{hosts}\r\n".encode()


# -- version, method, expectation --------------------------------------------------------------

HTTP_2_0 = b"GET / HTTP/2.0\r\nHost: example.test\r\n\r\n"
#: docs/http.md: versions other than 1.0 and 1.1 get 505
UNKNOWN_VERSIONS = ["1.2", "3.0", "0.9"]
HTTP_0_9_SIMPLE = b"GET /\r\n\r\n"
#: HTTP-version = "HTTP/" DIGIT "." DIGIT: `HTTP/1.10` is a malformed request line (400)
VERSION_TWO_DIGITS = b"GET / HTTP/1.10\r\nHost: example.test\r\n\r\n"

CONNECTS: dict[str, bytes] = {
    "connect": b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
    "connect-with-tunnel-bytes": (
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n\x16\x03\x01\x00\x05"
    ),
}

#: methods are case-sensitive (RFC 9110 9.1): `get` is not GET
LOWERCASE_METHOD = b"get / HTTP/1.1\r\nHost: example.test\r\n\r\n"

UNSUPPORTED_EXPECTATION = "Expect: teapot"  #: a header line (GET): 417


def unknown_version_request(version: str) -> bytes:
    return f"GET / HTTP/{version}\r\nHost: example.test\r\n\r\n".encode()


# -- header size (limits.max_header_size = MAX_HEADER) -----------------------------------------

ONE_HUGE_HEADER = "X-Big: " + "a" * (2 * MAX_HEADER)  #: a header line (GET): 431
#: header lines (GET) that add up to more than MAX_HEADER: 431
MANY_HEADERS = [f"X-H-{i:04d}: {'v' * 20}" for i in range(2 * MAX_HEADER // 30)]
#: a header line (GET) that keeps the head under MAX_HEADER: passes
JUST_UNDER_THE_LIMIT = "X-Big: " + "a" * (MAX_HEADER // 2)
