"""Lifting answers to field paths, and diffing two lifted answers in a mode. Pure functions.

Lifting (Diffy's word) turns one captured answer into a flat map path -> leaf value:
- `status` -> the status code (or `failed: <why>` when there is no answer);
- `headers.<name>` -> the header's values joined with ", " (names lower-case), minus ignored ones;
- a JSON body -> one path per leaf (`body.hits.total.value`, `body.items[3].id`); empty objects
  and arrays are leaves too; an `unordered` array is one leaf, the multiset of its elements;
- any other body -> one leaf `body`, the bytes as captured (gzip/deflate undone first).
Ignored paths are pruned while lifting, so an ignored subtree costs nothing further.

In schema mode array indexes collapse to `[*]` and each leaf becomes the set of JSON types seen
there, so two answers with the same shape compare equal whatever their values.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from shadowlane.compare.model import Captured
from shadowlane.compare.paths import child
from shadowlane.compare.settings import CompareSettings

#: example bodies are cut to this (the comparison itself uses everything captured)
EXAMPLE_BODY_CAP = 64 * 1024
#: at most this many differing paths get their two values stored with an example
EXAMPLE_VALUES = 50


@dataclass(frozen=True, slots=True)
class Multiset:
    """An unordered array: the sorted canonical forms of its elements (ignored paths removed)."""

    items: tuple[str, ...]

    def as_json(self) -> list[Any]:
        return [orjson.loads(i) for i in self.items]


@dataclass(slots=True)
class Lifted:
    """One answer as field paths."""

    fields: dict[str, Any]
    #: "json", "text" (any other body, empty included) or "failed" (no answer)
    kind: str
    #: the body as compared (decompressed), for whole-body comparison and examples
    body: bytes = b""
    #: the body was cut at the capture cap (or at the decompression cap)
    truncated: bool = False
    #: schema mode: array paths that were empty (their element paths are unknown, not missing)
    empty_arrays: set[str] = field(default_factory=set)


# ---------------------------------------------------------------------------------------------
# Lifting


def _header_fields(headers: list[tuple[bytes, bytes]], s: CompareSettings) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if name in s.ignore_headers:
            continue
        path = "headers." + name
        value = raw_value.decode("latin-1")
        out[path] = out[path] + ", " + value if path in out else value
    if s.ignore:
        for path in [p for p in out if s.ignore.matches(p)]:
            del out[path]
    return out


def _decode_body(c: Captured, cap: int) -> tuple[bytes, bool]:
    """Undo gzip/deflate so two servers that compress differently compare by content.

    Output is capped (a small compressed body can expand enormously); a body that does not
    decompress is compared as captured.
    """
    encoding = b""
    for name, value in c.headers:
        if name.lower() == b"content-encoding":
            encoding = value.strip().lower()
    if not c.body or encoding not in (b"gzip", b"x-gzip", b"deflate"):
        return c.body, c.truncated
    attempts = (16 + zlib.MAX_WBITS,) if encoding != b"deflate" else (zlib.MAX_WBITS, -15)
    for wbits in attempts:
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(c.body, cap)
        except zlib.error:
            continue
        return out, c.truncated or bool(d.unconsumed_tail)
    return c.body, c.truncated


def _is_json(c: Captured, body: bytes) -> bool:
    for name, value in c.headers:
        if name.lower() == b"content-type":
            ctype = value.split(b";", 1)[0].strip().lower()
            if ctype == b"application/json" or ctype.endswith(b"+json"):
                return True
    # no JSON content type: try only what looks like a JSON document (cheap first-byte test)
    return body[:64].lstrip()[:1] in (b"{", b"[")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    return "array"


def _canon(value: Any) -> Any:
    return ["<unordered>", *value.items] if isinstance(value, Multiset) else value


class _Flattener:
    __slots__ = ("empty_arrays", "out", "s", "schema")

    def __init__(self, s: CompareSettings, schema: bool) -> None:
        self.s = s
        self.schema = schema
        self.out: dict[str, Any] = {}
        self.empty_arrays: set[str] = set()

    def leaf(self, path: str, value: Any) -> None:
        if self.schema:
            types = self.out.get(path)
            kind = _json_type(value)
            if types is None:
                self.out[path] = frozenset((kind,))
            elif kind not in types:
                self.out[path] = types | {kind}
        else:
            self.out[path] = value

    def walk(self, value: Any, path: str) -> None:
        s = self.s
        if s.ignore and s.ignore.matches(path):
            return
        if isinstance(value, dict):
            if not value:
                self.leaf(path, value)
            for key, item in value.items():
                self.walk(item, child(path, key))
        elif isinstance(value, list):
            if self.schema:
                self.leaf(path, value)
                if not value:
                    self.empty_arrays.add(path)
                for item in value:
                    self.walk(item, path + "[*]")
            elif s.unordered and s.unordered.matches(path):
                self.out[path] = self.multiset(value, path)
            elif not value:
                self.leaf(path, value)
            else:
                for i, item in enumerate(value):
                    self.walk(item, f"{path}[{i}]")
        else:
            self.leaf(path, value)

    def multiset(self, items: list[Any], path: str) -> Multiset:
        """Each element lifted (so ignore rules apply inside it), then canonically serialised."""
        keys = []
        for i, item in enumerate(items):
            sub = _Flattener(self.s, False)
            prefix = f"{path}[{i}]"
            sub.walk(item, prefix)
            rel = sorted((p[len(prefix) :], _canon(v)) for p, v in sub.out.items())
            keys.append(orjson.dumps(rel).decode())
        return Multiset(tuple(sorted(keys)))


def lift(c: Captured, s: CompareSettings) -> Lifted:
    """One captured answer as field paths, under the settings' mode and rules."""
    if c.failure:
        return Lifted({"status": f"failed: {c.failure}"}, "failed")
    schema = s.mode == "schema"
    fields: dict[str, Any] = {"status": c.status}
    headers = _header_fields(c.headers, s)
    if schema:
        fields.update((p, frozenset(("string",))) for p in headers)
    else:
        fields.update(headers)
    body, truncated = _decode_body(c, max(s.max_body, len(c.body)))
    if not truncated and body and _is_json(c, body):
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            flat = _Flattener(s, schema)
            flat.walk(doc, "body")
            fields.update(flat.out)
            return Lifted(fields, "json", body, truncated, flat.empty_arrays)
    if not (s.ignore and s.ignore.matches("body")):
        fields["body"] = frozenset(("text",)) if schema else body
    return Lifted(fields, "text", body, truncated)


