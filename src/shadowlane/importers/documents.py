"""Reading peers' documents (files, directories, multi-document YAML, eskip) into one config.

This is where a load decides what each document is: a Kubernetes object of a known peer kind,
an Envoy route configuration, eskip text, or shadowlane's own config (any other mapping), and
where the native documents are merged (`backends` joined, `routes` appended, any other key
given once) with what the peers' documents translate to. The result is a plain dict that the
config layer validates like any file, so a translated route is held to the same rules as one
written by hand.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import shadowlane.importers.emissary as emissary
import shadowlane.importers.envoy as envoy
import shadowlane.importers.gateway as gateway
import shadowlane.importers.gloo as gloo
import shadowlane.importers.istio as istio
import shadowlane.importers.skipper as skipper
from shadowlane.config import ConfigError
from shadowlane.importers.eskip import EskipError, parse_routes
from shadowlane.importers.model import Doc, Note, Translation, as_dict, object_name
from shadowlane.importers.services import ServiceMap

#: files a directory contributes (a mounted ConfigMap also holds `..data` and friends: hidden)
SUFFIXES = (".yaml", ".yml", ".json", ".eskip")

_FORMATS: dict[tuple[str, str], str] = {
    ("gateway.networking.k8s.io", "HTTPRoute"): "gateway",
    ("gateway.networking.k8s.io", "GRPCRoute"): "gateway",
    ("networking.istio.io", "VirtualService"): "istio",
    ("getambassador.io", "Mapping"): "emissary",
    ("gateway.solo.io", "VirtualService"): "gloo",
    ("zalando.org", "RouteGroup"): "skipper",
}


@dataclass
class Loaded:
    """The merged native config (as data) and what was said about the peers' documents."""

    config: dict[str, Any]
    translation: Translation
    native: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)

    @property
    def notes(self) -> list[Note]:
        return self.translation.notes


def files_of(path: str) -> list[Path]:
    """A file as is; a directory's visible files with a known suffix, in name order."""
    p = Path(path)
    if p.is_dir():
        return sorted(
            f
            for f in p.iterdir()
            if not f.name.startswith(".") and f.suffix in SUFFIXES and f.is_file()
        )
    return [p]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc.reason}"]) from None


def _yaml_docs(text: str, source: str) -> list[object]:
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError([f"{where}: {exc.problem or exc.context or 'invalid YAML'}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: {exc}"]) from None


def _group(doc: Doc) -> str:
    return str(doc.get("apiVersion", "")).partition("/")[0]


def is_native_only(text: str) -> bool:
    """One YAML document that is none of the peers' kinds: the plain config file case, which
    keeps `load_config`'s exact errors (line and column, file order)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        return True  # let load_config report it, with its own wording
    if len(docs) != 1 or not isinstance(docs[0], dict):
        return len(docs) <= 1
    doc = docs[0]
    return not ("apiVersion" in doc and "kind" in doc) and not envoy.is_envoy(doc)


def _merge_native(
    into: dict[str, Any], doc: dict[str, Any], source: str, errors: list[str]
) -> None:
    for key, value in doc.items():
        if key == "backends" and isinstance(value, dict):
            backends = into.setdefault("backends", {})
            for name, backend in value.items():
                if name in backends:
                    errors.append(f"{source}: backends.{name}: defined in two documents")
                backends[name] = backend
        elif key == "routes" and isinstance(value, list):
            into.setdefault("routes", []).extend(value)
        elif key in into:
            errors.append(f"{source}: {key}: given in two documents")
        else:
            into[key] = value


def translate_paths(paths: list[str], services: ServiceMap) -> Loaded:
    """Every document under `paths`, translated and merged; raises ConfigError on unreadable
    or unparsable input (never on a field it cannot translate: that is a note).

    The `--services` file is skipped when a directory holds it too (one ConfigMap may carry
    the routes and the services map side by side)."""
    skip = {os.path.realpath(services.source)} if services.source else set()
    native: dict[str, Any] = {}
    errors: list[str] = []
    by_format: dict[str, list[Any]] = {}
    order: list[str] = []
    loaded = Loaded({}, Translation())
    tr = loaded.translation

    def add(fmt: str, item: Any) -> None:
        if fmt not in by_format:
            order.append(fmt)
        by_format.setdefault(fmt, []).append(item)

    for path in paths:
        if not os.path.exists(path):
            raise ConfigError([f"{path}: cannot read: No such file or directory"])
        for file in files_of(path):
            if os.path.realpath(file) in skip:
                continue
            text = _read(file)
            source = str(file)
            if file.suffix == ".eskip":
                try:
                    add("skipper", ("eskip", source, parse_routes(text)))
                except EskipError as err:
                    errors.append(f"{source}:{err}")
                loaded.peers.append(source)
                continue
            stack = _yaml_docs(text, source)
            while stack:
                doc = stack.pop(0)
                if not isinstance(doc, dict):
                    errors.append(
                        f"{source}: a document must be a mapping, got {type(doc).__name__}"
                    )
                    continue
                if "apiVersion" in doc and "kind" in doc:
                    if doc["kind"] == "List":
                        stack[:0] = list(doc.get("items") or [])
                        continue
                    fmt = _FORMATS.get((_group(doc), str(doc["kind"])))
                    if fmt is None:
                        tr.note(
                            object_name(doc),
                            "kind",
                            f"{doc['apiVersion']} {doc['kind']} is not a route document: ignored",
                        )
                        continue
                    add(fmt, doc)
                    loaded.peers.append(f"{source}: {object_name(doc)}")
                elif envoy.is_envoy(doc):
                    name = doc.get("name")
                    add("envoy", (f"Envoy {name or source}", doc))
                    loaded.peers.append(f"{source}: Envoy route configuration")
                else:
                    _merge_native(native, doc, source, errors)
                    loaded.native.append(source)
    if errors:
        raise ConfigError(errors)
    tr.reserve_names(
        [str(as_dict(r).get("name")) for r in native.get("routes", []) if isinstance(r, dict)],
        [str(n) for n in as_dict(native.get("backends"))],
    )
    handlers: dict[str, Callable[[list[Any]], None]] = {
        "gateway": lambda docs: gateway.translate(docs, tr, services),
        "istio": lambda docs: istio.translate(docs, tr, services),
        "emissary": lambda docs: emissary.translate(docs, tr, services),
        "gloo": lambda docs: gloo.translate(docs, tr, services),
        "envoy": lambda docs: envoy.translate(docs, tr, services),
        "skipper": lambda docs: _skipper(docs, tr, services),
    }
    for fmt in order:
        handlers[fmt](by_format[fmt])
    config = dict(native)
    for key, value in tr.settings.items():
        if key in config and config[key] != value:
            tr.note("native config", key, f"kept {config[key]!r}; the peers' routes need {value!r}")
        config.setdefault(key, value)
    backends = dict(as_dict(native.get("backends")))
    for name, backend in tr.backends.items():
        if backend.origin != "native":
            backends[name] = {"endpoints": backend.endpoints, **backend.extra}
    if backends:
        config["backends"] = backends
    routes = list(native.get("routes", [])) + [r.data for r in tr.routes]
    if routes:
        config["routes"] = routes
    loaded.config = config
    return loaded


def _skipper(items: list[Any], tr: Translation, services: ServiceMap) -> None:
    routes: list[Any] = []
    for item in items:
        if isinstance(item, tuple):
            _, source, eskip_routes = item
            routes += skipper.routes_from_eskip(tr, services, eskip_routes, source, len(routes))
        else:
            routes += skipper.routes_from_group(tr, services, item, len(routes))
    skipper.finish(tr, routes)
