"""Routing: predicates (host, path, path_prefix, path_regex, methods, headers, query) and the
route table. First match wins, in config order; weighted legs use smooth weighted round robin.

The public surface is re-exported here; the modules behind it are private to this package.
"""

from shadowlane.routing.backends import build_backend, build_shadow_backend
from shadowlane.routing.balance import SmoothWeighted
from shadowlane.routing.predicates import Predicate, compile_match, compile_predicates
from shadowlane.routing.table import Route, RouteTable

__all__ = [
    "Predicate",
    "Route",
    "RouteTable",
    "SmoothWeighted",
    "build_backend",
    "build_shadow_backend",
    "compile_match",
    "compile_predicates",
]
