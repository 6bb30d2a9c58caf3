"""Routing: each predicate on real Request objects, first-match order, exact weighted splits."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from shadowlane.config import MatchConfig, RouteConfig, ShadowMatch
from shadowlane.routing import Route, RouteTable, SmoothWeighted, compile_match
from shadowlane.routing.predicates import compile_predicates
from shadowlane.wire.messages import Request


def req(
    target: str = "/",
    *,
    method: str = "GET",
    host: str = "api.example.com",
    headers: dict[str, str] | None = None,
) -> Request:
    pairs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request(method, target.encode(), "1.1", pairs, host, "10.0.0.1", True)


def route(match: dict[str, Any] | None = None, **kw: Any) -> Route:
    data: dict[str, Any] = {"name": kw.pop("name", "r"), "match": match or {}}
    if "backends" not in kw:
        data["backend"] = "a"
    data.update(kw)
    return Route(RouteConfig.model_validate(data))


def test_empty_match_matches_everything() -> None:
    r = route()
    assert r.matches(req("/anything", method="DELETE", host=""))


def test_host_exact_is_case_insensitive() -> None:
    r = route({"host": "API.example.com"})
    assert r.matches(req(host="api.example.com"))
    assert not r.matches(req(host="www.example.com"))
    assert not r.matches(req(host="api.example.com.evil"))


def test_host_wildcard_needs_a_label_before_the_suffix() -> None:
    r = route({"host": "*.example.com"})
    assert r.matches(req(host="a.example.com"))
    assert r.matches(req(host="a.b.example.com"))
    assert not r.matches(req(host="example.com"))
    assert not r.matches(req(host="badexample.com"))


def test_path_exact() -> None:
    r = route({"path": "/health"})
    assert r.matches(req("/health"))
    assert r.matches(req("/health?verbose=1"))  # the query is not part of the path
    assert not r.matches(req("/health/"))
    assert not r.matches(req("/healthz"))


def test_path_prefix_is_a_plain_string_prefix() -> None:
    r = route({"path_prefix": "/orders"})
    assert r.matches(req("/orders"))
    assert r.matches(req("/orders/1"))
    assert r.matches(req("/orders-old"))  # like Envoy's prefix: not segment-aware
    assert not r.matches(req("/order"))
    assert not r.matches(req("/v1/orders"))


def test_path_regex_searches_unless_anchored() -> None:
    loose = route({"path_regex": "[0-9]+"})
    assert loose.matches(req("/items/42"))
    assert not loose.matches(req("/items/x"))
    anchored = route({"path_regex": "^/items/[0-9]+$"})
    assert anchored.matches(req("/items/42"))
    assert not anchored.matches(req("/v2/items/42"))
    assert not anchored.matches(req("/items/42/reviews"))


def test_methods() -> None:
    r = route({"methods": ["get", "HEAD"]})
    assert r.matches(req(method="GET"))
    assert r.matches(req(method="HEAD"))
    assert not r.matches(req(method="POST"))


def test_headers_exact_value_names_case_insensitive() -> None:
    r = route({"headers": {"X-Tenant": "acme"}})
    assert r.matches(req(headers={"X-Tenant": "acme"}))
    assert not r.matches(req(headers={"x-tenant": "ACME"}))  # values are exact
    assert not r.matches(req(headers={"x-tenant-id": "acme"}))
    assert not r.matches(req())


def test_query_exact_value() -> None:
    r = route({"query": {"debug": "1", "v": ""}})
    assert r.matches(req("/?debug=1&v="))
    assert r.matches(req("/x?v=&debug=1&other=2"))
    assert not r.matches(req("/?debug=1"))
    assert not r.matches(req("/?debug=2&v="))
    assert not r.matches(req("/"))


def test_all_predicates_must_hold() -> None:
    r = route(
        {
            "host": "*.example.com",
            "path_prefix": "/orders",
            "path_regex": "/[0-9]+$",
            "methods": ["PUT"],
            "headers": {"x-tenant": "acme"},
            "query": {"dry": "1"},
        }
    )
    good: dict[str, Any] = {
        "method": "PUT",
        "host": "api.example.com",
        "headers": {"x-tenant": "acme"},
    }
    assert r.matches(req("/orders/7?dry=1", **good))
    assert not r.matches(req("/orders/7?dry=0", **good))
    assert not r.matches(req("/orders/x?dry=1", **good))
    assert not r.matches(req("/orders/7?dry=1", **{**good, "method": "GET"}))
    assert not r.matches(req("/orders/7?dry=1", **{**good, "host": "example.org"}))
    assert not r.matches(req("/orders/7?dry=1", **{**good, "headers": {}}))


def test_cheap_predicates_run_first() -> None:
    """Method, then headers, then the query: a method mismatch short-circuits before headers are
    scanned or the query string parsed. Each request below fails exactly one predicate, and its
    position in the compiled chain is the order it runs in."""
    preds = compile_predicates(MatchConfig(methods=["POST"], query={"a": "1"}, headers={"x": "1"}))

    def failing(r: Request) -> list[int]:
        return [i for i, pred in enumerate(preds) if not pred(r)]

    assert failing(req("/x?a=1", method="POST", headers={"x": "1"})) == []
    assert failing(req("/x?a=1", method="GET", headers={"x": "1"})) == [0]
    assert failing(req("/x?a=1", method="POST")) == [1]
    assert failing(req("/x?a=2", method="POST", headers={"x": "1"})) == [2]
    r = route({"methods": ["POST"], "query": {"a": "1"}, "headers": {"x": "1"}})
    assert not r.matches(req("/x?a=1", method="GET", headers={"x": "1"}))


def test_compile_match_for_shadow_blocks() -> None:
    assert compile_match(None)(req())
    pred = compile_match(ShadowMatch(methods=["GET"], path_prefix="/a", headers={"x-b": "1"}))
    assert pred(req("/a/1", headers={"x-b": "1"}))
    assert not pred(req("/a/1", method="POST", headers={"x-b": "1"}))
    assert not pred(req("/b", headers={"x-b": "1"}))
    assert not pred(req("/a/1"))
    assert compile_match(MatchConfig(path="/p"))(req("/p"))


def test_first_match_wins_in_config_order() -> None:
    configs = [
        RouteConfig(name="special", backend="s", match=MatchConfig(path="/orders/special")),
        RouteConfig(name="orders", backend="o", match=MatchConfig(path_prefix="/orders")),
        RouteConfig(name="catchall", backend="c"),
        RouteConfig(name="never", backend="n", match=MatchConfig(path="/orders/special")),
    ]
    table = RouteTable(configs)
    assert [r.name for r in table.routes] == ["special", "orders", "catchall", "never"]
    hit = table.match(req("/orders/special"))
    assert hit is not None and hit.name == "special"
    hit = table.match(req("/orders/1"))
    assert hit is not None and hit.name == "orders"
    hit = table.match(req("/other"))
    assert hit is not None and hit.name == "catchall"


def test_no_match_returns_none_and_get_by_name() -> None:
    table = RouteTable([RouteConfig(name="a", backend="x", match=MatchConfig(methods=["GET"]))])
    assert table.match(req(method="POST")) is None
    got = table.get("a")
    assert got is not None and got.config.backend == "x"
    assert table.get("b") is None


def test_duplicate_route_names_rejected_by_table() -> None:
    with pytest.raises(ValueError, match="duplicate route name 'a'"):
        RouteTable([RouteConfig(name="a", backend="x"), RouteConfig(name="a", backend="y")])


def test_single_backend_fast_path() -> None:
    r = route(backend="orders")
    assert {r.pick_backend() for _ in range(5)} == {"orders"}
    assert r.weights() == {"orders": 1}


def weighted(*legs: tuple[str, int]) -> Route:
    return route(backends=[{"backend": b, "weight": w} for b, w in legs])


def test_weighted_split_is_exact_per_cycle() -> None:
    r = weighted(("v1", 90), ("v2", 10))
    for _ in range(3):  # every window of 10 picks, not just the total
        assert Counter(r.pick_backend() for _ in range(10)) == {"v1": 9, "v2": 1}


def test_weighted_split_is_smooth() -> None:
    r = weighted(("a", 5), ("b", 1), ("c", 1))
    # nginx's documented sequence for weights 5,1,1
    assert [r.pick_backend() for _ in range(7)] == ["a", "a", "b", "a", "c", "a", "a"]


def test_zero_weight_gets_nothing() -> None:
    r = weighted(("old", 0), ("new", 100))
    assert {r.pick_backend() for _ in range(50)} == {"new"}


def test_set_weights_flips_and_writes_back() -> None:
    r = weighted(("v1", 90), ("v2", 10))
    r.pick_backend()
    r.set_weights({"v1": 1, "v2": 1})
    assert r.weights() == {"v1": 1, "v2": 1}
    assert [r.pick_backend() for _ in range(4)] == ["v1", "v2", "v1", "v2"]
    r.set_weights({"v2": 100})  # left out -> 0
    assert r.weights() == {"v1": 0, "v2": 100}
    assert {r.pick_backend() for _ in range(20)} == {"v2"}
    # the config stays as the file said (models are not written at run time)
    assert r.config.backends is not None
    assert [(w.backend, w.weight) for w in r.config.backends] == [("v1", 90), ("v2", 10)]


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"v3": 1}, r"unknown backend\(s\) 'v3' \(route has: v1, v2\)"),
        ({"v1": -1, "v2": 1}, "weight of 'v1' must be an int >= 0"),
        ({"v1": True}, "weight of 'v1' must be an int >= 0"),
        ({"v1": 0, "v2": 0}, "weights may not all be 0"),
        ({}, "weights may not all be 0"),
    ],
)
def test_set_weights_validation_leaves_route_unchanged(
    weights: dict[str, int], message: str
) -> None:
    r = weighted(("v1", 90), ("v2", 10))
    with pytest.raises(ValueError, match=message):
        r.set_weights(weights)
    assert r.weights() == {"v1": 90, "v2": 10}
    assert Counter(r.pick_backend() for _ in range(10)) == {"v1": 9, "v2": 1}


def test_set_weights_on_single_backend_route() -> None:
    r = route(backend="only")
    r.set_weights({"only": 5})
    assert r.pick_backend() == "only"
    with pytest.raises(ValueError, match="unknown backend"):
        r.set_weights({"other": 1})


def test_smooth_weighted_rejects_bad_weights() -> None:
    with pytest.raises(ValueError):
        SmoothWeighted([])
    with pytest.raises(ValueError):
        SmoothWeighted([("a", 0)])
