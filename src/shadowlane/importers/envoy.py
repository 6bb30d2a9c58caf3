"""Envoy route configuration -> routes.

Read: a `RouteConfiguration` (`virtual_hosts`, with or without its `@type`), an HTTP connection
manager's `route_config`, or a bootstrap's `static_resources` (listeners' route configs, and
`clusters` whose `load_assignment` endpoints resolve the cluster names without `--services`).

What maps: `virtual_hosts[].domains` (one route per domain, `*` is any), `routes[].match`
(`prefix`, `path`, `safe_regex`, `path_separated_prefix`; `headers` and `query_parameters`
with exact matches), `route.cluster` and `weighted_clusters`, and `request_mirror_policies`
(or the old `request_mirror_policy`) with `runtime_fraction`, inherited from the virtual host
or the route configuration when a route has none. `prefix_rewrite`, `regex_rewrite`,
`host_rewrite_literal`, `auto_host_rewrite` and the header additions and removals become the
route's `rewrite_path`, `host` and `headers`: the primary is sent the changed request, and the
mirror copies start from it (Envoy's router mirrors after the route's changes).

Peer semantics kept: Envoy appends `-shadow` to the mirror's Host unless
`disable_shadow_host_suffix_append: true`, which becomes `host_suffix: ""`.
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
    literal_replacement,
    no_traffic,
    percent_of,
    prefix_rewrite,
    regex_rewrite,
    route_data,
    route_headers,
)
from shadowlane.importers.services import ServiceMap

_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}
_ROUTE_ACTION_KEYS = frozenset(
    {
        "cluster",
        "weighted_clusters",
        "request_mirror_policies",
        "request_mirror_policy",
        "timeout",
        "prefix_rewrite",
        "regex_rewrite",
        "host_rewrite_literal",
        "auto_host_rewrite",
    }
)


def is_envoy(doc: Doc) -> bool:
    return any(k in doc for k in ("virtual_hosts", "route_config", "static_resources"))


def _route_configs(doc: Doc, obj: str) -> list[tuple[str, dict[str, Any]]]:
    if "virtual_hosts" in doc:
        return [(obj, doc)]
    if "route_config" in doc:
        return [(obj, as_dict(doc["route_config"]))]
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(value: object, path: str) -> None:
        if isinstance(value, dict):
            if "route_config" in value and isinstance(value["route_config"], dict):
                found.append((f"{obj} {path}.route_config", value["route_config"]))
                return
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")

    walk(as_dict(doc.get("static_resources")).get("listeners"), "static_resources.listeners")
    return found


def _clusters(doc: Doc) -> dict[str, list[str]]:
    """Static clusters' endpoints, so a bootstrap runs without a --services file."""
    out: dict[str, list[str]] = {}
    for cluster in as_list(as_dict(doc.get("static_resources")).get("clusters")):
        cluster = as_dict(cluster)
        urls: list[str] = []
        tls = "transport_socket" in cluster
        for group in as_list(as_dict(cluster.get("load_assignment")).get("endpoints")):
            for lb in as_list(as_dict(group).get("lb_endpoints")):
                sock = as_dict(
                    as_dict(as_dict(as_dict(lb).get("endpoint")).get("address")).get(
                        "socket_address"
                    )
                )
                if "address" in sock:
                    host = str(sock["address"])
                    host = f"[{host}]" if ":" in host else host
                    urls.append(
                        f"{'https' if tls else 'http'}://{host}:{sock.get('port_value', 80)}"
                    )
        if urls and "name" in cluster:
            out[str(cluster["name"])] = urls
    return out


