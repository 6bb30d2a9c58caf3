"""Route predicates (Skipper's word): small callables `Request -> bool`, compiled once per route.

Matching runs for every request, so each predicate is a closure over pre-computed values
(a frozenset, a lower-cased suffix, a compiled regex) and the tuple is ordered cheapest first:
a route that fails on method or host never pays for a regex or for parsing the query string.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from shadowlane.config import MatchConfig, ShadowMatch
from shadowlane.wire.messages import Request

Predicate = Callable[[Request], bool]

__all__ = ["Predicate", "compile_match", "compile_predicates"]


def _method(methods: list[str]) -> Predicate:
    allowed = frozenset(methods)

    def pred(req: Request) -> bool:
        return req.method in allowed

    return pred


def _host(pattern: str) -> Predicate:
    """Exact host, or `*.suffix`, which like Envoy needs at least one label before the suffix."""
    pattern = pattern.lower()
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"

        def wildcard(req: Request) -> bool:
            host = req.host
            return len(host) > len(suffix) and host.endswith(suffix)

        return wildcard

    def exact(req: Request) -> bool:
        return req.host == pattern

    return exact


def _path(path: str) -> Predicate:
    def pred(req: Request) -> bool:
        return req.path == path

    return pred


def _path_prefix(prefix: str) -> Predicate:
    """Plain string prefix, as Envoy's `prefix`: `/orders` also matches `/orders-old`."""

    def pred(req: Request) -> bool:
        return req.path.startswith(prefix)

    return pred


def _path_regex(regex: str) -> Predicate:
    """`re.search`, not `fullmatch`, as Skipper's PathRegexp: anchor with ^ and $ if needed."""
    search = re.compile(regex).search

    def pred(req: Request) -> bool:
        return search(req.path) is not None

    return pred


def _header(name: str, value: str) -> Predicate:
    """Exact value of the first header `name`; names were lower-cased by the config."""

    def pred(req: Request) -> bool:
        return req.header(name) == value

    return pred


def _query(name: str, value: str) -> Predicate:
    def pred(req: Request) -> bool:
        return req.query_arg(name) == value

    return pred


def compile_predicates(match: MatchConfig | ShadowMatch) -> tuple[Predicate, ...]:
    """All predicates `match` asks for, cheapest first; empty tuple means match everything."""
    preds: list[Predicate] = []
    if match.methods is not None:
        preds.append(_method(match.methods))
    if isinstance(match, MatchConfig):
        if match.host is not None:
            preds.append(_host(match.host))
        if match.path is not None:
            preds.append(_path(match.path))
    if match.path_prefix is not None:
        preds.append(_path_prefix(match.path_prefix))
    for name, value in (match.headers or {}).items():
        preds.append(_header(name, value))
    if isinstance(match, MatchConfig):
        if match.path_regex is not None:
            preds.append(_path_regex(match.path_regex))
        # last: the first query predicate parses the query string (once per request)
        for name, value in (match.query or {}).items():
            preds.append(_query(name, value))
    return tuple(preds)


def compile_match(match: MatchConfig | ShadowMatch | None) -> Predicate:
    """One callable for the whole match; shadow code uses it for a shadow's `match:` block."""
    preds = compile_predicates(match) if match is not None else ()
    if not preds:
        return _always
    if len(preds) == 1:
        return preds[0]

    def all_of(req: Request) -> bool:
        for pred in preds:  # noqa: SIM110 - about 2x faster than all(genexpr)
            if not pred(req):
                return False
        return True

    return all_of


def _always(req: Request) -> bool:
    return True
