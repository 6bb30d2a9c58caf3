"""Redaction rules: headers removed, JSON body fields and query arguments masked by a keyed hash.

One compiled `Redaction` serves both places secrets must not reach: recording files (the record
writer applies it to each message before it is encoded, record/redact.py) and the example pairs
of the comparison store (`make_example` applies it before an example is built, so cut bodies
never escape it). It lives here, beside the path rules it reuses (`compare.paths`), because the
comparison engine is below the recorder in the layers and both must use the very same rules.

A masked value is `~h:` and the first 12 hex digits of SHA-256(secret + value): equal values
mask equal, so a replayed request or a stored example still shows which values were the same,
while the value itself cannot be read back without the secret (and cannot be guessed by hashing
candidates without it either). Strings are hashed as their UTF-8 bytes, other JSON values as
their canonical JSON (sorted keys); a query argument as its decoded value, so `a%20b` in a query
and `"a b"` in a body mask the same.

Comparisons are made on the answers as captured, before any masking: two equal secrets compare
equal and two different ones differ, and only what is stored is masked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson

from shadowlane.compare.paths import PathMatcher, key_segment

MASK_PREFIX = "~h:"
#: hex digits of the digest kept: 48 bits, enough to tell values apart in a recording
MASK_HEX = 12
#: what an example shows instead of a body the rules could not be applied to (cut, not JSON)
WITHHELD = "(withheld: redaction rules apply and this body could not be parsed to apply them)"

Headers = list[tuple[bytes, bytes]]


def looks_json(body: bytes) -> bool:
    """The first-byte test the comparison uses too (compare/diff.py `_is_json`)."""
    return body[:64].lstrip()[:1] in (b"{", b"[")


class Unredactable(ValueError):
    """A body that looks like JSON (or NDJSON) but does not parse: its fields cannot be found,
    so it must not be written anywhere the rules promise to protect."""


class Redaction:
    """Compiled rules and the secret they mask with."""

    __slots__ = ("_header_bytes", "headers", "json", "query", "secret")

    def __init__(
        self,
        headers: Iterable[str] = (),
        json_paths: Iterable[str] = (),
        query: Iterable[str] = (),
        secret: bytes = b"",
    ) -> None:
        self.headers = frozenset(h.lower() for h in headers)
        self._header_bytes = frozenset(h.encode("latin-1") for h in self.headers)
        self.json = PathMatcher(json_paths, subtree=True)
        self.query = frozenset(query)
        self.secret = secret

    def __bool__(self) -> bool:
        return bool(self.headers or self.json or self.query)

    def merged(self, other: Redaction | None) -> Redaction:
        """Both rule sets; this one's secret (the first of a route's recordings)."""
        if other is None:
            return self
        return Redaction(
            self.headers | other.headers,
            (*self.json.patterns, *other.json.patterns),
            self.query | other.query,
            self.secret or other.secret,
        )

    # ----- masking -----
    def mask(self, value: bytes) -> str:
        digest = hashlib.sha256(self.secret + value).hexdigest()
        return MASK_PREFIX + digest[:MASK_HEX]

    def mask_value(self, value: Any) -> str:
        """A JSON value masked: strings by their UTF-8 bytes, anything else canonically."""
        if isinstance(value, str):
            return self.mask(value.encode("utf-8", "surrogatepass"))
        return self.mask(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))

    # ----- headers -----
    def removes(self, name: bytes) -> bool:
        """Is header `name` (lower-case bytes) removed?"""
        return name in self._header_bytes

    def header_list(self, headers: Headers) -> Headers:
        if not self._header_bytes:
            return headers
        removed = self._header_bytes
        return [h for h in headers if h[0].lower() not in removed]

    # ----- query -----
    def target(self, target: bytes) -> bytes:
        """A request target with the configured query arguments' values masked."""
        if not self.query:
            return target
        path, sep, query = target.partition(b"?")
        if not sep or not query:
            return target
        parts = query.split(b"&")
        changed = False
        for i, part in enumerate(parts):
            name, eq, value = part.partition(b"=")
            if not eq:
                continue
            key = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "surrogateescape")
            if key in self.query:
                plain = unquote_to_bytes(value.replace(b"+", b" "))
                parts[i] = name + b"=" + self.mask(plain).encode()
                changed = True
        return path + b"?" + b"&".join(parts) if changed else target

    # ----- JSON bodies -----
    def mask_doc(self, doc: Any, root: str = "body") -> tuple[Any, bool]:
        """`doc` with every value at a matching path masked, and whether anything was."""
        matches = self.json.matches
        changed = False

        def walk(value: Any, path: str) -> Any:
            nonlocal changed
            if matches(path):
                changed = True
                return self.mask_value(value)
            if type(value) is dict:
                return {k: walk(v, path + key_segment(k)) for k, v in value.items()}
            if type(value) is list:
                return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
            return value

        out = walk(doc, root)
        return out, changed

    def json_body(self, body: bytes) -> bytes:
        """The body with its matching JSON fields masked (NDJSON: line by line), or the body
        itself when there is nothing to mask; raises `Unredactable` for a body that looks like
        JSON but does not parse."""
        if not self.json or not body or not looks_json(body):
            return body
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._ndjson(body)
        masked, changed = self.mask_doc(doc)
        return orjson.dumps(masked) if changed else body

    def _ndjson(self, body: bytes) -> bytes:
        """Newline-delimited JSON (Elasticsearch `_bulk`, log shippers): each line a document."""
        lines = body.split(b"\n")
        out: list[bytes] = []
        changed = False
        for line in lines:
            if not line.strip():
                out.append(line)
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise Unredactable("body looks like JSON but does not parse") from None
            masked, hit = self.mask_doc(doc)
            if hit:
                changed = True
                out.append(orjson.dumps(masked))
            else:
                out.append(line)
        return b"\n".join(out) if changed else body

    def json_text(self, text: str) -> str:
        """`json_body` for the text bodies of stored examples; a body it cannot be applied to
        (cut at a cap, or not JSON though it looks so) becomes `WITHHELD`."""
        if not self.json or not text:
            return text
        raw = text.encode("utf-8", "surrogatepass")
        try:
            out = self.json_body(raw)
        except Unredactable:
            return WITHHELD
        return text if out is raw else out.decode("utf-8", "replace")

    # ----- lifted values (comparison examples) -----
    def field_value(self, path: str, value: Any) -> tuple[bool, Any]:
        """(keep, value) for one differing path's value in an example: a removed header's
        value is dropped, a masked field's masked (None stays None: the side had no value)."""
        if path.startswith("headers."):
            name = path[len("headers.") :].encode("latin-1", "replace")
            return name not in self._header_bytes, value
        if value is not None and self.json.matches(path):
            return True, self.mask_value(value)
        return True, value
