"""Redaction of recorded messages, and the secret the masks are keyed with.

The rules themselves (`compare.redact.Redaction`) are shared with the comparison store's
examples; this module applies them to whole HTTP messages on the writer's thread, before a
message is encoded: removed headers, masked query arguments in the target, masked JSON fields
in the body (gzip and deflate bodies are decoded, masked and encoded again), and a
Content-Length that matches what is written.

It fails closed. A body the JSON rules cannot be applied to (it looks like JSON but does not
parse, or it is encoded in a way we cannot decode) raises `Unredactable`; the writer then does
not write that message (counted `error`, logged), rather than write what the rules promise to
keep off the disk.

The secret: `redact.secret_env` names an environment variable (to share one secret across
instances and directories, so equal values mask equal in every recording of a fleet); without
it each recording directory keeps a random one in `.shadowlane-redact.key` (mode 0600), made on
first use, kept across restarts, and readable by `shadowlane replay` to mask live answers the
same way when it compares them with masked recorded ones.
"""

from __future__ import annotations

import gzip
import os
import secrets
import zlib

from shadowlane.compare.model import Captured
from shadowlane.compare.redact import Redaction, Unredactable
from shadowlane.config import RecordConfig
from shadowlane.wire.headers import reason_phrase
from shadowlane.wire.messages import Headers

__all__ = [
    "KEY_FILE",
    "Unredactable",
    "answer_message",
    "build_redaction",
    "load_secret",
    "redact_head",
]

KEY_FILE = ".shadowlane-redact.key"
#: a compressed body is decoded for masking up to this size; past it, it cannot be redacted
MAX_DECODED = 64 * 1024**2
_FRAMING = (b"content-length", b"transfer-encoding")
#: answers that never carry a body whatever their headers say (RFC 9110 6.4.1)
_BODYLESS_STATUS = (204, 304)


def load_secret(cfg: RecordConfig) -> bytes:
    """The masking secret of a recording: from `redact.secret_env`, or the directory's key
    file, made (atomically, 0600) when missing. Raises ValueError or OSError."""
    env = cfg.redact.secret_env
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise ValueError(f"record.redact.secret_env: ${env} is not set")
        return value.encode()
    os.makedirs(cfg.dir, exist_ok=True)
    path = os.path.join(cfg.dir, KEY_FILE)
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
        if key:
            return key
    except FileNotFoundError:
        pass
    # written aside and linked into place: two workers starting at once agree on one key
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode() + b"\n")
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path, "rb") as f:
        return f.read().strip()


def build_redaction(cfg: RecordConfig, inherited: Redaction | None = None) -> Redaction | None:
    """The compiled rules of one recording (a shadow's adds its route's: `inherited`), with
    the recording's secret; None when there are none."""
    red = cfg.redact
    if not red and inherited is None:
        return None
    secret = load_secret(cfg) if (red.json_ or red.query or inherited) else b""
    own = Redaction(red.headers, red.json_, red.query, secret)
    return own.merged(inherited) if inherited is not None else own


def _encoding(headers: Headers) -> bytes:
    for name, value in headers:
        if name.lower() == b"content-encoding":
            return value.strip().lower()
    return b""


def redact_body(red: Redaction, body: bytes, headers: Headers) -> bytes:
    """`body` with its JSON fields masked, through a gzip or deflate Content-Encoding."""
    if not red.json or not body:
        return body
    enc = _encoding(headers)
    if not enc or enc == b"identity":
        return red.json_body(body)
    if enc in (b"gzip", b"x-gzip", b"deflate"):
        wbits = 16 + zlib.MAX_WBITS if enc != b"deflate" else zlib.MAX_WBITS
        d = zlib.decompressobj(wbits)
        try:
            plain = d.decompress(body, MAX_DECODED)
        except zlib.error:
            raise Unredactable(f"a {enc.decode()} body that does not decode") from None
        if d.unconsumed_tail:
            raise Unredactable("a compressed body too big to decode for redaction")
        masked = red.json_body(plain)
        if masked is plain:
            return body
        return gzip.compress(masked, 6) if enc != b"deflate" else zlib.compress(masked)
    raise Unredactable(f"a body with content-encoding {enc.decode('latin-1')!r}")


def _head(
    start: bytes, headers: Headers, body_len: int, framed: bool, keep_framing: bool = False
) -> bytes:
    parts = [start]
    for name, value in headers:
        if name in _FRAMING and not keep_framing:
            continue
        parts += (name, b": ", value, b"\r\n")
    if framed:
        parts.append(b"content-length: %d\r\n" % body_len)
    parts.append(b"\r\n")
    return b"".join(parts)


def _parse_head(head: bytes) -> tuple[bytes, Headers]:
    lines = head.split(b"\r\n")
    headers: Headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return lines[0], headers


def redact_head(head: bytes, body: bytes, red: Redaction | None) -> bytes:
    """A request as recorded: the head it was sent upstream with (to the primary, or to a
    shadow for a copy) and its body, redacted; framed by Content-Length (a chunked request
    is recorded with its whole body and no Transfer-Encoding)."""
    if red is None:
        return head + body
    start, headers = _parse_head(head)
    method, _, rest = start.partition(b" ")
    target, _, version = rest.rpartition(b" ")
    headers = red.header_list(headers)
    body = redact_body(red, body, headers)
    line = b"%s %s %s\r\n" % (method, red.target(target), version)
    return _head(line, headers, len(body), True) + body


def answer_message(answer: Captured, red: Redaction | None, head_request: bool) -> bytes:
    """An answer as recorded: status line (the standard reason phrase), headers as received,
    the body up to `max_body`, framed by Content-Length (a body cut at `max_body` is marked
    `x-shadowlane-truncated: 1`); an answer that has no body (HEAD, 204, 304, 1xx) keeps its
    headers as they were."""
    status = answer.status
    headers = answer.headers
    body = answer.body
    if red is not None:
        headers = red.header_list(headers)
        if answer.truncated:
            if red.json:
                raise Unredactable("an answer cut at max_body cannot be parsed for redaction")
        else:
            body = redact_body(red, body, headers)
    start = b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))
    if head_request or status < 200 or status in _BODYLESS_STATUS:
        return _head(start, headers, 0, False, keep_framing=True)
    if answer.truncated:
        headers = [*headers, (b"x-shadowlane-truncated", b"1")]
    return _head(start, headers, len(body), True) + body
