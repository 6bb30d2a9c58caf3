"""Gloo Edge `VirtualService` (gateway.solo.io/v1) -> routes.

Both forms in use are read: the 0.x/1.x `matcher` + `routePlugins`, and the newer `matchers[]`
+ `options`. What maps: `virtualHost.domains` (one route per domain, `*` is any), matchers
(`prefix`, `exact`, `regex`; `methods`; `headers` and `queryParameters` without `regex`), the
`routeAction` (`single` upstream or kube service, `multi` destinations with weights), and
`shadowing` (`upstream`, `percentage`) as the route's shadow. `headerManipulation` request
changes, `prefixRewrite`, `regexRewrite`, `hostRewrite` and `autoHostRewrite` become the route's
`headers`, `rewrite_path` and `host`: the primary is sent the changed request and the shadow
copy starts from it (Envoy mirrors after them). Routes keep their order (Gloo's first match
wins).

Peer semantics kept: one shadow per route (Gloo's `shadowing` takes one upstream), and the
shadow's Host gets `-shadow` appended, which Gloo cannot turn off (solo-io/gloo#10584).
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
    no_traffic,
    object_name,
    percent_of,
    prefix_rewrite,
    regex_rewrite,
    route_data,
    route_headers,
)
from shadowlane.importers.services import ServiceMap

KINDS = frozenset({"VirtualService"})
GROUP = "gateway.solo.io"

_ROUTE_KEYS = frozenset({"matcher", "matchers", "routeAction", "routePlugins", "options", "name"})
_OPTION_KEYS = frozenset(
    {
        "shadowing",
        "headerManipulation",
        "prefixRewrite",
        "regexRewrite",
        "hostRewrite",
        "autoHostRewrite",
    }
)


def _upstream(
    tr: Translation,
    services: ServiceMap,
    dest: dict[str, Any],
    ns: str,
    obj: str,
    path: str,
    suffix: str = "",
) -> str | None:
    if "upstream" in dest:
        up = as_dict(dest["upstream"])
        name, namespace, port = str(up.get("name", "")), str(up.get("namespace", ns)), None
        where = f"{path}.upstream"
    elif "kube" in dest:
        kube = as_dict(dest["kube"])
        ref = as_dict(kube.get("ref"))
        name, namespace = str(ref.get("name", "")), str(ref.get("namespace", ns))
        port = kube.get("port")
        port = int(port) if isinstance(port, int) else None
        where = f"{path}.kube"
    else:
        tr.note(obj, path, "only upstream and kube destinations are translated")
        return None
    if not name:
        tr.note(obj, f"{where}.name", "missing")
        return None
    resolved = services.service(name, namespace, port)
    label = f"{name}.{namespace}" + (f"-{port}" if port else "") + suffix
    return tr.backend(label, resolved.endpoints, f"{obj} {where} ({resolved.how})")


def _matcher(tr: Translation, m: dict[str, Any], obj: str, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    leftover(
        tr,
        obj,
        path,
        m,
        {"prefix", "exact", "regex", "methods", "headers", "queryParameters", "caseSensitive"},
    )
    if "exact" in m:
        out["path"] = str(m["exact"])
    elif "regex" in m:
        out["path_regex"] = f"^(?:{m['regex']})$"
    elif str(m.get("prefix", "/")) != "/":
        out["path_prefix"] = str(m["prefix"])
    if m.get("methods"):
        out["methods"] = [str(x).upper() for x in as_list(m["methods"])]
    for key, native in (("headers", "headers"), ("queryParameters", "query")):
        exact: dict[str, str] = {}
        for i, h in enumerate(as_list(m.get(key))):
            h = as_dict(h)
            if h.get("regex") or h.get("invertMatch") or "value" not in h:
                tr.note(
                    obj,
                    f"{path}.{key}[{i}]",
                    "regex, inverted and presence matches are not translated; dropped",
                )
                continue
            name = str(h.get("name", ""))
            exact[name.lower() if key == "headers" else name] = str(h["value"])
        if exact:
            out[native] = exact
    return out


def _route_changes(
    tr: Translation, options: dict[str, Any], obj: str, opath: str
) -> dict[str, Any]:
    """`headerManipulation` and the Host rewrites as the route's `headers` and `host`: the
    primary is sent the changed request, and the shadow copy starts from it (Envoy mirrors
    after the route's changes). A header to add is appended unless `append: false` (Envoy's
    default), which makes it a set."""
    out: dict[str, Any] = {}
    manip = as_dict(options.get("headerManipulation"))
    if manip:
        mpath = f"{opath}.headerManipulation"
        leftover(tr, obj, mpath, manip, {"requestHeadersToAdd", "requestHeadersToRemove"})
        heads: dict[str, Any] = {"set": {}, "add": {}, "remove": []}
        for i, item in enumerate(as_list(manip.get("requestHeadersToAdd"))):
            item = as_dict(item)
            ipath = f"{mpath}.requestHeadersToAdd[{i}]"
            leftover(tr, obj, ipath, item, {"header", "append"})
            header = as_dict(item.get("header"))
            if "key" not in header:
                tr.note(obj, f"{ipath}.header", "header without a key")
                continue
            how = "add" if item.get("append", True) is not False else "set"
            heads[how][str(header["key"]).lower()] = str(header.get("value", ""))
        heads["remove"] = [str(h).lower() for h in as_list(manip.get("requestHeadersToRemove"))]
        route_headers(tr, obj, mpath, heads, out)
    if options.get("hostRewrite"):
        out["host"] = str(options["hostRewrite"])
    elif options.get("autoHostRewrite") is True:
        out["host"] = "backend"
    return out


def _path_rewrite(
    tr: Translation, options: dict[str, Any], native: dict[str, Any], obj: str, opath: str
) -> dict[str, str] | None:
    """`prefixRewrite` (Envoy's prefix_rewrite) or `regexRewrite` for one matcher."""
    if "prefixRewrite" in options:
        if "regexRewrite" in options:
            tr.note(obj, f"{opath}.regexRewrite", "given with prefixRewrite: prefixRewrite is used")
        return prefix_rewrite(native, str(options["prefixRewrite"]))
    rx = as_dict(options.get("regexRewrite"))
    if rx:
        rpath = f"{opath}.regexRewrite"
        leftover(tr, obj, rpath, rx, {"pattern", "substitution"})
        pattern = as_dict(rx.get("pattern"))
        leftover(tr, obj, f"{rpath}.pattern", pattern, {"regex", "googleRe2"})
        return regex_rewrite(
            tr, obj, rpath, str(pattern.get("regex", "")), str(rx.get("substitution", ""))
        )
    return None


def _translate(tr: Translation, services: ServiceMap, doc: Doc) -> None:
    obj = object_name(doc)
    ns = namespace_of(doc)
    spec = as_dict(doc.get("spec"))
    leftover(tr, obj, "spec", spec, {"virtualHost", "displayName"})
    vhost = as_dict(spec.get("virtualHost"))
    leftover(tr, obj, "spec.virtualHost", vhost, {"domains", "routes"})
    domains = [str(d) for d in as_list(vhost.get("domains"))] or ["*"]
    for r, route in enumerate(as_list(vhost.get("routes"))):
        route = as_dict(route)
        path = f"spec.virtualHost.routes[{r}]"
        leftover(tr, obj, path, route, _ROUTE_KEYS)
        action = as_dict(route.get("routeAction"))
        if not action:
            tr.note(obj, path, "no routeAction (delegate, redirect or direct response): skipped")
            continue
        legs: list[dict[str, Any]] = []
        if "single" in action:
            name = _upstream(
                tr, services, as_dict(action["single"]), ns, obj, f"{path}.routeAction.single"
            )
            if name is not None:
                legs.append({"backend": name, "weight": 1})
        elif "multi" in action:
            for d, dest in enumerate(as_list(as_dict(action["multi"]).get("destinations"))):
                dest = as_dict(dest)
                dpath = f"{path}.routeAction.multi.destinations[{d}]"
                name = _upstream(
                    tr, services, as_dict(dest.get("destination")), ns, obj, f"{dpath}.destination"
                )
                if name is not None:
                    legs.append({"backend": name, "weight": int(dest.get("weight", 1))})
        else:
            tr.unsupported(obj, f"{path}.routeAction", "only single and multi are translated")
        if no_traffic(tr, obj, f"{path}.routeAction", legs):
            continue
        options_key = "options" if "options" in route else "routePlugins"
        options = as_dict(route.get(options_key))
        opath = f"{path}.{options_key}"
        leftover(tr, obj, opath, options, _OPTION_KEYS)
        shadows: list[dict[str, Any]] = []
        comments = [f"from {obj} {path}"]
        shadowing = as_dict(options.get("shadowing"))
        if shadowing:
            leftover(tr, obj, f"{opath}.shadowing", shadowing, {"upstream", "percentage"})
            name = _upstream(tr, services, shadowing, ns, obj, f"{opath}.shadowing", "-shadow")
            if name is not None:
                shadows.append(
                    {"backend": name, "percent": percent_of(shadowing.get("percentage", 100))}
                )
                comments.append("Gloo: one shadow per route, Host gets -shadow appended (kept)")
        changes = _route_changes(tr, options, obj, opath)
        matchers = as_list(route.get("matchers")) or (
            [route["matcher"]] if "matcher" in route else [{}]
        )
        mkey = "matchers" if "matchers" in route else "matcher"
        for m, matcher in enumerate(matchers):
            mpath = f"{path}.{mkey}" + (f"[{m}]" if mkey == "matchers" else "")
            native = _matcher(tr, as_dict(matcher), obj, mpath)
            rewrite = _path_rewrite(tr if m == 0 else Translation(), options, native, obj, opath)
            for domain in domains:
                host = domain.partition(":")[0].lower() if domain != "*" else None
                data = route_data(native, host, legs, changes, rewrite, shadows)
                label = route.get("name") or f"r{r}"
                data["name"] = tr.route_name(f"{name_of(doc)}.{ns}.{label}")
                tr.add_route(data, comments)


def translate(docs: list[Doc], tr: Translation, services: ServiceMap) -> None:
    for doc in docs:
        _translate(tr, services, doc)
