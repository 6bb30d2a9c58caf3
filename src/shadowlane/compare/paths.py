"""Field paths (`body.items[3].id`) and the wildcard rules that select them.

A path names one leaf of a lifted answer: `status`, `headers.<name>`, `body` (a whole non-JSON
body) or `body` followed by `.key` and `[index]` segments. A key that is empty or holds `.`,
`[`, `]` or `"` is written quoted, `["a.b"]`, so that any path can be split back unambiguously.

Rules (ignore, unordered) are compiled once per shadow into one regular expression each:
`*` matches one key (or part of one: `x-*`), `[*]` any index, `**` any number of segments
(zero included). An ignore rule also covers everything below the path it matches (ignoring
`body.meta` ignores `body.meta.took`); an unordered rule names exactly the array it applies to.
Matches are cached per path, because the same paths come back in every answer of an endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import orjson

_PLAIN_KEY = re.compile(r'[^.\[\]"]+')

#: one segment of a rendered path: `.key`, `[3]` or `["quoted key"]`
_SEG = r'(?:\.[^.\[]+|\[(?:\d+|\*)\]|\["(?:[^"\\]|\\.)*"\])'
_KEY = r'(?:\.[^.\[]+|\["(?:[^"\\]|\\.)*"\])'
_TOKEN = re.compile(r"\*\*|\[\*\]|\[\d+\]|[^.\[\]]+")

#: cache size per matcher; cleared when full (paths of a service are a small, recurring set)
CACHE_SIZE = 65536


def key_segment(key: str) -> str:
    """`.key`, or `["key"]` when the key could not be read back from a dotted path."""
    if _PLAIN_KEY.fullmatch(key):
        return "." + key
    return "[" + orjson.dumps(key).decode() + "]"


def child(path: str, key: str) -> str:
    return path + key_segment(key)


def _token_regex(token: str) -> str:
    if token == "**":
        return _SEG + "*"
    if token == "[*]":
        # `[*]` also matches the literal `[*]` of schema mode's collapsed array paths
        return r"\[(?:\d+|\*)\]"
    if token.startswith("["):
        return re.escape(token)
    if token == "*":
        return _KEY
    if "*" in token:
        return r"\." + "[^.\\[]*".join(re.escape(part) for part in token.split("*"))
    return re.escape("." + token)


def pattern_regex(pattern: str) -> str:
    """The regex (over "." + path) of one rule; raises ValueError on a malformed rule."""
    text = pattern.strip()
    pos = 0
    out: list[str] = []
    while pos < len(text):
        if pos and text[pos] == ".":
            pos += 1
        m = _TOKEN.match(text, pos)
        if m is None or (pos == 0 and m.group().startswith("[")):
            raise ValueError(f"bad field path rule {pattern!r}")
        out.append(_token_regex(m.group()))
        pos = m.end()
    if not out:
        raise ValueError("empty field path rule")
    return "".join(out)


class PathMatcher:
    """A compiled set of rules; `matches(path)` is cached per path."""

    __slots__ = ("_cache", "_regex", "patterns", "subtree")

    def __init__(self, patterns: Iterable[str], *, subtree: bool) -> None:
        #: the rules as written, for display
        self.patterns: tuple[str, ...] = tuple(dict.fromkeys(p.strip() for p in patterns))
        self.subtree = subtree
        self._cache: dict[str, bool] = {}
        if not self.patterns:
            self._regex: re.Pattern[str] | None = None
            return
        body = "|".join(f"(?:{pattern_regex(p)})" for p in self.patterns)
        end = r"(?=[.\[]|$)" if subtree else "$"
        self._regex = re.compile(f"(?:{body}){end}")

    def __bool__(self) -> bool:
        return self._regex is not None

    def __reduce__(self) -> tuple[object, ...]:
        """Rebuilt from its rules in a comparison child (settings travel pickled): a compiled
        class has no instance dict for pickle's default, and the cache need not travel."""
        return (_rebuild, (self.patterns, self.subtree))

    def matches(self, path: str) -> bool:
        if self._regex is None:
            return False
        hit = self._cache.get(path)
        if hit is None:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            hit = self._cache[path] = self._regex.match("." + path) is not None
        return hit

    def __repr__(self) -> str:
        return f"PathMatcher({list(self.patterns)!r})"


def _rebuild(patterns: tuple[str, ...], subtree: bool) -> PathMatcher:
    return PathMatcher(patterns, subtree=subtree)
