"""The translation's pure parts, in-process: the eskip parser, service lookups, and the
arithmetic of splits and precedence that the proxy tests only see through sampling."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from shadowlane.config import parse_config
from shadowlane.importers import EskipError, ServiceMap, parse_routes, translate_paths
from shadowlane.importers.eskip import parse_call


def translate(tmp_path: Any, name: str, text: str, services: dict[str, Any] | None = None) -> Any:
    path = tmp_path / name
    path.write_text(text)
    smap = ServiceMap({k: v if isinstance(v, list) else [v] for k, v in (services or {}).items()})
    loaded = translate_paths([str(path)], smap)
    # whatever comes out must be a config the loader accepts
    parse_config(yaml.safe_dump({"listen": "127.0.0.1:0", **loaded.config}))
    return loaded


def test_eskip_parses_comments_strings_regexps_and_backends() -> None:
    routes = parse_routes(
        """
        // a comment; with a semicolon
        a: Path("/a\\"b") && PathRegexp(/^\\/x\\.y$/) && Traffic(.25)
           -> setRequestHeader(`X-Raw`, `a\\b`) -> "http://a:1";
        b: * -> <shunt>;
        c: Method("GET") -> <roundRobin, "http://c1:1", "http://c2:2">;
        d: Path("/d") -> <"http://d1:1", "http://d2:2">
        """
    )
    assert [r.id for r in routes] == ["a", "b", "c", "d"]
    a = routes[0]
    assert [str(p) for p in a.predicates] == [
        "Path('/a\"b')",
        "PathRegexp('^/x\\\\.y$')",
        "Traffic(0.25)",
    ]
    assert a.filters[0].args == ("X-Raw", "a\\b")
    assert a.backend == ("network", "http://a:1")
    assert routes[1].predicates == [] and routes[1].backend == ("shunt",)
    assert routes[2].backend == ("lb", "roundRobin", "http://c1:1", "http://c2:2")
    assert routes[3].backend == ("lb", "roundRobin", "http://d1:1", "http://d2:2")
    assert parse_call('Tee("g")').args == ("g",)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('a: Path("/a") -> "http://a:1";\nb: Path("/b") "http://b:1";', "2:15"),
        ('a: Path("/a) -> <shunt>;', "1:9"),
        ("a: Path(/a/) -> ;", "1:17"),
    ],
)
def test_eskip_errors_name_line_and_column(text: str, where: str) -> None:
    with pytest.raises(EskipError, match=f"^{where}: ") as err:
        parse_routes(text)
    assert "expected" in str(err.value) or "unterminated" in str(err.value)


def test_service_lookup_tries_the_most_specific_key_first() -> None:
    smap = ServiceMap(
        {
            "api.prod:8080": ["http://a:1"],
            "api.prod": ["http://b:1"],
            "api:9090": ["http://c:1"],
            "api": ["http://d:1"],
        },
        "s.yaml",
    )
    assert smap.service("api", "prod", 8080).endpoints == ["http://a:1"]
    assert smap.service("api", "prod", 80).endpoints == ["http://b:1"]
    assert smap.service("api", "dev", 9090).endpoints == ["http://c:1"]
    assert smap.service("api", "dev", 80).endpoints == ["http://d:1"]
    # the namespace may be part of the name, and the cluster suffix is not part of it
    assert smap.service("api.prod.svc.cluster.local", None, 8080).endpoints == ["http://a:1"]
    dns = ServiceMap().service("cart", "shop", 8080)
    assert dns.endpoints == ["http://cart.shop.svc.cluster.local:8080"]
    assert ServiceMap().service("cart", None, None).endpoints == [
        "http://cart.default.svc.cluster.local:80"
    ]
    assert ServiceMap().url("http://es7:9200/").endpoints == ["http://es7:9200"]


def test_skipper_traffic_routes_become_one_split_in_skippers_order(tmp_path: Any) -> None:
    loaded = translate(
        tmp_path,
        "r.eskip",
        """
        a: Path("/x") && Traffic(.2) -> "http://a:1";
        b: Path("/x") && Traffic(.5) -> teeLoopback("t") -> "http://b:1";
        c: Path("/x") -> "http://c:1";
        t: Path("/x") && Tee("t") -> modPath("^/x", "/y") -> "http://t:1";
        """,
    )
    (route,) = loaded.config["routes"]
    # a takes .2, b takes .5 of the remaining .8 (.4), c the rest (.4)
    assert [(leg["backend"], leg["weight"]) for leg in route["backends"]] == [
        ("a-1", 200),
        ("b-1", 400),
        ("c-1", 400),
    ]
    (shadow,) = route["shadows"]
    assert shadow["backend"] == "t-1" and shadow["percent"] == 40.0
    assert shadow["rewrite_path"] == {"regex": "^/x", "replacement": "/y"}
    assert shadow["headers"]["set"] == {"x-tee-loopback-key": "t"}


def test_gateway_precedence_and_segment_prefixes(tmp_path: Any) -> None:
    loaded = translate(
        tmp_path,
        "r.yaml",
        """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: n}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: root, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/}}]
    backendRefs: [{name: api, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/v1}, method: GET}]
    backendRefs: [{name: v1, port: 80}]
  - matches: [{path: {type: Exact, value: /api}}]
    backendRefs: [{name: exact, port: 80}]
  - backendRefs: [{name: zero, port: 80, weight: 0}]
