"""Emissary-ingress / Ambassador `Mapping` (getambassador.io v2, v3alpha1) -> routes.

Mappings that match the same requests (host, prefix, method, headers, query) form one route:
the non-shadow ones are its backends, split by `weight` (Emissary's canary: weighted mappings
take their percent, the others share what is left equally), and a `shadow: true` mapping is its
shadow, with `weight` as the shadow's percent. Routes are ordered as Emissary orders mappings:
`precedence` first, then the longer prefix, then more headers.

Peer semantics kept, and said in the output: Emissary allows one shadow per resource ("an error
in the diagnostic service, and only one shadow will be used"), so a second shadow mapping for
the same route is a warning and only the first (in document order) is kept; the shadow's Host
gets `-shadow` appended, as Envoy does for it.

Not kept, and warned: Emissary rewrites the matched prefix to `rewrite` (default `/`) before
forwarding. shadowlane forwards the path unchanged, to the primary and the shadow alike, so the
two stay comparable; set `rewrite` equal to `prefix` to silence the warning.
"""

from __future__ import annotations

from typing import Any

from shadowlane.importers.model import (
    Doc,
    Translation,
    as_dict,
    leftover,
    name_of,
    namespace_of,
    object_name,
    percent_of,
)
from shadowlane.importers.services import ServiceMap, split_host_port

KINDS = frozenset({"Mapping"})
GROUP = "getambassador.io"

_KNOWN = frozenset(
    {
        "prefix",
        "prefix_regex",
        "prefix_exact",
        "method",
        "method_regex",
        "headers",
        "host",
        "hostname",
        "service",
        "weight",
        "shadow",
        "rewrite",
        "query_parameters",
        "precedence",
        "ambassador_id",
        "add_request_headers",
        "remove_request_headers",
    }
)


def _service(tr: Translation, services: ServiceMap, doc: Doc, obj: str, shadow: bool) -> str:
    spec = as_dict(doc.get("spec"))
    raw = str(spec.get("service", ""))
    ns = namespace_of(doc)
    if "://" in raw:
        scheme, _, rest = raw.partition("://")
    else:
        scheme, rest = "http", raw
    hostport, _, _ = rest.partition("/")
    host, port = split_host_port(hostport)
    resolved = services.service(host, ns, port, scheme if scheme in ("http", "https") else "http")
    label = host + (f"-{port}" if port is not None else "")
    return tr.backend(label, resolved.endpoints, f"{obj} spec.service ({resolved.how})")


