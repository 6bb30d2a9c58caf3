"""Lifting answers to field paths, and diffing two lifted answers in a mode. Pure functions.

Lifting (Diffy's word) turns one captured answer into a flat map path -> leaf value:
- `status` -> the status code (or `failed: <why>` when there is no answer);
- `headers.<name>` -> the header's values joined with ", " (names lower-case), minus ignored ones;
  `trailers.<name>` the same for an HTTP/2 answer's trailers;
- `status.grpc`, `status.grpc_message` -> a gRPC answer's `grpc-status` (by name: `NOT_FOUND`)
  and `grpc-message`, from the trailers or, in a trailers-only answer, the headers (they are not
  repeated under `trailers.` / `headers.`);
- a JSON body -> one path per leaf (`body.hits.total.value`, `body.items[3].id`); empty objects
  and arrays are leaves too; an `unordered` array is one leaf, the multiset of its elements;
- a gRPC body -> the list of its messages, each a tree of fields by number or, with a descriptor
  set, by proto name (compare.grpc, compare.protobuf), then lifted as a JSON document would be:
  `body[0].user.display_name`;
- any other body -> one leaf `body`, the bytes as captured (gzip/deflate undone first).
Ignored paths are pruned while lifting, so an ignored subtree costs nothing further.

In schema mode array indexes collapse to `[*]` and each leaf becomes the set of JSON types seen
there, so two answers with the same shape compare equal whatever their values.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from shadowlane.compare.grpc import STATUS_HEADERS, GrpcAnswer, is_grpc, status_fields
from shadowlane.compare.model import Captured
from shadowlane.compare.paths import key_segment
from shadowlane.compare.redact import WITHHELD, Redaction, Unredactable, looks_json
from shadowlane.compare.settings import CompareSettings

#: example bodies are cut to this (the comparison itself uses everything captured)
EXAMPLE_BODY_CAP = 64 * 1024
#: at most this many differing paths get their two values stored with an example
EXAMPLE_VALUES = 50

_UNPARSED = object()
#: `Lifted.doc()` of a body that is not JSON
NOT_JSON: Any = object()


@dataclass(frozen=True, slots=True)
class Multiset:
    """An unordered array: the sorted canonical forms of its elements (ignored paths removed)."""

    items: tuple[str, ...]

    def as_json(self) -> list[Any]:
        return [orjson.loads(i) for i in self.items]


class Lifted:
    """One answer as field paths: the head at once, the body only when it is needed.

    Most compared answers have byte-identical bodies (the whole point of a shadow is that the
    new version answers the same); those never need parsing or flattening, so the body's paths
    are computed on first use and `diff` asks for them only when the bodies' bytes differ.
    """

    __slots__ = (
        "_body_fields",
        "_doc",
        "_grpc",
        "_kind",
        "body",
        "empty_arrays",
        "head",
        "settings",
        "truncated",
    )

    def __init__(
        self,
        head: dict[str, Any],
        body: bytes,
        truncated: bool,
        settings: CompareSettings,
        *,
        kind: str = "",
        body_fields: dict[str, Any] | None = None,
        grpc: GrpcAnswer | None = None,
    ) -> None:
        #: `status` and `headers.*`
        self.head = head
        #: the body as compared (decompressed), for whole-body comparison and examples
        self.body = body
        #: the body was cut at the capture cap (or at the decompression cap)
        self.truncated = truncated
        self.settings = settings
        self._kind = kind
        self._body_fields = body_fields
        self._doc: Any = _UNPARSED
        #: how to decode a gRPC body (its message type, its grpc-encoding); None: not gRPC
        self._grpc = grpc
        #: schema mode: array paths that were empty (their element paths are unknown)
        self.empty_arrays: set[str] = set()

    @property
    def kind(self) -> str:
        """`json`, `grpc` (messages decoded), `text` (any other body, empty included) or
        `failed` (no answer)."""
        if not self._kind:
            self.doc()
        return self._kind

    def doc(self) -> Any:
        """The parsed JSON body (kind "json") or the list of decoded gRPC messages (kind
        "grpc"), else `NOT_JSON`; parsed once. A cut body is neither: it is compared as bytes."""
        if self._doc is _UNPARSED:
            self._doc = NOT_JSON
            body = self.body
            failed = self._kind == "failed"
            grpc = self._grpc
            if failed or self.truncated:
                pass
            elif grpc is not None:
                messages = grpc.decode(body)
                if messages is not None:
                    self._doc = messages
                    self._kind = "grpc"
                    return messages
            elif body and _is_json(self.head, body):
                with contextlib.suppress(orjson.JSONDecodeError):
                    self._doc = orjson.loads(body)
            if not failed:
                self._kind = "text" if self._doc is NOT_JSON else "json"
        return self._doc

    def body_fields(self) -> dict[str, Any]:
        """The body's paths (`body.*`, or `body` for a non-JSON body), computed once."""
        if self._body_fields is None:
            self._body_fields = _lift_body(self)
        return self._body_fields

    @property
    def fields(self) -> dict[str, Any]:
        """Every path of the answer: head and body."""
        return {**self.head, **self.body_fields()}

    def fields_at(self, paths: list[str]) -> dict[str, Any]:
        """The paths of `fields` that `paths` name (and maybe a few more), lifting only the
        parts of the body on the way to them: an example pair shows the values of its first
        differing fields, and flattening both whole documents for those was three quarters
        of what deciding a differing JSON pair cost (the diff itself walks only what
        differs). Whole lifting when it is done already, or not a JSON tree."""
        if self._body_fields is not None or self.settings.mode == "schema":
            return self.fields
        doc = self.doc()
        if doc is NOT_JSON or self._kind != "json":
            return self.fields
        wanted = [p for p in paths if p.startswith("body")]
        if not wanted:
            return self.head
        return {**self.head, **_flatten(doc, "body", self.settings, _on_the_way(wanted))}


