"""What a translation produces: native routes and backends, and the notes about what it dropped.

Every format module writes into one `Translation`, so names stay unique across all the peers'
documents of one load (two HTTPRoutes may both call a rule `default`), a service referenced by
several objects becomes one backend, and every field that could not be carried over is a
`Note` naming the object and the field path, the way a config error names its key path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from shadowlane.config import ROUTE_RESERVED_HEADERS

#: one peer object: what `metadata` says, and its fields
Doc = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Note:
    """A field that was not translated (or not exactly): `Kind ns/name: path: message`."""

    obj: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.obj}: {self.path}" if self.path else self.obj
        return f"{where}: {self.message}"


@dataclass
class Route:
    """A native route (a dict as the YAML holds it) and the comments written above it."""

    data: dict[str, Any]
    comments: list[str] = field(default_factory=list)


@dataclass
class Backend:
    """A native backend and where its endpoints came from (a comment in the output)."""

    endpoints: list[str]
    origin: str
    extra: dict[str, Any] = field(default_factory=dict)


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """A name the config accepts (`[A-Za-z0-9_.-]+`) from a peer's name, which may hold `/`."""
    cleaned = _UNSAFE.sub("-", text).strip("-")
    return cleaned or "unnamed"


@dataclass
class Translation:
    """The native config being built from the peers' documents, and the notes about them."""

    routes: list[Route] = field(default_factory=list)
    backends: dict[str, Backend] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)
    #: top-level settings the peers' documents imply (`listen_http2` for a GRPCRoute); a
    #: native document's own value wins
    settings: dict[str, Any] = field(default_factory=dict)
    #: backend name by (endpoints, extra) so one service is one backend
    _by_target: dict[tuple[tuple[str, ...], str], str] = field(default_factory=dict)
    _route_names: set[str] = field(default_factory=set)

    def note(self, obj: str, path: str, message: str) -> None:
        self.notes.append(Note(obj, path, message))

    def unsupported(self, obj: str, path: str, what: str = "") -> None:
        """The common note: a field shadowlane has no equivalent for."""
        self.note(obj, path, what or "not translated (shadowlane has no equivalent)")

    def backend(self, wanted: str, endpoints: list[str], origin: str, **extra: Any) -> str:
        """The name of the backend with these endpoints, declared on first use."""
        key = (tuple(endpoints), repr(sorted(extra.items())))
        known = self._by_target.get(key)
        if known is not None:
            return known
        name = base = safe_name(wanted)
        n = 2
        while name in self.backends:
            name = f"{base}-{n}"
            n += 1
        self.backends[name] = Backend(list(endpoints), origin, dict(extra))
        self._by_target[key] = name
        return name

    def route_name(self, wanted: str) -> str:
        name = base = safe_name(wanted)
        n = 2
        while name in self._route_names:
            name = f"{base}-{n}"
            n += 1
        self._route_names.add(name)
        return name

    def reserve_names(self, routes: list[str], backends: list[str]) -> None:
        """Names the native documents use, so translated ones never collide with them."""
        self._route_names.update(routes)
        for name in backends:
            self.backends.setdefault(name, Backend([], "native"))

    def add_route(self, data: dict[str, Any], comments: list[str] | None = None) -> None:
        self.routes.append(Route(data, list(comments or [])))


