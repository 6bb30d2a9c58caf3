"""Istio `VirtualService` (networking.istio.io v1alpha3, v1beta1, v1) -> routes.

What maps: `hosts` (one route per host, `*` is any), `http[]` in order (Istio's first match
wins, as ours), `match[]` (OR: one route each; `uri` exact/prefix/regex, `method` exact,
`headers` and `queryParams` exact, `authority` exact as the host), weighted `route[]`,
`mirror` with `mirrorPercentage` (or the old integer `mirror_percent`/`mirrorPercent`), and
`mirrors[]` with their own `percentage`. `headers.request` and `rewrite` (`uri`,
`uriRegexRewrite`, `authority`) become the route's `headers`, `rewrite_path` and `host`: the
primary is sent the changed request and the mirror copies start from it, as Envoy mirrors after
the route's changes.

Peer semantics kept: Istio compiles a mirror into an Envoy mirror policy, so the copy's Host
gets `-shadow` appended (shadowlane's default `host_suffix`). A destination's `subset` is a
DestinationRule's label selector that shadowlane cannot see: the `--services` map is asked for
`host-subset` first, then the plain host.
"""

from __future__ import annotations

from typing import Any

from shadowlane.importers.model import (
    Doc,
    Translation,
    as_dict,
    as_list,
    leftover,
    name_of,
    namespace_of,
    object_name,
    percent_of,
    prefix_rewrite,
    regex_rewrite,
    route_data,
    route_headers,
)
from shadowlane.importers.services import ServiceMap, split_service

KINDS = frozenset({"VirtualService"})
GROUP = "networking.istio.io"

_HTTP_KEYS = frozenset(
    {
        "name",
        "match",
        "route",
        "mirror",
        "mirrorPercentage",
        "mirror_percent",
        "mirrorPercent",
        "mirrors",
        "headers",
        "rewrite",
    }
)
_MATCH_KEYS = frozenset({"name", "uri", "method", "headers", "queryParams", "authority"})


def _destination(
    tr: Translation,
    services: ServiceMap,
    dest: dict[str, Any],
    ns: str,
    obj: str,
    path: str,
    suffix: str = "",
) -> str | None:
    host = str(dest.get("host", ""))
    if not host:
        tr.note(obj, f"{path}.host", "missing")
        return None
    leftover(tr, obj, path, dest, {"host", "subset", "port"})
    port_spec = as_dict(dest.get("port"))
    port = port_spec.get("number")
    port = int(port) if isinstance(port, int) else None
    name, namespace = split_service(host, ns)
    subset = dest.get("subset")
    label = f"{name}.{namespace}"
    resolved = None
    if subset:
        found = services.lookup(f"{name}-{subset}", namespace, port)
        if found is not None:
            resolved = found
            how = f"--services {services.source} ({name}-{subset})"
            label = f"{name}-{subset}.{namespace}"
        else:
            tr.note(
                obj,
                f"{path}.subset",
                f"subset {subset!r} is a DestinationRule selector; no --services entry for "
                f"{name}-{subset}, so the whole service is used",
            )
    if resolved is None:
        got = services.service(name, namespace, port)
        resolved, how = got.endpoints, got.how
    if port is not None:
        label += f"-{port}"
    return tr.backend(label + suffix, resolved, f"{obj} {path} ({how})")


def _string_match(
    tr: Translation, value: object, obj: str, path: str, allowed: tuple[str, ...]
) -> tuple[str, str] | None:
    spec = as_dict(value)
    for kind in allowed:
        if kind in spec:
            return kind, str(spec[kind])
    tr.note(obj, path, f"only {' / '.join(allowed)} matches are translated; condition dropped")
    return None


