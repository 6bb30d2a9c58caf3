"""Skipper eskip routes and `RouteGroup`s (zalando.org/v1) -> routes.

Predicates: `Path`, `PathSubtree`, `PathRegexp`, `Method(s)`, `Header`, `Host` (a literal name
written as a regex), `QueryParam` (with a literal `^value$`), `Traffic`, `Weight`, `True`,
`Tee`. Filters: `teeLoopback`, `tee`/`teenf`, `setRequestHeader`, `appendRequestHeader`,
`dropRequestHeader`, `modPath`, `setPath`.

The teeLoopback pattern: route A applies `teeLoopback("g")`; route B matches `Tee("g")` and
sends the clone elsewhere. Skipper re-enters its routing with the clone, so B's backend and
B's filters are what the copy gets. That becomes one route (A) with a shadow to B's backend,
carrying B's header and path filters, and B is not a route of its own (`Weight`/`True` on B
only kept it from colliding with A, which no longer matters). The copy keeps Skipper's marker
`x-tee-loopback-key: g`, and no `-shadow` is appended to its Host (Skipper appends none).

`Traffic(p)` routes that share their other predicates are one route: their backends are a
weighted split, in Skipper's order (each Traffic route takes p of what the ones before it left),
and a `teeLoopback` on a Traffic route shadows that route's share of the requests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from shadowlane.importers.eskip import Call, EskipError, EskipRoute, parse_call
from shadowlane.importers.model import (
    Doc,
    Translation,
    as_dict,
    as_list,
    leftover,
    name_of,
    namespace_of,
    object_name,
    segment_prefix_match,
)
from shadowlane.importers.services import ServiceMap

KINDS = frozenset({"RouteGroup"})
GROUP = "zalando.org"

#: the header Skipper's teeLoopback puts on the clone (Tee() matches it)
LOOPBACK_HEADER = "x-tee-loopback-key"


@dataclass
class _Route:
    obj: str
    path: str
    name: str
    order: int
    match: dict[str, Any] = field(default_factory=dict)
    legs: list[dict[str, Any]] = field(default_factory=list)
    tee_key: str | None = None
    traffic: float | None = None
    weight: int = 0
    loopbacks: list[str] = field(default_factory=list)
    tees: list[dict[str, Any]] = field(default_factory=list)
    set_headers: dict[str, str] = field(default_factory=dict)
    drop_headers: list[str] = field(default_factory=list)
    rewrite: dict[str, str] | None = None
    predicates: int = 0


_PATH_PARAM = re.compile(r":[A-Za-z0-9_]+|\*\*?[A-Za-z0-9_]*")


def _path_wildcards(path: str) -> str | None:
    """`/users/:id/**` -> a regex; None when the path has no wildcards."""
    if not _PATH_PARAM.search(path):
        return None
    out, last = "^", 0
    for m in _PATH_PARAM.finditer(path):
        out += re.escape(path[last : m.start()])
        out += ".*" if m.group().startswith("*") else "[^/]+"
        last = m.end()
    return out + re.escape(path[last:]) + "$"


_LITERAL_HOST = re.compile(r"\^?((?:[A-Za-z0-9-]|\\\.|\[\.\])+)(?:\(:\[?0-9\]?\+\)\?)?\$?")


def _literal_host(regex: str) -> str | None:
    m = _LITERAL_HOST.fullmatch(regex)
    if m is None or not regex.startswith("^") or not regex.endswith("$"):
        return None
    return m.group(1).replace("\\.", ".").replace("[.]", ".").lower()


def _literal_value(regex: str) -> str | None:
    if (
        regex.startswith("^")
        and regex.endswith("$")
        and not re.search(r"[.*+?()\[\]{}|\\]", regex[1:-1])
    ):
        return regex[1:-1]
    return None


def _str(call: Call, i: int) -> str:
    arg = call.args[i] if i < len(call.args) else ""
    return arg if isinstance(arg, str) else f"{arg:g}"


def _predicate(tr: Translation, route: _Route, call: Call, path: str) -> None:
    m = route.match
    name = call.name
    route.predicates += 1
    if name == "Path":
        p = _str(call, 0)
        wild = _path_wildcards(p)
        if wild is not None:
            m["path_regex"] = wild
        else:
            m["path"] = p
    elif name == "PathSubtree":
        m.update(segment_prefix_match(_str(call, 0)))
    elif name == "PathRegexp":
        if "path_regex" in m:
            tr.note(route.obj, path, "a second path regex is not translated (one per route)")
        else:
            m["path_regex"] = _str(call, 0)
    elif name in ("Method", "Methods"):
        m["methods"] = [_str(call, i).upper() for i in range(len(call.args))]
    elif name == "Header" and len(call.args) == 2:
        m.setdefault("headers", {})[_str(call, 0).lower()] = _str(call, 1)
    elif name == "Host":
        host = _literal_host(_str(call, 0))
        if host is None:
            tr.note(route.obj, path, f"{call}: only a literal host (^name$) is translated")
        else:
            m["host"] = host
    elif name == "QueryParam" and len(call.args) == 2 and _literal_value(_str(call, 1)):
        m.setdefault("query", {})[_str(call, 0)] = _literal_value(_str(call, 1))
    elif name == "Traffic":
        route.predicates -= 1
        if len(call.args) > 1:
            tr.note(route.obj, path, f"{call}: cookie stickiness is not translated")
        arg = call.args[0] if call.args else 1.0
        route.traffic = float(arg) if not isinstance(arg, str) else 1.0
    elif name == "Weight":
        route.predicates -= 1
        arg = call.args[0] if call.args else 0
        route.weight += int(arg) if not isinstance(arg, str) else 0
    elif name == "True":
        route.predicates -= 1
        route.weight += 1
    elif name == "Tee":
        route.predicates -= 1
        route.tee_key = _str(call, 0)
    else:
        tr.note(
            route.obj, path, f"predicate {call} is not translated; the route matches without it"
        )


def _filter(tr: Translation, route: _Route, call: Call, path: str, services: ServiceMap) -> None:
    name = call.name
    if name == "teeLoopback":
        route.loopbacks.append(_str(call, 0))
    elif name in ("tee", "teenf"):
        url = _str(call, 0)
        resolved = services.url(url)
        backend = tr.backend(
            re.sub(r"^https?://", "", url),
            resolved.endpoints,
            f"{route.obj} {path} ({resolved.how})",
        )
        shadow: dict[str, Any] = {
            "backend": backend,
            "percent": 100.0,
            "host_suffix": "",
            "host": re.sub(r"^https?://", "", url).partition("/")[0],
        }
        if len(call.args) >= 3:
            shadow["rewrite_path"] = {
                "regex": _str(call, 1),
                "replacement": _go_repl(_str(call, 2)),
            }
        route.tees.append(shadow)
    elif name in ("setRequestHeader", "appendRequestHeader"):
        route.set_headers[_str(call, 0).lower()] = _str(call, 1)
    elif name == "dropRequestHeader":
        route.drop_headers.append(_str(call, 0).lower())
    elif name == "modPath":
        route.rewrite = {"regex": _str(call, 0), "replacement": _go_repl(_str(call, 1))}
    elif name == "setPath":
        route.rewrite = {"regex": "^.*$", "replacement": _str(call, 0)}
    else:
        tr.note(route.obj, path, f"filter {call} is not translated")


def _go_repl(text: str) -> str:
    """Go's `$1`/`${1}` group references -> Python's `\\1`."""
    return re.sub(r"\$\{?(\d+)\}?", r"\\\1", text.replace("\\", "\\\\"))


def _network(tr: Translation, services: ServiceMap, urls: list[str], obj: str, path: str) -> str:
    endpoints: list[str] = []
    hows: list[str] = []
    for url in urls:
        resolved = services.url(url)
        endpoints.extend(resolved.endpoints)
        hows.append(resolved.how)
    label = re.sub(r"^https?://", "", urls[0]) if len(urls) == 1 else f"{obj.split()[-1]}-lb"
    return tr.backend(label, endpoints, f"{obj} {path} ({', '.join(sorted(set(hows)))})")


def routes_from_eskip(
    tr: Translation, services: ServiceMap, routes: list[EskipRoute], source: str, start: int
) -> list[_Route]:
    out: list[_Route] = []
    for n, er in enumerate(routes):
        r = _Route(obj=f"eskip {source} route {er.id}", path="", name=er.id, order=start + n)
        for i, call in enumerate(er.predicates):
            _predicate(tr, r, call, f"predicates[{i}]")
        for i, call in enumerate(er.filters):
            _filter(tr, r, call, f"filters[{i}]", services)
        kind = er.backend[0]
        if kind == "network":
            r.legs = [
                {"backend": _network(tr, services, [er.backend[1]], r.obj, "backend"), "weight": 1}
            ]
        elif kind == "lb":
            r.legs = [
                {
                    "backend": _network(tr, services, list(er.backend[2:]), r.obj, "backend"),
                    "weight": 1,
                }
            ]
        else:
            tr.note(r.obj, "backend", f"<{kind}> backends are not translated: route skipped")
            continue
        out.append(r)
    return out


def routes_from_group(tr: Translation, services: ServiceMap, doc: Doc, start: int) -> list[_Route]:
    obj = object_name(doc)
    ns = namespace_of(doc)
    spec = as_dict(doc.get("spec"))
    leftover(tr, obj, "spec", spec, {"hosts", "backends", "defaultBackends", "routes"})
    named: dict[str, str] = {}
    for b, backend in enumerate(as_list(spec.get("backends"))):
        backend = as_dict(backend)
        bpath = f"spec.backends[{b}]"
        kind = backend.get("type")
        bname = str(backend.get("name", f"b{b}"))
        if kind == "service":
            port = backend.get("servicePort")
            resolved = services.service(
                str(backend.get("serviceName", bname)),
                ns,
                int(port) if isinstance(port, int) else None,
            )
            named[bname] = tr.backend(
                f"{backend.get('serviceName', bname)}.{ns}" + (f"-{port}" if port else ""),
                resolved.endpoints,
                f"{obj} {bpath} ({resolved.how})",
            )
        elif kind == "network":
            named[bname] = _network(tr, services, [str(backend.get("address", ""))], obj, bpath)
        elif kind == "lb":
            named[bname] = _network(
                tr, services, [str(e) for e in as_list(backend.get("endpoints"))], obj, bpath
            )
        else:
            tr.note(obj, f"{bpath}.type", f"{kind!r} backends are not translated")
    hosts = [str(h).lower() for h in as_list(spec.get("hosts"))]
    if len(hosts) > 1:
        tr.note(obj, "spec.hosts", f"only the first host ({hosts[0]}) is matched")

    def legs(refs: list[Any], path: str) -> list[dict[str, Any]]:
        out = []
        for i, ref in enumerate(refs):
            ref = as_dict(ref)
            target = named.get(str(ref.get("backendName")))
            if target is None:
                tr.note(obj, f"{path}[{i}].backendName", "not a translated backend")
                continue
            out.append({"backend": target, "weight": int(ref.get("weight", 1))})
        return out

    defaults = legs(as_list(spec.get("defaultBackends")), "spec.defaultBackends")
    out: list[_Route] = []
    routes = as_list(spec.get("routes")) or [{}]
    for i, route in enumerate(routes):
        route = as_dict(route)
        rpath = f"spec.routes[{i}]"
        leftover(
            tr,
            obj,
            rpath,
            route,
            {"path", "pathSubtree", "pathRegexp", "methods", "predicates", "filters", "backends"},
        )
        r = _Route(obj=obj, path=rpath, name=f"{name_of(doc)}.{ns}.r{i}", order=start + i)
        if hosts:
            r.match["host"] = hosts[0]
        if "path" in route:
            _predicate(tr, r, Call("Path", (str(route["path"]),)), f"{rpath}.path")
        if "pathSubtree" in route:
            _predicate(
                tr, r, Call("PathSubtree", (str(route["pathSubtree"]),)), f"{rpath}.pathSubtree"
            )
        if "pathRegexp" in route:
            _predicate(
                tr, r, Call("PathRegexp", (str(route["pathRegexp"]),)), f"{rpath}.pathRegexp"
            )
        if route.get("methods"):
            r.match["methods"] = [str(m).upper() for m in as_list(route["methods"])]
            r.predicates += 1
        for key, handle in (("predicates", _predicate), ("filters", None)):
            for j, text in enumerate(as_list(route.get(key))):
                path = f"{rpath}.{key}[{j}]"
                try:
                    call = parse_call(str(text))
                except EskipError as err:
                    tr.note(obj, path, f"not eskip: {err}")
                    continue
                if handle is not None:
                    handle(tr, r, call, path)
                else:
                    _filter(tr, r, call, path, services)
        r.legs = (
            legs(as_list(route["backends"]), f"{rpath}.backends")
            if "backends" in route
            else [dict(leg) for leg in defaults]
        )
        if not r.legs:
            tr.note(obj, rpath, "no backend: route not translated")
            continue
        out.append(r)
    return out


def _match_key(match: dict[str, Any]) -> str:
    return repr(sorted((k, repr(v)) for k, v in match.items()))


def _shadow_match(tr: Translation, a: _Route, b: _Route) -> dict[str, Any] | None:
    """B's conditions beyond A's, as a shadow match; None when B cannot match A's requests."""
    extra: dict[str, Any] = {}
    for key, value in b.match.items():
        if a.match.get(key) == value:
            continue
        if key in ("methods", "path_prefix", "headers") and key not in a.match:
            extra[key] = value
        else:
            tr.note(
                b.obj,
                b.path or "predicates",
                f"the Tee route's {key} differs from {a.obj}'s; its copies follow {a.obj}'s match",
            )
    return extra