def _match(tr: Translation, spec: dict[str, Any], obj: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    prefix = str(spec.get("prefix", "/"))
    if spec.get("prefix_regex"):
        out["path_regex"] = f"^(?:{prefix})$"
    elif spec.get("prefix_exact"):
        out["path"] = prefix
    elif prefix != "/":
        out["path_prefix"] = prefix
    if spec.get("method_regex"):
        tr.unsupported(obj, "spec.method_regex", "method_regex is not translated")
    elif spec.get("method"):
        out["methods"] = [str(spec["method"]).upper()]
    host = spec.get("hostname", spec.get("host"))
    if spec.get("host_regex"):
        tr.unsupported(obj, "spec.host_regex", "host_regex is not translated")
    elif isinstance(host, str) and host not in ("*", ""):
        out["host"] = host.partition(":")[0].lower()
    headers: dict[str, str] = {}
    for name, value in as_dict(spec.get("headers")).items():
        if value is True:
            tr.note(obj, f"spec.headers.{name}", "presence matches are not translated")
            continue
        headers[str(name).lower()] = str(value)
    if headers:
        out["headers"] = headers
    query = {str(k): str(v) for k, v in as_dict(spec.get("query_parameters")).items()}
    if query:
        out["query"] = query
    return out


def _key(match: dict[str, Any]) -> str:
    return repr(sorted((k, repr(v)) for k, v in match.items()))


def translate(docs: list[Doc], tr: Translation, services: ServiceMap) -> None:
    groups: dict[str, dict[str, Any]] = {}
    for doc in docs:
        obj = object_name(doc)
        spec = as_dict(doc.get("spec"))
        leftover(tr, obj, "spec", spec, _KNOWN | {"host_regex"})
        match = _match(tr, spec, obj)
        group = groups.setdefault(
            _key(match),
            {
                "match": match,
                "primaries": [],
                "shadows": [],
                "precedence": 0,
                "first": obj,
                "prefix": str(spec.get("prefix", "/")),
                "notes": [],
            },
        )
        prefix = str(spec.get("prefix", "/"))
        rewrite = spec.get("rewrite", "/")
        if rewrite is not None and str(rewrite) != prefix and not spec.get("prefix_regex"):
            tr.note(
                obj,
                "spec.rewrite",
                f"Emissary rewrites {prefix!r} to {rewrite!r}"
                + ("" if "rewrite" in spec else " (its default)")
                + "; shadowlane forwards the path unchanged (primary and shadow alike)",
            )
        adds = as_dict(spec.get("add_request_headers"))
        removes = [str(r).lower() for r in spec.get("remove_request_headers") or []]
        if adds or removes:
            tr.note(
                obj,
                "spec.add_request_headers" if adds else "spec.remove_request_headers",
                "applied to a shadow copy only; the primary request is forwarded unchanged",
            )
        headers = {
            "set": {
                str(k).lower(): str(as_dict(v).get("value", "") if isinstance(v, dict) else v)
                for k, v in adds.items()
            },
            "remove": removes,
        }
        group["precedence"] = max(group["precedence"], int(spec.get("precedence", 0) or 0))
        entry = {"doc": doc, "obj": obj, "weight": spec.get("weight"), "headers": headers}
        (group["shadows"] if spec.get("shadow") else group["primaries"]).append(entry)
    ordered = sorted(
        groups.values(),
        key=lambda g: (-g["precedence"], -len(g["prefix"]), -len(g["match"].get("headers", {}))),
    )
    for group in ordered:
        primaries, shadows = group["primaries"], group["shadows"]
        if not primaries:
            for s in shadows:
                tr.note(
                    s["obj"],
                    "spec.shadow",
                    "a shadow Mapping with no primary Mapping for the same match: skipped",
                )
            continue
        comments = ["from " + ", ".join(p["obj"] for p in primaries)]
        legs = _legs(tr, services, primaries)
        data: dict[str, Any] = {
            "name": tr.route_name(name_of(primaries[0]["doc"])),
            "match": dict(group["match"]),
        }
        if len(legs) == 1:
            data["backend"] = legs[0]["backend"]
        else:
            data["backends"] = legs
        if shadows:
            first = shadows[0]
            for extra in shadows[1:]:
                tr.note(
                    extra["obj"],
                    "spec.shadow",
                    f"Emissary allows one shadow per resource; {first['obj']} is used, "
                    "this one is not",
                )
            shadow: dict[str, Any] = {
                "backend": _service(tr, services, first["doc"], first["obj"], True),
                "percent": percent_of(first["weight"]) if first["weight"] is not None else 100.0,
            }
            head = primaries[0]["headers"]
            if head["set"] or head["remove"]:
                shadow["headers"] = head
            data["shadows"] = [shadow]
            comments.append(
                f"shadow from {first['obj']}: Emissary allows one shadow per resource, and its "
                "Host gets -shadow appended (both kept)"
            )
        tr.add_route(data, comments)


def _legs(
    tr: Translation, services: ServiceMap, primaries: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Emissary's canary split: weighted mappings take their share, the rest share the rest."""
    weighted = [p for p in primaries if p["weight"] is not None]
    plain = [p for p in primaries if p["weight"] is None]
    taken = sum(float(p["weight"]) for p in weighted)
    rest = max(0.0, 100.0 - taken)
    legs: list[dict[str, Any]] = []
    for p in primaries:
        name = _service(tr, services, p["doc"], p["obj"], False)
        weight = float(p["weight"]) if p["weight"] is not None else rest / len(plain)
        if any(leg["backend"] == name for leg in legs):
            for leg in legs:
                if leg["backend"] == name:
                    leg["weight"] += round(weight)
            continue
        legs.append({"backend": name, "weight": round(weight)})
    if all(leg["weight"] == 0 for leg in legs):
        legs[0]["weight"] = 100
    return legs