""",
    )
    routes = loaded.config["routes"]
    assert [r["backend"].split(".")[0] for r in routes] == ["exact", "v1", "api", "root"]
    assert routes[2]["match"] == {"path_regex": "^/api(/|$)"}
    assert routes[3]["match"] == {"path_prefix": "/"}
    assert [str(n) for n in loaded.notes] == [
        "HTTPRoute n/r: spec.rules[4].backendRefs: every weight is 0 (the peer answers with "
        "an error): not translated"
    ]


def test_emissary_canary_shares_and_envoy_denominators(tmp_path: Any) -> None:
    loaded = translate(
        tmp_path,
        "m.yaml",
        """
apiVersion: getambassador.io/v2
kind: Mapping
metadata: {name: a}
spec: {prefix: /p/, rewrite: /p/, service: a}
---
apiVersion: getambassador.io/v2
kind: Mapping
metadata: {name: b}
spec: {prefix: /p/, rewrite: /p/, service: b}
---
apiVersion: getambassador.io/v2
kind: Mapping
metadata: {name: c}
spec: {prefix: /p/, rewrite: /p/, service: c, weight: 30}
""",
    )
    (route,) = loaded.config["routes"]
    assert [leg["weight"] for leg in route["backends"]] == [35, 35, 30]
    assert loaded.notes == []
    envoy = translate(
        tmp_path,
        "e.yaml",
        """
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: {prefix: /}
    route:
      cluster: main
      request_mirror_policies:
      - cluster: m1
        runtime_fraction: {default_value: {numerator: 2500, denominator: TEN_THOUSAND}}
      - cluster: m2
        runtime_fraction: {default_value: {numerator: 10000, denominator: MILLION}}
""",
    )
    shadows = envoy.config["routes"][0]["shadows"]
    assert [(s["backend"], s["percent"]) for s in shadows] == [
        ("m1-mirror", 25.0),
        ("m2-mirror", 1.0),
    ]


@pytest.mark.parametrize(
    ("replace", "path", "want"),
    [
        ("/", "/api/x", "/x"),
        ("/", "/api", "/"),
        ("/v2", "/api/x", "/v2/x"),
        ("/v2/", "/api", "/v2"),
    ],
)
def test_gateway_replace_prefix_match_on_the_mirror(
    tmp_path: Any, replace: str, path: str, want: str
) -> None:
    import re

    loaded = translate(
        tmp_path,
        "r.yaml",
        f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: n}}
spec:
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        path: {{type: ReplacePrefixMatch, replacePrefixMatch: "{replace}"}}
    - {{type: RequestMirror, requestMirror: {{backendRef: {{name: m, port: 80}}}}}}
    backendRefs: [{{name: api, port: 80}}]
""",
    )
    rw = loaded.config["routes"][0]["shadows"][0]["rewrite_path"]
    assert re.sub(rw["regex"], rw["replacement"], path, count=1) == want
