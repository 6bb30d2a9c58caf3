"""Two `_source`s compared with the comparison engine's own differ and path rules.

Why reuse `compare.diff` rather than `==`: the same leaf rules as every shadowed answer (1 is
1.0, true is not 1, {} is not []), field paths a person already reads in the report, and
`--ignore` rules in the syntax of `compare.ignore`. A `_source` becomes the JSON body of a
lifted answer with no head, so `diff` compares exactly the document. It is serialised with
sorted keys first: JSON objects have no order, and two clusters may return keys in different
orders, yet byte-identical serialisations (the common case) are decided without a walk.

Paths are reported relative to `_source` (`price`, `lines[2].sku`, `["a.b"]`), the form
`--ignore` takes, so a path from an example can be pasted into the next run's `--ignore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from shadowlane.compare.diff import Lifted, diff, values_of
from shadowlane.compare.paths import PathMatcher
from shadowlane.compare.settings import CompareSettings

__all__ = ["SourceComparer"]

#: the root the differ writes body paths under
_ROOT = "body"
#: how a whole `_source` is named when one side has none (source disabled, say)
SOURCE = "_source"


def _rule(path: str) -> str:
    text = path.strip()
    if not text:
        raise ValueError("empty field path")
    for prefix in ("_source.", "_source["):
        if text.startswith(prefix):  # accept the path also as written from the hit's root
            text = text[len("_source") :].lstrip(".")
            break
    return _ROOT + ("" if text.startswith("[") else ".") + text


def _relative(path: str) -> str:
    if path == _ROOT:
        return SOURCE
    rest = path[len(_ROOT) :]
    return rest[1:] if rest.startswith(".") else rest


class SourceComparer:
    """Compares documents under one set of `--ignore` rules (compiled once)."""

    def __init__(self, ignore: Sequence[str] = ()) -> None:
        """Raises ValueError naming a malformed rule."""
        rules = []
        for path in ignore:
            try:
                rule = _rule(path)
                PathMatcher([rule], subtree=True)
            except ValueError as err:
                raise ValueError(f"--ignore {path!r}: {err}") from None
            rules.append(rule)
        self.settings = CompareSettings(
            mode="strict", ignore=PathMatcher(rules, subtree=True), ignore_headers=frozenset()
        )

    def _lift(self, source: Any) -> Lifted:
        body = orjson.dumps(source, option=orjson.OPT_SORT_KEYS)
        return Lifted({}, body, False, self.settings)

    def fields(self, primary: Any, shadow: Any) -> list[str]:
        """The paths where the two differ (ignored ones left out), sorted; [] when equal."""
        return [_relative(p) for p in diff(self._lift(primary), self._lift(shadow), self.settings)]

    def values(self, primary: Any, shadow: Any, fields: list[str]) -> dict[str, list[Any]]:
        """`{path: [primary value, shadow value]}` of the first differing `fields`."""
        a, b = self._lift(primary), self._lift(shadow)
        paths = [_rule(f) if f != SOURCE else _ROOT for f in fields]
        return {_relative(p): v for p, v in values_of(a, b, paths).items()}
