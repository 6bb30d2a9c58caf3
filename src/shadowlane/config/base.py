"""The base every config model shares, so a rule about the file is written once.

Two rules hold for every section: an unknown key is an error (a typo must not silently turn a
feature off), and numbers are accepted where text is meant (YAML reads `x-api-version: 2` as an
int). A section the user leaves empty (`admin:` with nothing under it) means its defaults, which
is what `_none_to_empty` gives the fields that hold a section.

A third rule: a model is not written once it is built. A loaded `Config` is shared by every
layer of a generation (and compared with the next one on reload), so it must say what the file
said; what the admin API changes at run time belongs in control state, which overlays the
models (`control.Control.snapshot`) without touching them. `_Model` enforces this: frozen,
checked by mypy as well as at run time.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict


def _none_to_empty(factory: Callable[[], object]) -> Callable[[object], object]:
    """Let `key:` with nothing under it (YAML null) mean "empty", as a commented-out block does."""

    def convert(value: object) -> object:
        return factory() if value is None else value

    return convert


# coerce_numbers_to_str: YAML reads `x-api-version: 2` as an int; a header value is text.
_RULES = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class _Model(BaseModel, frozen=True):
    """A frozen config model. Subclasses repeat `frozen=True` in their class line: that is how
    mypy sees it (a dataclass-like class may not drop its base's frozenness silently)."""

    model_config = _RULES
