"""Admin route table: exact paths plus `{name}` segment patterns, looked up by method and path.

Exact paths are a dict lookup (the scrape path, `/metrics`, is hit every few seconds forever);
patterns are tried in registration order after that. A path that some route matches with a
different method is a 405 with `Allow`, not a 404, so clients can tell a typo from a wrong verb.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from shadowlane.admin.messages import Handler

__all__ = ["Found", "MethodNotAllowed", "Router"]

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass(slots=True, frozen=True)
class _Entry:
    handler: Handler
    mutating: bool


@dataclass(slots=True, frozen=True)
class Found:
    """The route for a request: its handler, whether it needs the token, and path parameters."""

    handler: Handler
    mutating: bool
    params: dict[str, str]


@dataclass(slots=True, frozen=True)
class MethodNotAllowed:
    """Some route has this path, none has this method; `allowed` is sorted for the Allow header."""

    allowed: tuple[str, ...]


@dataclass(slots=True)
class _Pattern:
    pattern: str
    #: per segment: a literal, or None for a parameter (whose name is in `names` at that index)
    segments: tuple[str | None, ...]
    names: tuple[str | None, ...]
    methods: dict[str, _Entry] = field(default_factory=dict)

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for part, literal, name in zip(parts, self.segments, self.names, strict=True):
            if literal is None:
                if not part:
                    return None
                assert name is not None
                params[name] = unquote(part)
            elif part != literal:
                return None
        return params


class Router:
    """Method + path -> handler. Registration is validated; lookup never raises."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, _Entry]] = {}
        self._patterns: list[_Pattern] = []

    def add(self, method: str, path: str, handler: Handler, *, mutating: bool = False) -> None:
        """Register `handler` for `method` on `path` (a literal path or one with `{name}` parts)."""
        method = method.upper()
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")
        parts = path.split("/")[1:]
        names: list[str | None] = []
        segments: list[str | None] = []
        for part in parts:
            m = _PARAM.match(part)
            if m:
                if m.group(1) in names:
                    raise ValueError(f"duplicate path parameter {m.group(1)!r} in {path!r}")
                names.append(m.group(1))
                segments.append(None)
            else:
                if "{" in part or "}" in part:
                    raise ValueError(f"bad path parameter segment {part!r} in {path!r}")
                names.append(None)
                segments.append(part)
        entry = _Entry(handler, mutating)
        if all(name is None for name in names):
            methods = self._exact.setdefault(path, {})
        else:
            found = next((p for p in self._patterns if p.pattern == path), None)
            if found is None:
                found = _Pattern(path, tuple(segments), tuple(names))
                self._patterns.append(found)
            methods = found.methods
        if method in methods:
            raise ValueError(f"route {method} {path} is already registered")
        methods[method] = entry

    def match(self, method: str, path: str) -> Found | MethodNotAllowed | None:
        """The route for `method` on `path`; HEAD falls back to GET. None means 404."""
        allowed: set[str] = set()
        exact = self._exact.get(path)
        if exact is not None:
            entry = _pick(exact, method)
            if entry is not None:
                return Found(entry.handler, entry.mutating, {})
            allowed.update(exact)
        if self._patterns:
            parts = path.split("/")[1:]
            for pattern in self._patterns:
                params = pattern.match(parts)
                if params is None:
                    continue
                entry = _pick(pattern.methods, method)
                if entry is not None:
                    return Found(entry.handler, entry.mutating, params)
                allowed.update(pattern.methods)
        if not allowed:
            return None
        if "GET" in allowed:
            allowed.add("HEAD")
        return MethodNotAllowed(tuple(sorted(allowed)))


def _pick(methods: dict[str, _Entry], method: str) -> _Entry | None:
    entry = methods.get(method)
    if entry is None and method == "HEAD":
        entry = methods.get("GET")
    return entry
