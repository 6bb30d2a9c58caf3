"""Kubernetes Gateway API `HTTPRoute` and `GRPCRoute` (v1, v1beta1) -> routes.

What maps: `hostnames` (one route per host), `rules[].matches` (OR: one route each; path
Exact / PathPrefix / RegularExpression, method, headers and query params of type Exact),
`backendRefs` with weights (a weighted split), and `RequestMirror` filters (several per rule;
`percent` or `fraction`) as shadows. `RequestHeaderModifier` and `URLRewrite` become the
route's `headers`, `rewrite_path` and `host`: they change the request the primary is sent, and
the shadow copies start from it, as Envoy-based gateways mirror after those changes.

Peer semantics kept: a mirror goes to a single endpoint of its backendRef ("irrespective of
how many endpoints are present", says the spec), so a shadow backend gets the first endpoint
only; PathPrefix matches whole path segments, so it becomes a regex; routes are ordered by
Gateway API precedence (exact path, longest prefix, method, most headers, most query params),
not by file order, because shadowlane's first match wins.

A `GRPCRoute` is the same rules over gRPC: a `method` match (`service`, `method`, Exact or
RegularExpression) is a match on the path `/service/method`; its backends and mirrors are
spoken to over HTTP/2 (`protocol: h2c`) and the listener takes HTTP/2 (`listen_http2: true`),
as a gateway serving gRPC does. Its precedence is the spec's: longest service, then longest
method, then most headers.
"""

from __future__ import annotations

import re
from typing import Any

from shadowlane.importers.model import (
    Doc,
    Translation,
    as_dict,
    as_list,
    leftover,
    name_of,
    namespace_of,
    no_traffic,
    object_name,
    percent_of,
    route_data,
    route_headers,
    segment_prefix_match,
)
from shadowlane.importers.services import ServiceMap

KINDS = frozenset({"HTTPRoute", "GRPCRoute"})

_MATCH_KEYS = frozenset({"path", "method", "headers", "queryParams"})
_GRPC_MATCH_KEYS = frozenset({"method", "headers"})
_RULE_KEYS = frozenset({"name", "matches", "filters", "backendRefs"})
_SPEC_KEYS = frozenset({"parentRefs", "hostnames", "rules"})


def _ref_target(
    tr: Translation, services: ServiceMap, ref: dict[str, Any], ns: str, obj: str, path: str
) -> tuple[str, list[str], str] | None:
    kind = ref.get("kind", "Service")
    if kind != "Service" or ref.get("group", "") not in ("", "core"):
        tr.note(obj, f"{path}.kind", f"only Service references are translated, not {kind!r}")
        return None
    name = str(ref.get("name", ""))
    if not name:
        tr.note(obj, f"{path}.name", "missing")
        return None
    port = ref.get("port")
    namespace = str(ref.get("namespace", ns))
    resolved = services.service(name, namespace, int(port) if isinstance(port, int) else None)
    label = f"{name}.{namespace}" + (f"-{port}" if port is not None else "")
    return label, resolved.endpoints, resolved.how


def _headers_filter(
    tr: Translation, spec: dict[str, Any], obj: str, path: str, heads: dict[str, Any]
) -> None:
    """`set`, `add` and `remove` of a RequestHeaderModifier into the route's `headers`."""
    leftover(tr, obj, path, spec, {"set", "add", "remove"})
    for key in ("set", "add"):
        for i, item in enumerate(as_list(spec.get(key))):
            item = as_dict(item)
            if "name" in item:
                heads[key][str(item["name"]).lower()] = str(item.get("value", ""))
            else:
                tr.note(obj, f"{path}.{key}[{i}]", "header without a name")
    heads["remove"].extend(str(n).lower() for n in as_list(spec.get("remove")))


def _path_rewrite(
    tr: Translation, path_rw: tuple[str, str] | None, match: dict[str, Any], obj: str, path: str
) -> dict[str, str] | None:
    """URLRewrite's path for one match: `ReplaceFullPath`, or `ReplacePrefixMatch` of that
    match's PathPrefix, whole segments as the spec says (`/api` -> `/`: `/api/x` is `/x` and
    `/api` is `/`; -> `/v2`: `/api/x` is `/v2/x`)."""
    if path_rw is None:
        return None
    kind, value = path_rw
    if kind == "full":
        return {"regex": "^.*$", "replacement": value.replace("\\", "\\\\")}
    p = as_dict(match.get("path"))
    if p.get("type", "PathPrefix") != "PathPrefix":
        tr.note(obj, f"{path}.path", "ReplacePrefixMatch needs a PathPrefix match: not rewritten")
        return None
    base = re.escape(str(p.get("value", "/")).rstrip("/"))
    repl = value.rstrip("/").replace("\\", "\\\\")
    if not repl:
        return {"regex": f"^{base}/?", "replacement": "/"}
    return {"regex": f"^{base}", "replacement": repl}