class _Ctx:
    def __init__(self, tr: Translation, services: ServiceMap, clusters: dict[str, list[str]]):
        self.tr = tr
        self.services = services
        self.clusters = clusters

    def cluster(self, name: str, obj: str, path: str, suffix: str = "") -> str:
        if name in self.clusters:
            endpoints, how = self.clusters[name], "static_resources.clusters"
        else:
            found = self.services.lookup(name, None, None)
            if found is not None:
                endpoints, how = found, f"--services {self.services.source}"
            else:
                # Istio's cluster names: outbound|port|subset|host
                parts = name.split("|")
                if len(parts) == 4 and parts[0] == "outbound" and parts[1].isdigit():
                    got = self.services.service(parts[3], None, int(parts[1]))
                else:
                    got = self.services.service(name, None, None)
                endpoints, how = got.endpoints, got.how
        return self.tr.backend(name + suffix, endpoints, f"{obj} {path} ({how})")


def _mirrors(ctx: _Ctx, action: dict[str, Any], obj: str, path: str) -> list[dict[str, Any]] | None:
    policies = as_list(action.get("request_mirror_policies"))
    key = "request_mirror_policies"
    if not policies and "request_mirror_policy" in action:
        policies, key = [action["request_mirror_policy"]], "request_mirror_policy"
    if not policies and key not in action:
        return None
    out: list[dict[str, Any]] = []
    for i, pol in enumerate(policies):
        pol = as_dict(pol)
        ppath = f"{path}.{key}" + (f"[{i}]" if key == "request_mirror_policies" else "")
        leftover(
            ctx.tr,
            obj,
            ppath,
            pol,
            {
                "cluster",
                "cluster_header",
                "runtime_fraction",
                "disable_shadow_host_suffix_append",
                "trace_sampled",
            },
        )
        if "cluster" not in pol:
            ctx.tr.note(
                obj,
                f"{ppath}.cluster_header" if "cluster_header" in pol else ppath,
                "only a literal cluster is translated",
            )
            continue
        shadow: dict[str, Any] = {
            "backend": ctx.cluster(str(pol["cluster"]), obj, f"{ppath}.cluster", "-mirror")
        }
        frac = as_dict(pol.get("runtime_fraction"))
        if frac:
            if frac.get("runtime_key"):
                ctx.tr.note(
                    obj,
                    f"{ppath}.runtime_fraction.runtime_key",
                    "runtime overrides are not read; the default_value is used "
                    "(change it at run time with the control API)",
                )
            dv = as_dict(frac.get("default_value"))
            den = _DENOMINATORS.get(str(dv.get("denominator", "HUNDRED")), 100)
            shadow["percent"] = percent_of(dv.get("numerator", 0), den)
        else:
            shadow["percent"] = 100.0
        if pol.get("disable_shadow_host_suffix_append"):
            shadow["host_suffix"] = ""
        if any(s["backend"] == shadow["backend"] for s in out):
            ctx.tr.note(obj, ppath, "the same cluster mirrored twice: kept once")
            continue
        out.append(shadow)
    return out


#: Envoy's command operators (`%DOWNSTREAM_REMOTE_ADDRESS%`): a value computed per request
_OPERATOR = re.compile(r"%[A-Z_]+(\(.*?\))?%")


def _headers(ctx: _Ctx, scopes: list[tuple[dict[str, Any], str]], obj: str) -> dict[str, Any]:
    """`request_headers_to_add/remove` of the route configuration, virtual host and route, as
    the route's `headers` (the primary is sent them; the mirror copies start from them). An
    addition appends (`append: true`, `APPEND_IF_EXISTS_OR_ADD`, Envoy's default) or replaces
    (`append: false`, `OVERWRITE_IF_EXISTS_OR_ADD`); the conditional actions are noted."""
    heads: dict[str, Any] = {"set": {}, "add": {}, "remove": []}
    for scope, path in scopes:
        for i, item in enumerate(as_list(scope.get("request_headers_to_add"))):
            item = as_dict(item)
            ipath = f"{path}.request_headers_to_add[{i}]"
            leftover(ctx.tr, obj, ipath, item, {"header", "append", "append_action"})
            header = as_dict(item.get("header"))
            if "key" not in header:
                ctx.tr.note(obj, f"{ipath}.header", "header without a key")
                continue
            action = str(item.get("append_action", ""))
            if action in ("ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS"):
                ctx.tr.note(obj, f"{ipath}.append_action", f"{action} is not translated")
                continue
            append = item.get("append", True) is not False
            how = "set" if action == "OVERWRITE_IF_EXISTS_OR_ADD" or not append else "add"
            value = str(header.get("value", ""))
            if _OPERATOR.search(value):
                ctx.tr.note(
                    obj,
                    f"{ipath}.header.value",
                    "Envoy's command operators are not evaluated: sent as written",
                )
            heads[how][str(header["key"]).lower()] = value
        heads["remove"] += [str(h).lower() for h in as_list(scope.get("request_headers_to_remove"))]
    out: dict[str, Any] = {}
    route_headers(ctx.tr, obj, scopes[-1][1] + ".request_headers_to_add", heads, out)
    return out


