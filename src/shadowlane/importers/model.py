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