# ---------------------------------------------------------------------------------------------
# Diffing


def same(a: Any, b: Any) -> bool:
    """Equality of leaves: numbers by value (1 == 1.0), but true is not 1 and {} is not []."""
    ta, tb = type(a), type(b)
    if ta is tb:
        return bool(a == b)
    if ta in (int, float) and tb in (int, float):
        return bool(a == b)
    return False


def _as_text(lifted: Lifted, s: CompareSettings) -> dict[str, Any]:
    """The fields with the body as one whole leaf (used when one side is JSON, one is not)."""
    out = {p: v for p, v in lifted.fields.items() if not p.startswith("body")}
    if not (s.ignore and s.ignore.matches("body")):
        out["body"] = frozenset(("text",)) if s.mode == "schema" else lifted.body
    return out


def _under_empty_array(path: str, empty: set[str]) -> bool:
    start = 0
    while (i := path.find("[*]", start)) >= 0:
        if path[:i] in empty:
            return True
        start = i + 3
    return False


def diff(a: Lifted, b: Lifted, s: CompareSettings) -> list[str]:
    """Paths where `b` (candidate or secondary) differs from `a` (primary), sorted.

    strict: every path of either side must be on both, with equal values. subset: every path of
    `a` must be in `b` with an equal value; `b` may have more. schema: same paths and JSON types
    (status still compared by value; headers by presence).
    A missing answer on either side is a difference on `status` only (equal when both failed
    the same way).
    """
    if a.kind == "failed" or b.kind == "failed":
        return [] if a.fields.get("status") == b.fields.get("status") else ["status"]
    fa, fb = a.fields, b.fields
    if a.kind != b.kind:
        fa, fb = _as_text(a, s), _as_text(b, s)
    out: list[str] = []
    if s.mode == "subset":
        for path, value in fa.items():
            if path not in fb or not same(value, fb[path]):
                out.append(path)
        return sorted(out)
    schema = s.mode == "schema"
    for path, value in fa.items():
        other = fb.get(path, _MISSING)
        if other is _MISSING:
            if not (schema and _under_empty_array(path, b.empty_arrays)):
                out.append(path)
        elif not same(value, other):
            out.append(path)
    for path in fb:
        if path not in fa and not (schema and _under_empty_array(path, a.empty_arrays)):
            out.append(path)
    return sorted(out)


_MISSING = object()


# ---------------------------------------------------------------------------------------------
# Example rendering


def _json_value(value: Any) -> Any:
    if value is _MISSING:
        return None
    if isinstance(value, Multiset):
        return value.as_json()
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, bytes):
        text = value[:200].decode("utf-8", "replace")
        return text + ("..." if len(value) > 200 else "")
    return value


def values_of(a: Lifted, b: Lifted, paths: list[str]) -> dict[str, list[Any]]:
    """`{path: [primary value, candidate value]}` for the first differing paths (null = absent)."""
    out: dict[str, list[Any]] = {}
    for path in paths[:EXAMPLE_VALUES]:
        va = a.fields.get(path, _MISSING)
        vb = b.fields.get(path, _MISSING)
        if path == "body" and a.kind != b.kind:
            va, vb = a.body, b.body
        out[path] = [_json_value(va), _json_value(vb)]
    return out


def answer_doc(c: Captured, lifted: Lifted) -> dict[str, Any]:
    """One answer as stored with an example: status, all headers, the body as text."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in c.headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = headers[name] + ", " + value if name in headers else value
    body = lifted.body if lifted.kind != "failed" else c.body
    cut = len(body) > EXAMPLE_BODY_CAP
    return {
        "status": c.status,
        "failure": c.failure,
        "headers": headers,
        "body": body[:EXAMPLE_BODY_CAP].decode("utf-8", "replace"),
        # the body was cut: at capture (compared only as far as captured) or for the example
        "truncated": lifted.truncated or cut,
        "compared_truncated": lifted.truncated,
        "seconds": c.seconds,
    }
