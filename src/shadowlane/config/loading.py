"""Turning a YAML file into a `Config`, or into one `key.path: reason` line per problem.

This is the part of the config that talks to people, so it owns the error format `shadowlane
check` prints as is. Validation happens in two passes: pydantic checks each field and each
model on its own (collecting every problem at once), then, only if that passed, `_cross_check`
looks at the whole tree (backend names exist, route names are unique, listen addresses differ).
pydantic's messages are reworded here and put in file order, and YAML itself is loaded strictly
(a duplicate key is an error, where PyYAML would keep the last one), so the models stay plain
declarations with no knowledge of where their input came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from shadowlane.config.document import Config
from shadowlane.config.migrations import check_migrations


class ConfigError(Exception):
    """A config that cannot be used; `errors` holds one `key.path: reason` line per problem.

    All problems are collected before raising so a user fixes a file in one round, not one error
    per run.
    """

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


#: a key path as pydantic reports it: ('routes', 0, 'shadows', 1, 'percent')
Loc = tuple[int | str, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML silently keeps the last one otherwise."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it properly
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {first + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(exc: yaml.YAMLError, source: str) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if mark is not None:
            return f"{source}:{mark.line + 1}:{mark.column + 1}: {problem}"
        return f"{source}: {problem}"
    return f"{source}: {exc}"


def _loc_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]" or part.startswith("<"):
            # dict-key errors: the key itself is already the last path segment; "<...>" are
            # the tags of tagged unions (`compare: true` vs a mapping), not keys the user wrote
            continue
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _type_name(value: object) -> str:
    if value is None:
        return "nothing (empty value)"
    if isinstance(value, bool):
        return f"{str(value).lower()}, a boolean; quote it to make it text"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


_TYPE_WORDS = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def _reword(err: ErrorDetails) -> str:
    """Short, actionable wording for each pydantic error type the models can produce."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in _TYPE_WORDS:
        return f"{_TYPE_WORDS[kind]}, got {_type_name(err['input'])}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', '?')}, got {err['input']!r}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}"
    if kind == "greater_than":
        return f"must be > {ctx.get('gt')}"
    if kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err["msg"]))
        return msg
    msg = err["msg"]
    return msg[:1].lower() + msg[1:]


def _cross_check(cfg: Config) -> list[str]:
    """Whole-tree rules that no single model can see."""
    errors: list[str] = []
    known = list(cfg.backends)
    known_text = ", ".join(known)

    def ref(path: str, name: str) -> None:
        if name not in cfg.backends:
            errors.append(f"{path}: unknown backend {name!r} (known: {known_text})")

    first_seen: dict[str, int] = {}
    for i, route in enumerate(cfg.routes):
        if route.name in first_seen:
            errors.append(
                f"routes[{i}].name: duplicate route name {route.name!r} "
                f"(also routes[{first_seen[route.name]}])"
            )
        else:
            first_seen[route.name] = i
        if route.backend is not None:
            ref(f"routes[{i}].backend", route.backend)
        for j, leg in enumerate(route.backends or ()):
            ref(f"routes[{i}].backends[{j}].backend", leg.backend)
        shadowed: dict[str, int] = {}
        for j, shadow in enumerate(route.shadows):
            ref(f"routes[{i}].shadows[{j}].backend", shadow.backend)
            if shadow.backend in shadowed:
                # outcomes, latencies and comparisons are kept per (route, target): two lanes
                # under one name would add up into one series and one comparison row
                errors.append(
                    f"routes[{i}].shadows[{j}].backend: {shadow.backend!r} is already the target "
                    f"of routes[{i}].shadows[{shadowed[shadow.backend]}]; to send two copies, "
                    "declare a second backend name with the same endpoints"
                )
            else:
                shadowed[shadow.backend] = j
            opts = shadow.compare_enabled
            if opts is not None and opts.secondary is not None:
                ref(f"routes[{i}].shadows[{j}].compare.secondary", opts.secondary)

    listen, admin = cfg.listen_addr, cfg.admin.listen_addr
    if listen == admin and listen[1] != 0:
        errors.append(f"admin.listen: same address as listen ({cfg.listen})")
    errors += check_migrations(cfg)
    return errors


def _positions(node: yaml.Node, path: Loc, out: dict[Loc, tuple[int, int]]) -> None:
    """Map each key path to where it starts in the file, to report errors in file order."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                sub = (*path, key_node.value)
                out[sub] = (key_node.start_mark.line, key_node.start_mark.column)
                _positions(value_node, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = (*path, i)
            out[sub] = (item.start_mark.line, item.start_mark.column)
            _positions(item, sub, out)


def _position_of(loc: Loc, positions: dict[Loc, tuple[int, int]]) -> tuple[int, int]:
    parts = tuple(p for p in loc if p != "[key]" and not str(p).startswith("<"))
    for end in range(len(parts), 0, -1):
        pos = positions.get(parts[:end])
        if pos is not None:
            return pos
    return (0, 0)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse YAML text into a validated Config, or raise ConfigError with every problem found.

    Problems are listed in the order their keys appear in the file (pydantic would list a
    model's fields first and its unknown keys last), so the list reads top to bottom.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc, source)]) from None
    finally:
        loader.dispose()
    if data is None or node is None:
        raise ConfigError([f"{source}: empty config (needs at least backends and routes)"])
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{source}: top level must be a mapping of keys, got {_type_name(data)}"]
        )
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        positions: dict[Loc, tuple[int, int]] = {}
        _positions(node, (), positions)
        found = sorted(
            exc.errors(include_url=False), key=lambda e: _position_of(e["loc"], positions)
        )
        raise ConfigError([f"{_loc_path(e['loc'])}: {_reword(e)}" for e in found]) from None
    errors = _cross_check(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and parse a config file; errors about YAML syntax carry `file:line:col`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc.reason}"]) from None
    return parse_config(text, str(path))
