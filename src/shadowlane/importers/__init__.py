"""Peers' configs (Gateway API, Istio, Emissary, Gloo, Skipper, Envoy) -> shadowlane config.

One module per format, each turning its documents into native routes and backends in a shared
`Translation`; `documents` reads files and directories and merges native config in; `source`
is what `run` and `check` load through (and what `--watch` fingerprints); `command` is
`shadowlane import`. Fields that cannot be translated are `Note`s naming object and path.
"""

from __future__ import annotations

from shadowlane.importers.command import add_arguments, add_services_arguments
from shadowlane.importers.command import main as import_main
from shadowlane.importers.documents import Loaded, translate_paths
from shadowlane.importers.eskip import EskipError, parse_routes
from shadowlane.importers.model import Note, Translation
from shadowlane.importers.render import render
from shadowlane.importers.services import ServiceMap, ServicesError
from shadowlane.importers.source import ConfigSource

__all__ = [
    "ConfigSource",
    "EskipError",
    "Loaded",
    "Note",
    "ServiceMap",
    "ServicesError",
    "Translation",
    "add_arguments",
    "add_services_arguments",
    "import_main",
    "parse_routes",
    "render",
    "translate_paths",
]