def _rewrites(
    ctx: _Ctx,
    action: dict[str, Any],
    raw_match: dict[str, Any],
    native: dict[str, Any],
    obj: str,
    apath: str,
) -> dict[str, Any]:
    """`prefix_rewrite`, `regex_rewrite`, `host_rewrite_literal` and `auto_host_rewrite` as the
    route's `rewrite_path` and `host`."""
    out: dict[str, Any] = {}
    separated = raw_match.get("path_separated_prefix")
    if "prefix_rewrite" in action and separated is not None:
        # matched as a regex of whole segments, but the prefix is what is swapped
        out["rewrite_path"] = {
            "regex": "^" + re.escape(str(separated)),
            "replacement": literal_replacement(str(action["prefix_rewrite"])),
        }
    elif "prefix_rewrite" in action:
        out["rewrite_path"] = prefix_rewrite(native, str(action["prefix_rewrite"]))
    elif "regex_rewrite" in action:
        rx = as_dict(action["regex_rewrite"])
        rpath = f"{apath}.regex_rewrite"
        leftover(ctx.tr, obj, rpath, rx, {"pattern", "substitution"})
        pattern = as_dict(rx.get("pattern"))
        leftover(ctx.tr, obj, f"{rpath}.pattern", pattern, {"regex", "google_re2"})
        out["rewrite_path"] = regex_rewrite(
            ctx.tr, obj, rpath, str(pattern.get("regex", "")), str(rx.get("substitution", ""))
        )
    if action.get("host_rewrite_literal"):
        out["host"] = str(action["host_rewrite_literal"])
    elif action.get("auto_host_rewrite") is True:
        out["host"] = "backend"
    return out