# ---------------------------------------------------------------------------------------------
# Lifting


def _header_fields(
    headers: list[tuple[bytes, bytes]], s: CompareSettings, prefix: str = "headers."
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ignored = s.ignore_headers
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if name in ignored:
            continue
        path = prefix + name
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


#: the public name, for the shadow pipeline's write checks (shadow/writes.py)
decoded_body = _decode_body


def _is_json(head: dict[str, Any], body: bytes) -> bool:
    ctype = head.get("headers.content-type")
    if isinstance(ctype, str):
        ctype = ctype.split(";", 1)[0].strip().lower()
        if ctype == "application/json" or ctype.endswith("+json"):
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


#: rendered key segments (`.key` / `["a.b"]`): the same keys come back in every answer
_SEGMENTS: dict[str, str] = {}
_SEGMENTS_MAX = 65536


def _segment(key: str) -> str:
    seg = _SEGMENTS.get(key)
    if seg is None:
        if len(_SEGMENTS) >= _SEGMENTS_MAX:
            _SEGMENTS.clear()
        seg = _SEGMENTS[key] = key_segment(key)
    return seg


def _flatten(
    doc: Any, root: str, s: CompareSettings, way: set[str] | None = None
) -> dict[str, Any]:
    """A JSON document as path -> leaf, ignored subtrees pruned, unordered arrays as multisets.
    With `way` (`_on_the_way`), only the subtrees on the way to those paths are walked.

    Written for speed (it is the comparator's hot loop): local names, scalars handled inline
    without a call, ignore checks through the matcher's per-path cache.
    """
    out: dict[str, Any] = {}
    ignore = s.ignore.matches if s.ignore else None
    unordered = s.unordered.matches if s.unordered else None
    segment = _segment

    def walk(value: Any, path: str) -> None:
        if type(value) is dict:
            if not value:
                out[path] = value
                return
            for key, item in value.items():
                sub = path + segment(key)
                if (way is not None and sub not in way) or (ignore is not None and ignore(sub)):
                    continue
                if type(item) is dict or type(item) is list:
                    walk(item, sub)
                else:
                    out[sub] = item
        elif type(value) is list:
            if unordered is not None and unordered(path):
                out[path] = _multiset(value, path, s)
            elif not value:
                out[path] = value
            else:
                for i, item in enumerate(value):
                    sub = f"{path}[{i}]"
                    if (way is not None and sub not in way) or (ignore is not None and ignore(sub)):
                        continue
                    if type(item) is dict or type(item) is list:
                        walk(item, sub)
                    else:
                        out[sub] = item
        else:
            out[path] = value

    if (way is None or root in way) and (ignore is None or not ignore(root)):
        walk(doc, root)
    return out


def _on_the_way(wanted: list[str]) -> set[str]:
    """Each of `wanted` and every path above one (cut where a segment begins: `.` or `[`).
    A cut inside a quoted key (`["a.b"]`) adds a string no walked path equals: harmless."""
    out: set[str] = set()
    for w in wanted:
        out.add(w)
        for i in range(1, len(w)):
            c = w[i]
            if c == "." or c == "[":
                out.add(w[:i])
    return out


def _multiset(items: list[Any], path: str, s: CompareSettings) -> Multiset:
    """Each element lifted (so ignore rules apply inside it), then canonically serialised."""
    keys = []
    for i, item in enumerate(items):
        prefix = f"{path}[{i}]"
        flat = _flatten(item, prefix, s)
        rel = sorted((p[len(prefix) :], _canon(v)) for p, v in flat.items())
        keys.append(orjson.dumps(rel).decode())
    return Multiset(tuple(sorted(keys)))


def _flatten_schema(doc: Any, root: str, s: CompareSettings, empty: set[str]) -> dict[str, Any]:
    """Schema mode: indexes collapse to `[*]`, each path maps to the set of JSON types seen."""
    out: dict[str, Any] = {}
    ignore = s.ignore.matches if s.ignore else None

    def leaf(path: str, value: Any) -> None:
        kind = _json_type(value)
        types = out.get(path)
        if types is None:
            out[path] = frozenset((kind,))
        elif kind not in types:
            out[path] = types | {kind}

    def walk(value: Any, path: str) -> None:
        if ignore is not None and ignore(path):
            return
        if isinstance(value, dict):
            if not value:
                leaf(path, value)
            for key, item in value.items():
                walk(item, path + _segment(key))
        elif isinstance(value, list):
            leaf(path, value)
            if not value:
                empty.add(path)
            for item in value:
                walk(item, path + "[*]")
        else:
            leaf(path, value)

    walk(doc, root)
    return out


def _lift_body(lifted: Lifted) -> dict[str, Any]:
    s = lifted.settings
    doc = lifted.doc()
    if doc is NOT_JSON:
        return _whole_body(lifted)
    if s.mode == "schema":
        return _flatten_schema(doc, "body", s, lifted.empty_arrays)
    return _flatten(doc, "body", s)


def _whole_body(lifted: Lifted) -> dict[str, Any]:
    """The body as one leaf `body` (non-JSON, or when one side is JSON and the other is not)."""
    s = lifted.settings
    if s.ignore and s.ignore.matches("body"):
        return {}
    return {"body": frozenset(("text",)) if s.mode == "schema" else lifted.body}


def lift(c: Captured, s: CompareSettings, path: str = "") -> Lifted:
    """One captured answer as field paths, under the settings' mode and rules. `path`: the
    request's path, which names a gRPC call's method and so its response type."""
    if c.failure:
        return Lifted(
            {"status": f"failed: {c.failure}"}, b"", False, s, kind="failed", body_fields={}
        )
    head: dict[str, Any] = {"status": c.status}
    grpc: GrpcAnswer | None = None
    grpc_status: dict[str, Any] = {}
    headers_in, trailers_in = c.headers, c.trailers
    ctype = _header(headers_in, b"content-type")
    if (ctype is not None and is_grpc(ctype)) or trailers_in:
        grpc_status = status_fields(headers_in, trailers_in)
        if grpc_status:
            headers_in = [h for h in headers_in if h[0].lower() not in STATUS_HEADERS]
            trailers_in = [h for h in trailers_in if h[0].lower() not in STATUS_HEADERS]
            # ignored by the path rules (`status.grpc`, `status`) or by header name
            if "grpc-status" in s.ignore_headers:
                grpc_status.pop("status.grpc", None)
            if "grpc-message" in s.ignore_headers:
                grpc_status.pop("status.grpc_message", None)
            if s.ignore:
                for ignored in [p for p in grpc_status if s.ignore.matches(p)]:
                    del grpc_status[ignored]
    if ctype is not None and is_grpc(ctype):
        schema = s.grpc
        grpc = GrpcAnswer(
            schema.message_class(path) if schema is not None and path else None,
            (_header(headers_in, b"grpc-encoding") or b"identity").strip().lower(),
            max(s.max_body, len(c.body)),
        )
    fields = _header_fields(headers_in, s)
    if trailers_in:
        fields.update(_header_fields(trailers_in, s, "trailers."))
    if s.mode == "schema":
        # a gRPC status, like the HTTP status, is compared by value in every mode
        head.update((p, frozenset(("string",))) for p in fields)
        if "status.grpc_message" in grpc_status:
            grpc_status["status.grpc_message"] = frozenset(("string",))
    else:
        head.update(fields)
    head.update(grpc_status)
    body, truncated = _decode_body(c, max(s.max_body, len(c.body)))
    return Lifted(head, body, truncated, s, grpc=grpc)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The last value of a header (names compared case-insensitively), or None."""
    found: bytes | None = None
    for raw_name, value in headers:
        if raw_name.lower() == name:
            found = value
    return found


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


def _under_empty_array(path: str, empty: set[str]) -> bool:
    start = 0
    while (i := path.find("[*]", start)) >= 0:
        if path[:i] in empty:
            return True
        start = i + 3
    return False


def _diff_maps(
    fa: dict[str, Any], fb: dict[str, Any], mode: str, a: Lifted, b: Lifted, out: list[str]
) -> None:
    if mode == "subset":
        for path, value in fa.items():
            other = fb.get(path, _MISSING)
            if other is _MISSING or not same(value, other):
                out.append(path)
        return
    schema = mode == "schema"
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


def diff(a: Lifted, b: Lifted, s: CompareSettings) -> list[str]:
    """Paths where `b` (candidate or secondary) differs from `a` (primary), sorted.

    strict: every path of either side must be on both, with equal values. subset: every path of
    `a` must be in `b` with an equal value; `b` may have more. schema: same paths and JSON types
    (status still compared by value; headers by presence).
    A missing answer on either side is a difference on `status` only (equal when both failed
    the same way). Bodies with identical bytes are equal without being parsed.
    """
    if a._kind == "failed" or b._kind == "failed":  # known at lift time, no body lifting
        return [] if a.head.get("status") == b.head.get("status") else ["status"]
    out: list[str] = []
    mode = s.mode
    # the head: status by value in every mode; header values are {"string"} in schema mode
    _diff_maps(a.head, b.head, mode, a, b, out)
    if a.body != b.body:
        if a.kind != b.kind:
            _diff_maps(_whole_body(a), _whole_body(b), mode, a, b, out)
        elif (a.kind == "json" or a.kind == "grpc") and mode != "schema":
            found: set[str] = set()
            _JsonDiff(s, mode == "strict", found).node(a.doc(), b.doc(), "body")
            out.extend(found)
        else:
            _diff_maps(a.body_fields(), b.body_fields(), mode, a, b, out)
    out.sort()
    return out


_SORTED = orjson.OPT_SORT_KEYS


class _JsonDiff:
    """Diff two parsed JSON documents by walking them together (strict and subset modes).

    Gives exactly the paths that flattening both sides and comparing the maps would give, but
    skips every subtree that is identical: Python's C-level `==` finds equal subtrees, and
    sorted-key serialisation confirms them, since `==` alone says `true == 1`, which is a
    difference here. Most of a changed answer is unchanged, so most of it is never flattened.
    """

    __slots__ = ("found", "ignore", "s", "strict", "unordered")

    def __init__(self, s: CompareSettings, strict: bool, found: set[str]) -> None:
        self.s = s
        self.strict = strict
        self.found = found
        self.ignore = s.ignore.matches if s.ignore else None
        self.unordered = s.unordered.matches if s.unordered else None

    def leaves(self, a: Any, b: Any, path: str) -> None:
        """Different shapes at `path`: every leaf of `a` (and of `b` in strict mode) differs."""
        self.found.update(_flatten(a, path, self.s))
        if self.strict:
            self.found.update(_flatten(b, path, self.s))

    def node(self, a: Any, b: Any, path: str) -> None:
        ta, tb = type(a), type(b)
        if a == b:
            if ta is not dict and ta is not list:
                if same(a, b):
                    return
            elif orjson.dumps(a, None, _SORTED) == orjson.dumps(b, None, _SORTED):
                return
        if ta is dict and tb is dict and a and b:
            ignore = self.ignore
            for key, va in a.items():
                sub = path + _segment(key)
                if ignore is not None and ignore(sub):
                    continue
                if key in b:
                    self.node(va, b[key], sub)
                else:
                    self.found.update(_flatten(va, sub, self.s))
            if self.strict:
                for key, vb in b.items():
                    if key not in a:
                        sub = path + _segment(key)
                        if ignore is None or not ignore(sub):
                            self.found.update(_flatten(vb, sub, self.s))
        elif ta is list and tb is list and a and b:
            if self.unordered is not None and self.unordered(path):
                if _multiset(a, path, self.s) != _multiset(b, path, self.s):
                    self.found.add(path)
                return
            ignore = self.ignore
            for i in range(max(len(a), len(b))):
                sub = f"{path}[{i}]"
                if ignore is not None and ignore(sub):
                    continue
                if i < len(a) and i < len(b):
                    self.node(a[i], b[i], sub)
                elif i < len(a):
                    self.found.update(_flatten(a[i], sub, self.s))
                elif self.strict:
                    self.found.update(_flatten(b[i], sub, self.s))
        elif ta in (int, float) and tb in (int, float) and ta is not bool and tb is not bool:
            if not same(a, b):
                self.found.add(path)
        else:
            self.leaves(a, b, path)


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
    paths = paths[:EXAMPLE_VALUES]
    fa, fb = a.fields_at(paths), b.fields_at(paths)
    for path in paths:
        va = fa.get(path, _MISSING)
        vb = fb.get(path, _MISSING)
        if path == "body" and a.kind != b.kind:
            va, vb = a.body, b.body
        out[path] = [_json_value(va), _json_value(vb)]
    return out


def request_text(body: bytes, path: str, primary: Lifted) -> str:
    """The request body as stored with an example: when the answer is gRPC, the request's
    messages decoded as JSON (by the method's request type with a descriptor set; a compressed
    one stays base64, as the request's grpc-encoding is not kept); else the bytes as text."""
    if primary.kind == "grpc":
        schema = primary.settings.grpc
        cls = schema.message_class(path, request=True) if schema is not None and path else None
        messages = GrpcAnswer(cls, b"identity", primary.settings.max_body).decode(body)
        if messages is not None:
            return orjson.dumps(messages).decode()
    return body.decode("utf-8", "replace")


def answer_doc(c: Captured, lifted: Lifted, redact: Redaction | None = None) -> dict[str, Any]:
    """One answer as stored with an example: status, all headers, the body as text (a gRPC
    body: its decoded messages as JSON), the trailers when there are any; with `redact`, its
    headers (and trailers) removed and its JSON fields masked before the body is cut."""
    headers = _joined(c.headers, redact)
    body = lifted.body if lifted.kind != "failed" else c.body
    if lifted.kind == "grpc":
        # the decoded messages as JSON: the framed protobuf bytes mean nothing to a reader
        body = orjson.dumps(lifted.doc())
    if redact is not None and redact.json and body:
        if lifted.truncated and looks_json(body):
            body = WITHHELD.encode()  # cut at the capture cap: its fields cannot all be found
        else:
            try:
                body = redact.json_body(body)
            except Unredactable:
                body = WITHHELD.encode()
    cut = len(body) > EXAMPLE_BODY_CAP
    doc: dict[str, Any] = {
        "status": c.status,
        "failure": c.failure,
        "headers": headers,
        "body": body[:EXAMPLE_BODY_CAP].decode("utf-8", "replace"),
        # the body was cut: at capture (compared only as far as captured) or for the example
        "truncated": lifted.truncated or cut,
        "compared_truncated": lifted.truncated,
        "seconds": c.seconds,
    }
    if c.trailers:
        doc["trailers"] = _joined(c.trailers, redact)
    return doc


def _joined(headers: list[tuple[bytes, bytes]], redact: Redaction | None) -> dict[str, str]:
    """Headers as `{name: values joined with ", "}`, lower-case names, minus redacted ones."""
    out: dict[str, str] = {}
    for raw_name, raw_value in headers:
        if redact is not None and redact.removes(raw_name.lower()):
            continue
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        out[name] = out[name] + ", " + value if name in out else value
    return out