def _match(tr: Translation, match: dict[str, Any], obj: str, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    leftover(tr, obj, path, match, _MATCH_KEYS)
    if "uri" in match:
        got = _string_match(tr, match["uri"], obj, f"{path}.uri", ("exact", "prefix", "regex"))
        if got is not None:
            kind, value = got
            # Envoy's safe_regex is a full match
            key = {"exact": "path", "prefix": "path_prefix", "regex": "path_regex"}[kind]
            out[key] = f"^(?:{value})$" if kind == "regex" else value
    if "method" in match:
        got = _string_match(tr, match["method"], obj, f"{path}.method", ("exact",))
        if got is not None:
            out["methods"] = [got[1].upper()]
    if "authority" in match:
        got = _string_match(tr, match["authority"], obj, f"{path}.authority", ("exact",))
        if got is not None:
            out["host"] = got[1].partition(":")[0]
    for key, native in (("headers", "headers"), ("queryParams", "query")):
        exact: dict[str, str] = {}
        for name, spec in as_dict(match.get(key)).items():
            got = _string_match(tr, spec, obj, f"{path}.{key}.{name}", ("exact",))
            if got is not None:
                exact[str(name).lower() if key == "headers" else str(name)] = got[1]
        if exact:
            out[native] = exact
    return out


def _route_changes(tr: Translation, http: dict[str, Any], obj: str, path: str) -> dict[str, Any]:
    """`headers.request` and `rewrite.authority` as the route's `headers` and `host`: they
    change the request the primary is sent, and the mirror copies start from it (Envoy mirrors
    after the route's changes)."""
    headers = as_dict(http.get("headers"))
    leftover(tr, obj, f"{path}.headers", headers, {"request", "response"})
    request = as_dict(headers.get("request"))
    if headers.get("response"):
        tr.unsupported(obj, f"{path}.headers.response")
    leftover(tr, obj, f"{path}.headers.request", request, {"set", "add", "remove"})
    heads: dict[str, Any] = {
        "set": {str(k).lower(): str(v) for k, v in as_dict(request.get("set")).items()},
        "add": {str(k).lower(): str(v) for k, v in as_dict(request.get("add")).items()},
        "remove": [str(n).lower() for n in as_list(request.get("remove"))],
    }
    out: dict[str, Any] = {}
    route_headers(tr, obj, f"{path}.headers.request", heads, out)
    rewrite = as_dict(http.get("rewrite"))
    leftover(tr, obj, f"{path}.rewrite", rewrite, {"uri", "authority", "uriRegexRewrite"})
    if rewrite.get("authority"):
        out["host"] = str(rewrite["authority"])
    return out


def _uri_rewrite(
    tr: Translation, http: dict[str, Any], native: dict[str, Any], obj: str, path: str
) -> dict[str, str] | None:
    """`rewrite.uri` replaces what the match matched: the prefix of a prefix match, the whole
    path of an exact or regex one (Envoy's `prefix_rewrite`), and the leading `/` when there
    is no uri match (Envoy's route prefix is then `/`); `uriRegexRewrite` is a regex rewrite."""
    rewrite = as_dict(http.get("rewrite"))
    regex = as_dict(rewrite.get("uriRegexRewrite"))
    if "uri" in rewrite and regex:
        tr.note(obj, f"{path}.rewrite.uriRegexRewrite", "given with uri: uri is used")
    if "uri" in rewrite:
        return prefix_rewrite(native, str(rewrite["uri"]))
    if regex:
        leftover(tr, obj, f"{path}.rewrite.uriRegexRewrite", regex, {"match", "rewrite"})
        return regex_rewrite(
            tr,
            obj,
            f"{path}.rewrite.uriRegexRewrite",
            str(regex.get("match", "")),
            str(regex.get("rewrite", "")),
        )
    return None


def _translate(tr: Translation, services: ServiceMap, doc: Doc) -> None:
    obj = object_name(doc)
    ns = namespace_of(doc)
    spec = as_dict(doc.get("spec"))
    leftover(tr, obj, "spec", spec, {"hosts", "gateways", "http", "exportTo", "tcp", "tls"})
    for key in ("tcp", "tls"):
        if key in spec:
            tr.unsupported(obj, f"spec.{key}", "TCP/TLS routes are not translated")
    hosts = [str(h) for h in as_list(spec.get("hosts"))] or ["*"]
    for h, http in enumerate(as_list(spec.get("http"))):
        http = as_dict(http)
        path = f"spec.http[{h}]"
        leftover(tr, obj, path, http, _HTTP_KEYS)
        legs: list[dict[str, Any]] = []
        for r, route in enumerate(as_list(http.get("route"))):
            route = as_dict(route)
            rpath = f"{path}.route[{r}]"
            leftover(tr, obj, rpath, route, {"destination", "weight", "headers"})
            if "headers" in route:
                tr.unsupported(obj, f"{rpath}.headers")
            name = _destination(
                tr, services, as_dict(route.get("destination")), ns, obj, f"{rpath}.destination"
            )
            if name is not None:
                weight = route.get("weight")
                legs.append({"backend": name, "weight": int(weight) if weight is not None else 0})
        if not legs:
            tr.note(obj, f"{path}.route", "no destination: rule not translated")
            continue
        if len(legs) == 1 or all(leg["weight"] == 0 for leg in legs):
            if len(legs) > 1:
                tr.note(obj, f"{path}.route", "no weights given: split evenly")
            for leg in legs:
                leg["weight"] = leg["weight"] or 100 // len(legs)
        shadows: list[dict[str, Any]] = []
        if "mirror" in http:
            name = _destination(
                tr, services, as_dict(http["mirror"]), ns, obj, f"{path}.mirror", "-mirror"
            )
            if name is not None:
                if "mirrorPercentage" in http:
                    percent = percent_of(as_dict(http["mirrorPercentage"]).get("value", 100))
                elif "mirror_percent" in http or "mirrorPercent" in http:
                    percent = percent_of(http.get("mirror_percent", http.get("mirrorPercent")))
                else:
                    percent = 100.0
                shadows.append({"backend": name, "percent": percent})
        for m, mirror in enumerate(as_list(http.get("mirrors"))):
            mirror = as_dict(mirror)
            mpath = f"{path}.mirrors[{m}]"
            leftover(tr, obj, mpath, mirror, {"destination", "percentage"})
            name = _destination(
                tr,
                services,
                as_dict(mirror.get("destination")),
                ns,
                obj,
                f"{mpath}.destination",
                "-mirror",
            )
            if name is None:
                continue
            if any(s["backend"] == name for s in shadows):
                tr.note(obj, mpath, f"{name} is mirrored twice: kept once")
                continue
            pct = mirror.get("percentage")
            percent = percent_of(as_dict(pct).get("value", 100)) if pct is not None else 100.0
            shadows.append({"backend": name, "percent": percent})
        changes = _route_changes(tr, http, obj, path)
        matches = [as_dict(m) for m in as_list(http.get("match"))] or [{}]
        for m, match in enumerate(matches):
            native = _match(tr, match, obj, f"{path}.match[{m}]")
            # the rule's notes once, though each match gets its own rewrite
            uri_rewrite = _uri_rewrite(tr if m == 0 else Translation(), http, native, obj, path)
            for host in hosts:
                # a match's own authority wins over the VirtualService's hosts
                only = host.lower() if host != "*" and "host" not in native else None
                data = route_data(native, only, legs, changes, uri_rewrite, shadows)
                label = http.get("name") or f"http{h}"
                data["name"] = tr.route_name(
                    f"{name_of(doc)}.{ns}.{label}" + (f".m{m}" if len(matches) > 1 else "")
                )
                comments = [f"from {obj} {path}" + (f".match[{m}]" if match else "")]
                if shadows:
                    comments.append("Istio mirrors with -shadow appended to the Host: kept")
                tr.add_route(data, comments)


def translate(docs: list[Doc], tr: Translation, services: ServiceMap) -> None:
    for doc in docs:
        _translate(tr, services, doc)