def finish(tr: Translation, routes: list[_Route]) -> None:
    tee_routes: dict[str, list[_Route]] = {}
    plain: list[_Route] = []
    for r in routes:
        (tee_routes.setdefault(r.tee_key, []) if r.tee_key is not None else plain).append(r)
    used: set[str] = set()
    groups: dict[str, list[_Route]] = {}
    for r in plain:
        groups.setdefault(_match_key(r.match), []).append(r)
    # Skipper tries the routes with more predicates (and Weight) first
    ordered = sorted(
        groups.values(), key=lambda g: (-max(x.predicates + x.weight for x in g), g[0].order)
    )
    for group in ordered:
        group.sort(key=lambda x: (-(x.weight + x.predicates), x.traffic is None, x.order))
        first = group[0]
        comments = [
            "from " + ", ".join(f"{x.obj}" + (f" {x.path}" if x.path else "") for x in group)
        ]
        shares: list[float] = []
        left = 1.0
        for x in group:
            share = left * (x.traffic if x.traffic is not None else 1.0)
            shares.append(share)
            left -= share
        if len(group) == 1 and first.traffic is not None and first.traffic < 1:
            tr.note(
                first.obj,
                first.path or "predicates",
                f"Traffic({first.traffic:g}) with no other route for the rest: the rest "
                "would find no route in Skipper; here every request takes this route",
            )
            shares = [1.0]
        weights: dict[str, float] = {}
        for x, share in zip(group, shares, strict=True):
            total = sum(leg["weight"] for leg in x.legs) or 1
            for leg in x.legs:
                weights[leg["backend"]] = (
                    weights.get(leg["backend"], 0.0) + share * leg["weight"] / total
                )
            if x.set_headers or x.drop_headers or x.rewrite:
                tr.note(
                    x.obj,
                    x.path or "filters",
                    "header and path filters on a primary route apply to its tee copies "
                    "only; shadowlane forwards the primary request unchanged",
                )
        data: dict[str, Any] = {"name": tr.route_name(first.name), "match": dict(first.match)}
        legs = [
            {"backend": b, "weight": round(w * 1000)}
            for b, w in weights.items()
            if round(w * 1000) > 0
        ]
        if len(legs) == 1:
            data["backend"] = legs[0]["backend"]
        else:
            data["backends"] = legs
        shadows: list[dict[str, Any]] = []
        loop_share: dict[str, float] = {}
        for x, share in zip(group, shares, strict=True):
            for g in x.loopbacks:
                loop_share[g] = loop_share.get(g, 0.0) + share
            for tee in x.tees:
                if not any(s["backend"] == tee["backend"] for s in shadows):
                    shadows.append({**tee, "percent": round(share * 100, 4)})
                    comments.append(
                        f"tee to {tee['host']}: Skipper's tee sets the Host to the "
                        "target's and appends no -shadow (kept)"
                    )
        for g, share in loop_share.items():
            targets = tee_routes.get(g, [])
            if not targets:
                tr.note(
                    first.obj,
                    first.path or "filters",
                    f"teeLoopback({g!r}) has no Tee({g!r}) route: nothing to shadow to",
                )
                continue
            used.add(g)
            for b in targets:
                if len(b.legs) > 1:
                    tr.note(
                        b.obj,
                        b.path or "backend",
                        "a Tee route with several backends: the first is the shadow",
                    )
                backend = b.legs[0]["backend"]
                if any(s["backend"] == backend for s in shadows):
                    continue
                shadow: dict[str, Any] = {
                    "backend": backend,
                    "percent": round(share * 100, 4),
                    "host_suffix": "",
                    "headers": {
                        "set": {LOOPBACK_HEADER: g, **b.set_headers},
                        "remove": list(b.drop_headers),
                    },
                }
                if b.rewrite is not None:
                    shadow["rewrite_path"] = dict(b.rewrite)
                extra = _shadow_match(tr, first, b)
                if extra:
                    shadow["match"] = extra
                shadows.append(shadow)
                comments.append(
                    f"teeLoopback({g!r}) + {b.obj}"
                    + (f" {b.path}" if b.path else "")
                    + f" [Tee({g!r})]: one route with a shadow; the copy carries "
                    f"{LOOPBACK_HEADER}: {g} and no -shadow Host suffix, as in Skipper"
                )
        if shadows:
            data["shadows"] = shadows
        tr.add_route(data, comments)
    for g, targets in tee_routes.items():
        if g not in used:
            for b in targets:
                tr.note(
                    b.obj,
                    b.path or "predicates",
                    f"Tee({g!r}) route with no teeLoopback({g!r}) route: not translated",
                )