def _match(ctx: _Ctx, match: dict[str, Any], obj: str, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    leftover(
        ctx.tr,
        obj,
        path,
        match,
        {
            "prefix",
            "path",
            "safe_regex",
            "path_separated_prefix",
            "headers",
            "query_parameters",
            "case_sensitive",
        },
    )
    if "path" in match:
        out["path"] = str(match["path"])
    elif "safe_regex" in match:
        out["path_regex"] = f"^(?:{as_dict(match['safe_regex']).get('regex', '')})$"
    elif "path_separated_prefix" in match:
        prefix = str(match["path_separated_prefix"])
        out["path_regex"] = f"^{prefix.rstrip('/')}(/|$)" if prefix != "/" else "^/"
    elif str(match.get("prefix", "/")) != "/":
        out["path_prefix"] = str(match["prefix"])
    for key, native in (("headers", "headers"), ("query_parameters", "query")):
        exact: dict[str, str] = {}
        for i, h in enumerate(as_list(match.get(key))):
            h = as_dict(h)
            sm = as_dict(h.get("string_match"))
            value = h.get("exact_match", sm.get("exact"))
            if value is None or h.get("invert_match"):
                ctx.tr.note(
                    obj,
                    f"{path}.{key}[{i}]",
                    "only exact matches are translated; condition dropped",
                )
                continue
            name = str(h.get("name", ""))
            exact[name.lower() if key == "headers" else name] = str(value)
        if exact:
            out[native] = exact
    return out


def _translate_config(ctx: _Ctx, rc: dict[str, Any], obj: str) -> None:
    tr = ctx.tr
    rc_mirrors = _mirrors(ctx, rc, obj, "")
    for v, vhost in enumerate(as_list(rc.get("virtual_hosts"))):
        vhost = as_dict(vhost)
        vpath = f"virtual_hosts[{v}]"
        leftover(
            tr,
            obj,
            vpath,
            vhost,
            {
                "name",
                "domains",
                "routes",
                "request_mirror_policies",
                "request_headers_to_add",
                "request_headers_to_remove",
            },
        )
        vh_mirrors = _mirrors(ctx, vhost, obj, vpath)
        domains = [str(d) for d in as_list(vhost.get("domains"))] or ["*"]
        vname = str(vhost.get("name", f"vh{v}"))
        for r, route in enumerate(as_list(vhost.get("routes"))):
            route = as_dict(route)
            rpath = f"{vpath}.routes[{r}]"
            leftover(
                tr,
                obj,
                rpath,
                route,
                {
                    "name",
                    "match",
                    "route",
                    "request_headers_to_add",
                    "request_headers_to_remove",
                    "redirect",
                    "direct_response",
                },
            )
            action = as_dict(route.get("route"))
            if not action:
                tr.note(obj, rpath, "not a route action (redirect, direct_response): skipped")
                continue
            apath = f"{rpath}.route"
            leftover(tr, obj, apath, action, _ROUTE_ACTION_KEYS)
            if "timeout" in action:
                tr.unsupported(
                    obj,
                    f"{apath}.timeout",
                    "per-route timeouts are not translated (set the backend's)",
                )
            legs: list[dict[str, Any]] = []
            if "cluster" in action:
                legs.append(
                    {
                        "backend": ctx.cluster(str(action["cluster"]), obj, f"{apath}.cluster"),
                        "weight": 1,
                    }
                )
            elif "weighted_clusters" in action:
                wc = as_dict(action["weighted_clusters"])
                for c, cl in enumerate(as_list(wc.get("clusters"))):
                    cl = as_dict(cl)
                    legs.append(
                        {
                            "backend": ctx.cluster(
                                str(cl.get("name", "")),
                                obj,
                                f"{apath}.weighted_clusters.clusters[{c}]",
                            ),
                            "weight": int(cl.get("weight", 0)),
                        }
                    )
            if no_traffic(tr, obj, apath, legs):
                continue
            mirrors = _mirrors(ctx, action, obj, apath)
            if mirrors is None:
                mirrors = vh_mirrors if vh_mirrors is not None else (rc_mirrors or [])
            heads = _headers(
                ctx, [(rc, "(route configuration)"), (vhost, vpath), (route, rpath)], obj
            )
            native = _match(ctx, as_dict(route.get("match")), obj, f"{rpath}.match")
            # the route's own Host rewrite wins over a Host set as a header
            changes = {
                **heads,
                **_rewrites(ctx, action, as_dict(route.get("match")), native, obj, apath),
            }
            for domain in domains:
                if domain.endswith("*") and domain != "*":
                    tr.note(
                        obj,
                        f"{vpath}.domains",
                        f"{domain!r}: suffix wildcards are not translated; any host matches",
                    )
                exact = domain != "*" and not domain.endswith("*")
                host = domain.partition(":")[0].lower() if exact else None
                data = route_data(native, host, legs, changes, shadows=mirrors)
                comments = [f"from {obj} {rpath}"]
                if mirrors:
                    comments.append(
                        "Envoy appends -shadow to the mirror's Host unless "
                        "disable_shadow_host_suffix_append (kept as host_suffix)"
                    )
                data["name"] = tr.route_name(str(route.get("name") or f"{vname}.r{r}"))
                tr.add_route(data, comments)


def translate(docs: list[tuple[str, Doc]], tr: Translation, services: ServiceMap) -> None:
    for obj, doc in docs:
        ctx = _Ctx(tr, services, _clusters(doc))
        for where, rc in _route_configs(doc, obj):
            _translate_config(ctx, rc, where)