def _precedence(match: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """Gateway API's order of rules: smaller sorts first."""
    path = as_dict(match.get("path"))
    ptype = path.get("type", "PathPrefix")
    value = str(path.get("value", "/"))
    exact = 0 if ptype == "Exact" else 1
    return (
        exact,
        -len(value),
        0 if match.get("method") else 1,
        -len(as_list(match.get("headers"))),
        -len(as_list(match.get("queryParams"))),
    )


def _match(tr: Translation, match: dict[str, Any], obj: str, path: str) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    leftover(tr, obj, path, match, _MATCH_KEYS)
    p = as_dict(match.get("path"))
    if p:
        ptype = p.get("type", "PathPrefix")
        value = str(p.get("value", "/"))
        if ptype == "Exact":
            out["path"] = value
        elif ptype == "PathPrefix":
            out.update(segment_prefix_match(value))
        elif ptype == "RegularExpression":
            # the spec leaves the regex dialect to the implementation; Envoy's is a full match
            out["path_regex"] = f"^(?:{value})$"
        else:
            tr.note(obj, f"{path}.path.type", f"unknown path match type {ptype!r}")
            return None
    if match.get("method"):
        out["methods"] = [str(match["method"]).upper()]
    for key, native in (("headers", "headers"), ("queryParams", "query")):
        exact: dict[str, str] = {}
        for i, h in enumerate(as_list(match.get(key))):
            h = as_dict(h)
            if h.get("type", "Exact") != "Exact":
                tr.note(
                    obj,
                    f"{path}.{key}[{i}].type",
                    f"{h.get('type')} is not translated (exact matches only); the route "
                    "matches without this condition",
                )
                continue
            name = str(h.get("name", ""))
            exact[name.lower() if key == "headers" else name] = str(h.get("value", ""))
        if exact:
            out[native] = exact
    return out


def _grpc_precedence(match: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """GRPCRoute's order of rules: the longest service, then method, then most headers."""
    method = as_dict(match.get("method"))
    return (
        -len(str(method.get("service", ""))),
        -len(str(method.get("method", ""))),
        -len(as_list(match.get("headers"))),
        0,
        0,
    )


def _grpc_match(
    tr: Translation, match: dict[str, Any], obj: str, path: str
) -> dict[str, Any] | None:
    """A GRPCRoute match: the call's path is `/service/method`; headers as for HTTPRoute."""
    leftover(tr, obj, path, match, _GRPC_MATCH_KEYS)
    method = as_dict(match.get("method"))
    leftover(tr, obj, f"{path}.method", method, {"type", "service", "method"})
    service = str(method.get("service", ""))
    name = str(method.get("method", ""))
    mtype = method.get("type", "Exact")
    out: dict[str, Any] = {}
    if mtype == "Exact":
        if service and name:
            out["path"] = f"/{service}/{name}"
        elif service or name:
            part = "[^/]+"
            out["path_regex"] = (
                f"^/{re.escape(service) if service else part}/{re.escape(name) if name else part}$"
            )
    elif mtype == "RegularExpression":
        out["path_regex"] = f"^/(?:{service or '[^/]+'})/(?:{name or '[^/]+'})$"
    else:
        tr.note(obj, f"{path}.method.type", f"unknown method match type {mtype!r}")
        return None
    headers = _match(tr, {"headers": match.get("headers")}, obj, path)
    if headers:
        out.update(headers)
    return out


def _translate_route(
    tr: Translation, services: ServiceMap, doc: Doc, drafts: list[tuple[Any, dict[str, Any]]]
) -> None:
    obj = object_name(doc)
    ns = namespace_of(doc)
    spec = as_dict(doc.get("spec"))
    grpc = doc.get("kind") == "GRPCRoute"
    #: gRPC is HTTP/2 end to end: the listener takes it, backends and mirrors speak it
    extra: dict[str, Any] = {"protocol": "h2c"} if grpc else {}
    if grpc:
        tr.settings["listen_http2"] = True
    leftover(tr, obj, "spec", spec, _SPEC_KEYS)
    hosts: list[str | None] = [str(h) for h in as_list(spec.get("hostnames"))] or [None]
    for r, rule in enumerate(as_list(spec.get("rules"))):
        rule = as_dict(rule)
        rpath = f"spec.rules[{r}]"
        leftover(tr, obj, rpath, rule, _RULE_KEYS)
        legs: list[dict[str, Any]] = []
        for b, ref in enumerate(as_list(rule.get("backendRefs"))):
            ref = as_dict(ref)
            bpath = f"{rpath}.backendRefs[{b}]"
            leftover(tr, obj, bpath, ref, {"name", "namespace", "port", "weight", "kind", "group"})
            got = _ref_target(tr, services, ref, ns, obj, bpath)
            if got is None:
                continue
            label, endpoints, how = got
            name = tr.backend(label, endpoints, f"{obj} {bpath} ({how})", **extra)
            legs.append({"backend": name, "weight": int(ref.get("weight", 1))})
        if no_traffic(tr, obj, f"{rpath}.backendRefs", legs):
            continue
        shadows: list[dict[str, Any]] = []
        comments: list[str] = []
        #: the route's changes to the forwarded request (the mirror copies start from it)
        heads: dict[str, Any] = {"set": {}, "add": {}, "remove": []}
        path_rw: tuple[str, str] | None = None
        host: str | None = None
        for f, flt in enumerate(as_list(rule.get("filters"))):
            flt = as_dict(flt)
            fpath = f"{rpath}.filters[{f}]"
            ftype = flt.get("type")
            if ftype == "RequestMirror":
                mirror = as_dict(flt.get("requestMirror"))
                got = _ref_target(
                    tr,
                    services,
                    as_dict(mirror.get("backendRef")),
                    ns,
                    obj,
                    f"{fpath}.requestMirror.backendRef",
                )
                if got is None:
                    continue
                label, endpoints, how = got
                if len(endpoints) > 1:
                    comments.append(
                        f"Gateway API mirrors to a single endpoint of {label}: "
                        f"{endpoints[0]} of {len(endpoints)}"
                    )
                origin = f"{obj} {fpath} ({how})"
                name = tr.backend(f"{label}-mirror", endpoints[:1], origin, **extra)
                if "fraction" in mirror:
                    frac = as_dict(mirror["fraction"])
                    percent = percent_of(frac.get("numerator", 0), frac.get("denominator", 100))
                else:
                    percent = percent_of(mirror.get("percent", 100))
                shadows.append({"backend": name, "percent": percent})
            elif ftype == "RequestHeaderModifier":
                _headers_filter(
                    tr,
                    as_dict(flt.get("requestHeaderModifier")),
                    obj,
                    f"{fpath}.requestHeaderModifier",
                    heads,
                )
            elif ftype == "URLRewrite" and not grpc:
                rw = as_dict(flt.get("urlRewrite"))
                leftover(tr, obj, f"{fpath}.urlRewrite", rw, {"hostname", "path"})
                if rw.get("hostname"):
                    host = str(rw["hostname"])
                p = as_dict(rw.get("path"))
                if p.get("type") == "ReplaceFullPath":
                    path_rw = ("full", str(p.get("replaceFullPath", "/")))
                elif p.get("type") == "ReplacePrefixMatch":
                    path_rw = ("prefix", str(p.get("replacePrefixMatch", "/")))
                elif p:
                    tr.note(obj, f"{fpath}.urlRewrite.path.type", f"unknown type {p.get('type')!r}")
            else:
                tr.unsupported(obj, f"{fpath}", f"filter type {ftype!r} is not translated")
        mutations: dict[str, Any] = {}
        if host is not None:
            mutations["host"] = host
        route_headers(tr, obj, f"{rpath}.filters", heads, mutations)
        if shadows:
            comments.append(
                "Envoy-based gateways append -shadow to the mirror's Host: kept (host_suffix)"
            )
        matches = [as_dict(m) for m in as_list(rule.get("matches"))] or [{}]
        for m, match in enumerate(matches):
            mpath = f"{rpath}.matches[{m}]"
            native = _grpc_match(tr, match, obj, mpath) if grpc else _match(tr, match, obj, mpath)
            if native is None:
                continue
            rewrite = _path_rewrite(tr, path_rw, match, obj, f"{rpath}.matches[{m}]")
            for hostname in hosts:
                host = hostname if hostname is not None and hostname != "*" else None
                data = route_data(native, host, legs, mutations, rewrite, shadows)
                rule_name = rule.get("name") or f"r{r}"
                label = f"{name_of(doc)}.{ns}.{rule_name}" + (f".m{m}" if len(matches) > 1 else "")
                data["name"] = label
                drafts.append(
                    (
                        _grpc_precedence(match) if grpc else _precedence(match),
                        {
                            "data": data,
                            "comments": [
                                f"from {obj} {rpath}" + (f".matches[{m}]" if match else ""),
                                *comments,
                            ],
                        },
                    )
                )


def translate(docs: list[Doc], tr: Translation, services: ServiceMap) -> None:
    drafts: list[tuple[Any, dict[str, Any]]] = []
    for doc in docs:
        _translate_route(tr, services, doc, drafts)
    # stable: equal precedence keeps document order, as the spec's tie-breaks nearly do
    drafts.sort(key=lambda d: d[0])
    for _, draft in drafts:
        data = draft["data"]
        data["name"] = tr.route_name(data["name"])
        tr.add_route(data, draft["comments"])