def route_data(
    match: dict[str, Any],
    host: str | None,
    legs: list[dict[str, Any]],
    changes: dict[str, Any],
    rewrite: dict[str, str] | None = None,
    shadows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A native route's dict, built the one way every peer's route is: `match` (plus `host`
    when the peer's route is for one), one `backend` or weighted `backends` from `legs`, the
    route's header and Host `changes`, its `rewrite_path` and its `shadows`, each copied so
    that routes made from one peer object (one per host, per match) share nothing. Its `name`
    is left empty, first among the keys (the output shows it first), for the caller to fill
    through `Translation.route_name`.
    """
    data: dict[str, Any] = {"name": "", "match": dict(match)}
    if host is not None:
        data["match"]["host"] = host
    if len(legs) == 1:
        data["backend"] = legs[0]["backend"]
    else:
        data["backends"] = [dict(leg) for leg in legs]
    data.update(changes)
    if rewrite is not None:
        data["rewrite_path"] = dict(rewrite)
    if shadows:
        data["shadows"] = [dict(s) for s in shadows]
    return data


def object_name(doc: Doc) -> str:
    """`Kind namespace/name`, as notes and comments name an object."""
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    name = str(meta.get("name", "?"))
    ns = meta.get("namespace")
    kind = str(doc.get("kind", "?"))
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


def namespace_of(doc: Doc, default: str = "default") -> str:
    meta = doc.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("namespace"), str):
        return str(meta["namespace"])
    return default


def name_of(doc: Doc) -> str:
    meta = doc.get("metadata")
    if isinstance(meta, dict) and meta.get("name") is not None:
        return str(meta["name"])
    return "unnamed"


def as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def leftover(
    tr: Translation, obj: str, path: str, data: dict[str, Any], known: set[str] | frozenset[str]
) -> None:
    """A note for every key of `data` not in `known`: nothing is dropped silently."""
    for key in data:
        if key not in known:
            tr.unsupported(obj, f"{path}.{key}" if path else str(key))


def prefix_regex(prefix: str) -> str:
    """A path prefix that matches whole segments (`/foo` matches `/foo`, `/foo/x`, not `/foobar`),
    as Gateway API's PathPrefix and Skipper's PathSubtree do."""
    trimmed = prefix.rstrip("/")
    return f"^{re.escape(trimmed)}(/|$)"


def segment_prefix_match(prefix: str) -> dict[str, str]:
    """The native match for a whole-segment prefix; `/` is every path."""
    if prefix.rstrip("/") == "":
        return {"path_prefix": "/"}
    return {"path_regex": prefix_regex(prefix)}


def no_traffic(tr: Translation, obj: str, path: str, legs: list[dict[str, Any]]) -> bool:
    """True (and a note) when the legs can carry no request: none, or every weight 0, which
    the peers answer with an error and the native config refuses."""
    if not legs:
        tr.note(obj, path, "no usable backend: not translated")
        return True
    if all(leg.get("weight", 1) == 0 for leg in legs):
        tr.note(obj, path, "every weight is 0 (the peer answers with an error): not translated")
        return True
    return False


def percent_of(numerator: object, denominator: object = 100) -> float:
    try:
        num = float(numerator)  # type: ignore[arg-type]
        den = float(denominator)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 100.0
    if den <= 0:
        return 100.0
    return max(0.0, min(100.0, num * 100.0 / den))


def literal_replacement(text: str) -> str:
    """`text` as an `re.sub` replacement that inserts it as written (backslashes doubled)."""
    return text.replace("\\", "\\\\")


def prefix_rewrite(match: dict[str, Any], value: str) -> dict[str, str]:
    """Envoy's `prefix_rewrite` (Emissary `rewrite`, Gloo `prefixRewrite`, Istio `uri`) for the
    native `match` it goes with: it swaps what the route matched, so the matched prefix (or the
    whole path of an exact match) is replaced (`rewrite_path.prefix`); a regex route matched
    the whole path, which is replaced; a route with no path match is Envoy's prefix `/`."""
    if "path_prefix" in match or "path" in match:
        return {"prefix": value if value.startswith("/") else "/" + value}
    if "path_regex" in match:
        return {"regex": "^.*$", "replacement": literal_replacement(value)}
    return {"regex": "^/", "replacement": literal_replacement(value)}


def regex_rewrite(
    tr: Translation, obj: str, path: str, regex: str, substitution: str
) -> dict[str, str]:
    """A peer's regex rewrite (RE2, `\\1` groups, as Python's): ours replaces the first match;
    Envoy's `regex_rewrite`, Gloo's and Skipper's `modPath` replace every one, which differs
    only for a pattern that can match twice (not anchored with `^`): that is noted."""
    if not regex.startswith("^"):
        tr.note(
            obj,
            path,
            "the peer replaces every match of this unanchored pattern; shadowlane replaces the "
            "first (anchor it with ^ to silence this)",
        )
    return {"regex": regex, "replacement": substitution}


def route_headers(
    tr: Translation, obj: str, path: str, heads: dict[str, Any], out: dict[str, Any]
) -> None:
    """A peer's header changes into the route's `headers` in `out`: a Host set as a header
    becomes the route's `host` (unless `out` has one already, from the peer's own Host
    rewrite, which wins); a header shadowlane manages on the forwarded request (framing,
    hop-by-hop, the request id, HTTP/2 pseudo-headers) is noted and left alone, so one such
    field does not make the whole config fail."""
    for verb in ("set", "add"):
        for name in list(heads.get(verb, {})):
            if name == "host" or name == ":authority":
                out.setdefault("host", heads[verb].pop(name))
            elif name in ROUTE_RESERVED_HEADERS or name.startswith(":"):
                heads[verb].pop(name)
                tr.note(obj, path, f"header {name!r} is managed by shadowlane: not changed")
    kept_remove = []
    for name in heads.get("remove", []):
        if name in ROUTE_RESERVED_HEADERS or name.startswith(":"):
            tr.note(obj, path, f"header {name!r} is managed by shadowlane: not removed")
        else:
            kept_remove.append(name)
    heads["remove"] = kept_remove
    kept = {k: v for k, v in heads.items() if v}
    if kept:
        out["headers"] = kept
