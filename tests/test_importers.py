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
def test_gateway_replace_prefix_match_on_the_route(
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
    (route,) = loaded.config["routes"]
    # the route's rewrite: the primary is sent it, and the mirror copy starts from it
    assert "rewrite_path" not in route["shadows"][0]
    rw = route["rewrite_path"]
    assert re.sub(rw["regex"], rw["replacement"], path, count=1) == want


def _notes(loaded: Any) -> list[str]:
    return [str(n) for n in loaded.notes]


def test_envoy_rewrites_and_header_actions_go_on_the_route(tmp_path: Any) -> None:
    loaded = translate(
        tmp_path,
        "routes.yaml",
        """
name: rc
request_headers_to_add:
- header: {key: x-rc, value: "1"}
virtual_hosts:
- name: vh
  domains: ["*"]
  routes:
  - match: {prefix: /a/}
    request_headers_to_add:
    - {header: {key: x-set, value: s}, append: false}
    - {header: {key: x-app, value: a}, append_action: APPEND_IF_EXISTS_OR_ADD}
    - {header: {key: x-ow, value: o}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
    - {header: {key: x-absent, value: z}, append_action: ADD_IF_ABSENT}
    - {header: {key: x-ip, value: "%DOWNSTREAM_REMOTE_ADDRESS%"}}
    request_headers_to_remove: [x-drop]
    route:
      cluster: a
      prefix_rewrite: /
      auto_host_rewrite: true
      request_mirror_policies: [{cluster: m}]
  - match: {safe_regex: {regex: "/b/[0-9]+"}}
    route:
      cluster: b
      regex_rewrite: {pattern: {regex: "[0-9]+"}, substitution: "n"}
      host_rewrite_literal: b.internal
  - match: {path_separated_prefix: /c}
    route: {cluster: c, prefix_rewrite: /v2/c}
""",
    )
    a, b, c = loaded.config["routes"]
    assert a["rewrite_path"] == {"prefix": "/"}
    assert a["host"] == "backend"
    assert a["headers"] == {
        "set": {"x-set": "s", "x-ow": "o"},
        "add": {"x-rc": "1", "x-app": "a", "x-ip": "%DOWNSTREAM_REMOTE_ADDRESS%"},
        "remove": ["x-drop"],
    }
    assert a["shadows"] == [{"backend": "m-mirror", "percent": 100.0}]  # nothing of its own
    assert b["rewrite_path"] == {"regex": "[0-9]+", "replacement": "n"}
    assert b["host"] == "b.internal"
    assert c["rewrite_path"] == {"regex": "^/c", "replacement": "/v2/c"}
    notes = _notes(loaded)
    assert any("append_action: ADD_IF_ABSENT is not translated" in n for n in notes)
    assert any(
        "request_headers_to_add[4].header.value: Envoy's command operators" in n for n in notes
    )
    assert any("routes[1].route.regex_rewrite: the peer replaces every match" in n for n in notes)
    assert not any("primary" in n for n in notes)


def test_istio_uri_rewrite_follows_the_match_kind(tmp_path: Any) -> None:
    loaded = translate(
        tmp_path,
        "vs.yaml",
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: n}
spec:
  hosts: ["*"]
  http:
  - match: [{uri: {prefix: /p/}}, {uri: {exact: /e}}, {uri: {regex: "/r/.*"}}]
    rewrite: {uri: /new/}
    route: [{destination: {host: a}}]
  - rewrite: {uriRegexRewrite: {match: "^/x/(.*)$", rewrite: '/y/\\1'}, authority: a.internal}
    headers: {request: {add: {x-a: "1"}, remove: [x-b]}}
    route: [{destination: {host: b}}]
""",
    )
    p, e, r, rest = loaded.config["routes"]
    assert p["rewrite_path"] == {"prefix": "/new/"}
    assert e["rewrite_path"] == {"prefix": "/new/"}  # the whole exact path swapped
    assert r["rewrite_path"] == {"regex": "^.*$", "replacement": "/new/"}
    assert rest["rewrite_path"] == {"regex": "^/x/(.*)$", "replacement": "/y/\\1"}
    assert rest["host"] == "a.internal"
    assert rest["headers"] == {"add": {"x-a": "1"}, "remove": ["x-b"]}
    assert _notes(loaded) == []


def test_emissary_rewrite_forms(tmp_path: Any) -> None:
    loaded = translate(
        tmp_path,
        "m.yaml",
        """
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata: {name: plain, namespace: n}
spec: {prefix: /plain/, service: a, host_rewrite: a.internal,
       add_request_headers: {x-a: "1", x-s: {value: "2", append: false}},
       remove_request_headers: [x-r]}
---
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata: {name: norw, namespace: n}
spec: {prefix: /off/, rewrite: "", service: b}
---
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata: {name: rx, namespace: n}
spec: {prefix: "/rx/[0-9]+", prefix_regex: true, rewrite: /number, service: c}
""",
    )
    by = {r["name"]: r for r in loaded.config["routes"]}
    assert by["plain"]["rewrite_path"] == {"prefix": "/"}
    assert by["plain"]["host"] == "a.internal"
    assert by["plain"]["headers"] == {"set": {"x-s": "2"}, "add": {"x-a": "1"}, "remove": ["x-r"]}
    assert "rewrite_path" not in by["norw"]
    assert by["rx"]["rewrite_path"] == {"regex": "^.*$", "replacement": "/number"}
    assert _notes(loaded) == []


def test_gloo_rewrites(tmp_path: Any) -> None:
    loaded = translate(
        tmp_path,
        "vs.yaml",
        """
apiVersion: gateway.solo.io/v1
kind: VirtualService
metadata: {name: vs, namespace: gloo-system}
spec:
  virtualHost:
    domains: ['*']
    routes:
    - matchers: [{prefix: /a}]
      routeAction: {single: {upstream: {name: a}}}
      options:
        regexRewrite: {pattern: {regex: "v1"}, substitution: "v2"}
        autoHostRewrite: true
        headerManipulation:
          requestHeadersToAdd: [{header: {key: x-s, value: s}, append: false}]
    - matchers: [{prefix: /}]
      routeAction: {single: {upstream: {name: b}}}
      options: {prefixRewrite: /root}
""",
    )
    a, b = loaded.config["routes"]
    assert a["rewrite_path"] == {"regex": "v1", "replacement": "v2"}
    assert a["host"] == "backend"
    assert a["headers"] == {"set": {"x-s": "s"}}
    # prefix `/` is every path, no path_prefix in the match: Envoy swaps the leading `/`
    assert b["rewrite_path"] == {"regex": "^/", "replacement": "/root"}
    assert [n for n in _notes(loaded) if "every match" in n] == [
        "VirtualService gloo-system/vs: spec.virtualHost.routes[0].options.regexRewrite: the "
        "peer replaces every match of this unanchored pattern; shadowlane replaces the first "
        "(anchor it with ^ to silence this)"
    ]


def test_skipper_filters_before_the_tee_are_the_routes_and_after_it_are_noted(
    tmp_path: Any,
) -> None:
    loaded = translate(
        tmp_path,
        "r.eskip",
        """
        a: Path("/a") -> setRequestHeader("Host", "a.internal") -> setPath("/x")
           -> tee("http://t:1") -> appendRequestHeader("X-Late", "1") -> "http://a:1";
        """,
    )
    (route,) = loaded.config["routes"]
    assert route["host"] == "a.internal"
    assert route["rewrite_path"] == {"regex": "^.*$", "replacement": "/x"}
    assert route["headers"] == {"add": {"x-late": "1"}}
    assert _notes(loaded) == [
        f"eskip {tmp_path / 'r.eskip'} route a: filters[3]: runs after the tee filter in Skipper, "
        "so its copies do not get it; here the copies start from the changed request (put it "
        "before the tee to match)"
    ]


def test_a_host_header_becomes_the_host_and_managed_headers_are_noted(tmp_path: Any) -> None:
    loaded = translate(
        tmp_path,
        "r.yaml",
        """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: n}
spec:
  rules:
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: Host, value: inner.example}, {name: Connection, value: close}]
        add: [{name: x-ok, value: "1"}]
        remove: [Content-Length]
    backendRefs: [{name: api, port: 80}]
""",
    )
    (route,) = loaded.config["routes"]
    assert route["host"] == "inner.example"
    assert route["headers"] == {"add": {"x-ok": "1"}}
    assert _notes(loaded) == [
        "HTTPRoute n/r: spec.rules[0].filters: header 'connection' is managed by shadowlane: "
        "not changed",
        "HTTPRoute n/r: spec.rules[0].filters: header 'content-length' is managed by "
        "shadowlane: not removed",
    ]
