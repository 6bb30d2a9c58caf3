"""The comparison engine's pure parts: lifting, paths, modes, ignore rules, unordered arrays,
noise classification and Diffy's thresholds. No backend is involved: these are functions of two
or three captured answers (the store and migration tests run the same code on real traffic).
"""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import settings as settings_h
from hypothesis import strategies as st

from shadowlane.compare import (
    Captured,
    CompareJob,
    CompareSettings,
    Multiset,
    PathMatcher,
    compile_settings,
    diff,
    evaluate,
    lift,
    same,
)
from shadowlane.compare.diff import _MISSING, EXAMPLE_VALUES, _json_value, values_of
from shadowlane.compare.engine import identical_answers
from shadowlane.compare.paths import key_segment
from shadowlane.config import CompareConfig, RouteCompare, ShadowCompare, parse_config


def answer(
    body: Any = None,
    *,
    status: int = 200,
    headers: list[tuple[str, str]] | None = None,
    raw: bytes | None = None,
    ctype: str | None = "application/json",
    truncated: bool = False,
    failure: str = "",
    seconds: float = 0.01,
) -> Captured:
    hs = [(k.lower().encode(), v.encode()) for k, v in (headers or [])]
    if ctype is not None:
        hs.insert(0, (b"content-type", ctype.encode()))
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else b"")
    return Captured(status, hs, data, truncated, seconds, failure)


def settings(**kw: Any) -> CompareSettings:
    compare = CompareConfig(**{k: kw.pop(k) for k in ("ignore_headers",) if k in kw})
    route = RouteCompare(ignore=kw.pop("route_ignore", []))
    return compile_settings(ShadowCompare(**kw), route, compare)


def paths(a: Captured, b: Captured, **kw: Any) -> list[str]:
    s = settings(**kw)
    return diff(lift(a, s), lift(b, s), s)


# ---------------------------------------------------------------------------------------------
# Lifting


def test_lift_status_headers_and_json_paths() -> None:
    s = settings()
    doc = {"hits": {"total": {"value": 2}, "hits": [{"id": 1}, {"id": 2}]}, "empty": {}, "l": []}
    lifted = lift(
        answer(
            doc,
            headers=[("X-Api", "1"), ("Vary", "a"), ("vary", "b"), ("Date", "x"), ("Server", "y")],
        ),
        s,
    )
    assert lifted.kind == "json"
    assert lifted.fields == {
        "status": 200,
        "headers.content-type": "application/json",
        "headers.x-api": "1",
        "headers.vary": "a, b",  # multi-valued headers joined in order
        "body.hits.total.value": 2,
        "body.hits.hits[0].id": 1,
        "body.hits.hits[1].id": 2,
        "body.empty": {},
        "body.l": [],
    }  # date and server are ignored by default


def test_lift_top_level_array_and_quoted_keys() -> None:
    lifted = lift(answer([{"a.b": 1, "": 2, 'q"': 3}]), settings())
    assert set(lifted.fields) >= {'body[0]["a.b"]', 'body[0][""]', 'body[0]["q\\""]'}
    assert key_segment("plain-key_1") == ".plain-key_1"


def test_lift_json_by_plus_json_and_by_sniffing() -> None:
    s = settings()
    assert lift(answer({"a": 1}, ctype="application/problem+json"), s).kind == "json"
    assert lift(answer(raw=b'  {"a": 1}', ctype="text/plain"), s).fields["body.a"] == 1
    text = lift(answer(raw=b"hello", ctype="text/plain"), s)
    assert text.kind == "text" and text.fields["body"] == b"hello"
    # a JSON content type with a body that does not parse is compared as text
    broken = lift(answer(raw=b'{"a": ', ctype="application/json"), s)
    assert broken.kind == "text" and broken.fields["body"] == b'{"a": '


def test_lift_undoes_gzip_and_deflate() -> None:
    s = settings()
    body = orjson.dumps({"a": [1, 2]})
    for enc, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        lifted = lift(answer(raw=data, headers=[("Content-Encoding", enc)]), s)
        assert lifted.fields["body.a[1]"] == 2, enc


def test_gzip_vs_plain_compares_by_content() -> None:
    body = orjson.dumps({"a": 1})
    plain = answer(raw=body)
    zipped = answer(raw=gzip.compress(body), headers=[("Content-Encoding", "gzip")])
    assert paths(plain, zipped) == ["headers.content-encoding"]


def test_json_vs_text_body_is_one_difference_on_body() -> None:
    html = answer(raw=b"<html>404</html>", ctype="text/html", status=404)
    js = answer({"slides": [1, 2, 3]})
    assert paths(html, js) == ["body", "headers.content-type", "status"]


# ---------------------------------------------------------------------------------------------
# Modes


def test_strict_both_ways() -> None:
    a = answer({"a": 1, "b": 2})
    assert paths(a, answer({"a": 1, "b": 2})) == []
    assert paths(a, answer({"a": 1, "b": 3})) == ["body.b"]
    assert paths(a, answer({"a": 1})) == ["body.b"]
    assert paths(a, answer({"a": 1, "b": 2, "c": 0})) == ["body.c"]
    assert paths(a, answer({"a": 1, "b": 2}, headers=[("x-new", "1")])) == ["headers.x-new"]


def test_subset_allows_added_paths_only() -> None:
    a = answer({"a": 1, "b": {"c": 2}})
    assert paths(a, answer({"a": 1, "b": {"c": 2, "d": 3}, "e": []}), mode="subset") == []
    assert paths(a, answer({"a": 1, "b": {"c": 2}}, headers=[("x", "1")]), mode="subset") == []
    assert paths(a, answer({"a": 2, "b": {"c": 2}}), mode="subset") == ["body.a"]
    assert paths(a, answer({"b": {"c": 2}}), mode="subset") == ["body.a"]


def test_schema_compares_shape_and_types_not_values() -> None:
    a = answer({"id": 1, "name": "x", "tags": ["a", "b"], "items": [{"n": 1}]})
    same_shape = answer({"id": 9, "name": "y", "tags": ["c"], "items": [{"n": 5}, {"n": 6}]})
    assert paths(a, same_shape, mode="schema") == []
    changed = answer({"id": "9", "name": "y", "tags": [], "items": [{"n": 5, "m": True}]})
    # id became a string, items gained a key; an empty tags array says nothing about elements
    assert paths(a, changed, mode="schema") == ["body.id", "body.items[*].m"]
    # status is still compared by value: a 500 is never "the same shape"
    assert paths(a, answer({"id": 1}, status=500), mode="schema") == [
        "body.items",
        "body.items[*].n",
        "body.name",
        "body.tags",
        "body.tags[*]",
        "status",
    ]


def test_numbers_by_value_but_bools_and_containers_by_type() -> None:
    assert same(1, 1.0)
    assert not same(True, 1)
    assert not same({}, [])
    assert not same(None, 0)
    assert paths(answer({"a": 1}), answer({"a": 1.0})) == []
    assert paths(answer({"a": 1}), answer({"a": True})) == ["body.a"]


# ---------------------------------------------------------------------------------------------
# Ignore rules


def test_ignore_wildcards() -> None:
    a = answer(
        {"took": 3, "hits": {"hits": [{"_id": "a", "_score": 1.5}, {"_id": "b", "_score": 0.2}]}},
        headers=[("X-Trace-Id", "1")],
    )
    b = answer(
        {"took": 7, "hits": {"hits": [{"_id": "a", "_score": 2.5}, {"_id": "b", "_score": 0.1}]}},
        headers=[("X-Trace-Id", "2")],
    )
    assert paths(a, b) == [
        "body.hits.hits[0]._score",
        "body.hits.hits[1]._score",
        "body.took",
        "headers.x-trace-id",
    ]
    assert paths(a, b, ignore=["body.took", "body.hits.hits[*]._score", "headers.x-trace-id"]) == []
    assert paths(a, b, ignore=["body.took", "**._score", "headers.x-*"]) == []
    assert paths(a, b, ignore=["body.hits.hits[0]._score"]) == [
        "body.hits.hits[1]._score",
        "body.took",
        "headers.x-trace-id",
    ]


def test_ignore_covers_the_subtree_and_star_is_one_key() -> None:
    a = answer({"meta": {"took": 1, "node": "a"}, "data": {"x": {"ts": 1}, "y": {"ts": 2}}})
    b = answer({"meta": {"took": 2, "node": "b"}, "data": {"x": {"ts": 3}, "y": {"ts": 4}}})
    assert paths(a, b, ignore=["body.meta", "body.data.*.ts"]) == []
    # `*` is one key: body.*.ts does not reach body.data.x.ts, `**` does
    assert paths(a, b, ignore=["body.meta", "body.*.ts"]) == ["body.data.x.ts", "body.data.y.ts"]
    assert paths(a, b, ignore=["body.meta", "body.**.ts"]) == []
    # a rule on a path does not ignore a longer key that merely starts the same way
    c = answer({"meta": 1, "metadata": 1})
    d = answer({"meta": 2, "metadata": 2})
    assert paths(c, d, ignore=["body.meta"]) == ["body.metadata"]


def test_ignore_rules_merge_global_route_shadow() -> None:
    cfg = parse_config(
        """
backends: {a: {endpoints: [http://127.0.0.1:1]}, b: {endpoints: [http://127.0.0.1:2]}}
routes:
  - name: r
    backend: a
    compare: {ignore: [body.r]}
    shadows:
      - backend: b
        compare: {ignore: [body.s], ignore_headers: [x-extra]}
compare:
  ignore: [body.g]
"""
    )
    route = cfg.routes[0]
    s = compile_settings(route.shadows[0], route, cfg.compare)
    assert s.ignore.patterns == ("body.g", "body.r", "body.s")
    assert "x-extra" in s.ignore_headers and "date" in s.ignore_headers
    a = answer({"g": 1, "r": 1, "s": 1, "k": 1}, headers=[("x-extra", "1")])
    b = answer({"g": 2, "r": 2, "s": 2, "k": 1}, headers=[("x-extra", "2")])
    assert diff(lift(a, s), lift(b, s), s) == []


def test_ignore_headers_replaces_default_list() -> None:
    a = answer({}, headers=[("Date", "1"), ("Server", "a")])
    b = answer({}, headers=[("Date", "2"), ("Server", "b")])
    assert paths(a, b) == []
    assert paths(a, b, ignore_headers=["server"]) == ["headers.date"]


def test_ignoring_body_ignores_a_text_body() -> None:
    a = answer(raw=b"one", ctype="text/plain")
    b = answer(raw=b"two", ctype="text/plain")
    assert paths(a, b) == ["body"]
    assert paths(a, b, ignore=["body"]) == []


def test_path_matcher_edge_cases() -> None:
    m = PathMatcher(["body.items[*].id", "**.secret", "headers.x-*"], subtree=True)
    assert m.matches("body.items[12].id")
    assert m.matches("body.items[12].id.deep")
    assert not m.matches("body.items.id")
    assert m.matches("body.a.b[3].secret")
    assert m.matches("headers.x-anything")
    assert not m.matches("headers.y-x")
    exact = PathMatcher(["body.items"], subtree=False)
    assert exact.matches("body.items") and not exact.matches("body.items[0]")
    with pytest.raises(ValueError):
        PathMatcher(["[0].a"], subtree=True)


# ---------------------------------------------------------------------------------------------
# Unordered arrays


def test_unordered_arrays_are_multisets() -> None:
    a = answer({"items": [{"id": 1, "n": "a"}, {"id": 2, "n": "b"}, {"id": 2, "n": "b"}]})
    shuffled = answer({"items": [{"id": 2, "n": "b"}, {"id": 1, "n": "a"}, {"id": 2, "n": "b"}]})
    assert paths(a, shuffled) != []  # by index, order matters
    assert paths(a, shuffled, unordered=["body.items"]) == []
    # a multiset, not a set: the duplicate counts
    fewer = answer({"items": [{"id": 2, "n": "b"}, {"id": 1, "n": "a"}]})
    assert paths(a, fewer, unordered=["body.items"]) == ["body.items"]
    changed = answer({"items": [{"id": 2, "n": "b"}, {"id": 1, "n": "X"}, {"id": 2, "n": "b"}]})
    # the array path itself is reported, not an index
    assert paths(a, changed, unordered=["body.items"]) == ["body.items"]
    lifted = lift(a, settings(unordered=["body.items"]))
    assert isinstance(lifted.fields["body.items"], Multiset)


def test_unordered_applies_ignore_rules_inside_elements() -> None:
    a = answer({"hits": [{"id": 1, "_score": 0.1}, {"id": 2, "_score": 0.9}]})
    b = answer({"hits": [{"id": 2, "_score": 0.3}, {"id": 1, "_score": 0.4}]})
    assert paths(a, b, unordered=["body.hits"]) == ["body.hits"]
    assert paths(a, b, unordered=["body.hits"], ignore=["body.hits[*]._score"]) == []


def test_unordered_nested_wildcard_paths() -> None:
    a = answer({"orders": [{"lines": [1, 2, 3]}, {"lines": ["x", "y"]}]})
    b = answer({"orders": [{"lines": [3, 1, 2]}, {"lines": ["y", "x"]}]})
    assert paths(a, b, unordered=["body.orders[*].lines"]) == []


# ---------------------------------------------------------------------------------------------
# Truncation and failures


def test_truncated_bodies_compare_what_was_captured() -> None:
    big = b"x" * 100
    a = answer(raw=big[:50], ctype="text/plain", truncated=True)
    b = answer(raw=big[:50], ctype="text/plain", truncated=True)
    la = lift(a, settings())
    assert la.truncated and la.kind == "text"
    assert paths(a, b) == []
    # a cut JSON body cannot be parsed: both sides fall back to text and compare the prefix
    doc = orjson.dumps({"a": list(range(100))})
    ja = answer(raw=doc[:40], truncated=True)
    jb = answer(raw=doc[:40], truncated=True)
    assert paths(ja, jb) == []
    jc = answer(raw=doc[:39] + b"9", truncated=True)
    assert paths(ja, jc) == ["body"]


def test_failed_answer_is_a_difference_on_status() -> None:
    ok = answer({"a": 1})
    assert paths(ok, answer(failure="timeout")) == ["status"]
    assert paths(answer(failure="error"), ok) == ["status"]
    assert paths(answer(failure="error"), answer(failure="error")) == []
    assert lift(answer(failure="timeout"), settings()).fields == {"status": "failed: timeout"}


# ---------------------------------------------------------------------------------------------
# Noise classification per job


def job(primary: Captured, candidate: Captured, secondary: Captured | None = None) -> CompareJob:
    return CompareJob("r", "t", "rid", "GET", "/x", b"", primary, candidate, secondary, settings())


@pytest.mark.parametrize("mode", ["strict", "subset", "schema"])
def test_identical_answers_shortcut_agrees_with_lifting(mode: str) -> None:
    """The comparator decides byte-identical answers without lifting them (`identical_answers`,
    in submit); every case here is also decided by the full path (lift + diff), and the two
    must agree: the shortcut is taken only for answers that lifting finds equal."""
    s = settings(mode=mode)
    date = [("date", "Mon, 01 Jan 2024 00:00:00 GMT")]
    other_date = [("date", "Tue, 02 Jan 2024 00:00:00 GMT")]
    p = answer({"a": [1, 2]}, headers=[*date, ("x-v", "1")])
    cases = [
        (answer({"a": [1, 2]}, headers=[*date, ("x-v", "1")]), True),  # identical
        (answer({"a": [1, 2]}, headers=[*other_date, ("x-v", "1")]), True),  # ignored header
        (answer({"a": [1, 2]}, headers=[*date, ("x-v", "2")]), False),  # a real header
        (answer({"a": [2, 1]}, headers=[*date, ("x-v", "1")]), False),  # body bytes
        (answer({"a": [1, 2]}, status=201, headers=[*date, ("x-v", "1")]), False),
        (
            answer(raw=orjson.dumps({"a": [1, 2]}), truncated=True, headers=[*date, ("x-v", "1")]),
            False,
        ),
    ]
    for candidate, shortcut in cases:
        j = CompareJob("r", "t", "rid", "GET", "/x", b"", p, candidate, None, s)
        out = evaluate(j)
        full = diff(lift(p, s), lift(candidate, s), s)
        assert out.result == ("match" if not full else "diff")
        assert out.differing == full
        # the shortcut is taken exactly when the raw answers are the same, and never where
        # lifting finds a difference
        assert identical_answers(j, s) == shortcut
        assert not (shortcut and full)


def test_result_match_noise_diff() -> None:
    p = answer({"id": 1, "uuid": "a", "v": 1})
    assert evaluate(job(p, answer({"id": 1, "uuid": "a", "v": 1}))).result == "match"
    # uuid differs in every answer, including the secondary's: noise
    out = evaluate(
        job(p, answer({"id": 1, "uuid": "b", "v": 1}), answer({"id": 1, "uuid": "c", "v": 1}))
    )
    assert (out.result, out.differing, out.noise) == ("noise", ["body.uuid"], ["body.uuid"])
    # v really changed: diff, even though uuid is noise
    out = evaluate(
        job(p, answer({"id": 1, "uuid": "b", "v": 2}), answer({"id": 1, "uuid": "c", "v": 1}))
    )
    assert (out.result, out.differing, out.noise) == (
        "diff",
        ["body.uuid", "body.v"],
        ["body.uuid"],
    )
    # without a secondary nothing is known to be noise
    assert evaluate(job(p, answer({"id": 1, "uuid": "b", "v": 1}))).result == "diff"
    # a failed secondary gives no noise information
    out = evaluate(job(p, answer({"id": 1, "uuid": "b", "v": 1}), answer(failure="timeout")))
    assert (out.result, out.noise) == ("diff", [])


def test_job_settings_default_when_absent() -> None:
    j = CompareJob("r", "t", "rid", "GET", "/", b"", answer({"a": 1}), answer({"a": 2}), None)
    assert evaluate(j).differing == ["body.a"]


# ---------------------------------------------------------------------------------------------
# The fast JSON diff agrees with flattening both sides and comparing the maps


def _random_doc(rng: Any, depth: int = 0) -> Any:
    kind = rng.random()
    if depth > 3 or kind < 0.35:
        return rng.choice([0, 1, 1.0, True, False, None, "a", "b", "", 2.5, [], {}])
    if kind < 0.7:
        return {rng.choice("abcdef"): _random_doc(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return [_random_doc(rng, depth + 1) for _ in range(rng.randint(0, 4))]


def _mutate(rng: Any, doc: Any) -> Any:
    if isinstance(doc, dict) and doc and rng.random() < 0.8:
        out = dict(doc)
        key = rng.choice(list(out))
        roll = rng.random()
        if roll < 0.2:
            del out[key]
        elif roll < 0.4:
            out[rng.choice("uvwxyz")] = _random_doc(rng, 2)
        else:
            out[key] = _mutate(rng, out[key])
        return out
    if isinstance(doc, list) and doc and rng.random() < 0.8:
        out_list = list(doc)
        roll = rng.random()
        if roll < 0.2:
            out_list.pop()
        elif roll < 0.4:
            out_list.reverse()
        else:
            i = rng.randrange(len(out_list))
            out_list[i] = _mutate(rng, out_list[i])
        return out_list
    return _random_doc(rng, 2)


@pytest.mark.parametrize("mode", ["strict", "subset"])
def test_fast_json_diff_matches_flattened_diff(mode: str) -> None:
    import random

    from shadowlane.compare.diff import _diff_maps

    rng = random.Random(1234)
    rules = [
        {},
        {"ignore": ["body.a", "body.*.b", "**.c"]},
        {"unordered": ["body.d", "body.*.e", "body[*]"]},
        {"ignore": ["body[0]", "body.f[*].a"], "unordered": ["body.a", "**.b"]},
    ]
    for _ in range(1500):
        a = _random_doc(rng)
        b = _mutate(rng, a) if rng.random() < 0.8 else _random_doc(rng)
        s = settings(mode=mode, **rng.choice(rules))
        la, lb = lift(answer(raw=orjson.dumps(a)), s), lift(answer(raw=orjson.dumps(b)), s)
        fast = diff(la, lb, s)
        slow: list[str] = []
        _diff_maps(la.head, lb.head, mode, la, lb, slow)
        if la.body != lb.body:
            _diff_maps(la.body_fields(), lb.body_fields(), mode, la, lb, slow)
        assert fast == sorted(set(slow)), (a, b, s.ignore, s.unordered)


def test_path_matchers_travel_pickled_to_a_comparison_child() -> None:
    """Settings go to the comparison children pickled; a compiled PathMatcher has no instance
    dict for pickle's default, so it says how to rebuild itself (from its rules)."""
    import pickle

    from shadowlane.compare.paths import PathMatcher

    m = PathMatcher(["body.a.*", "headers.date"], subtree=True)
    back = pickle.loads(pickle.dumps(m))
    assert back.patterns == m.patterns and back.subtree is True
    assert back.matches("body.a.b.c") and back.matches("headers.date")
    assert not back.matches("body.b")
    empty = pickle.loads(pickle.dumps(PathMatcher([], subtree=False)))
    assert not empty and not empty.matches("body")


# ---------------------------------------------------------------------------------------------
# Example values: only the differing fields are lifted, and they are the fields' values

_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=3)
)
_json_doc = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["a", "b", "c.d", "e[1]", "f"]), inner, max_size=4),
    ),
    max_leaves=20,
)


@settings_h(max_examples=300, deadline=None)
@given(
    _json_doc,
    _json_doc,
    st.sampled_from([{}, {"ignore": ["body.a"]}, {"unordered": ["body.b"]}, {"mode": "subset"}]),
)
def test_example_values_are_the_lifted_fields_values(a: Any, b: Any, kw: dict[str, Any]) -> None:
    """`values_of` lifts only the subtrees on the way to the differing paths
    (`Lifted.fields_at`); what it shows must be exactly what lifting both whole answers
    gives for those paths, under ignore rules, unordered arrays and every shape of JSON."""
    s = settings(**kw)
    pa, pb = lift(answer(a), s), lift(answer(b), s)
    differing = diff(pa, pb, s)
    whole_a, whole_b = lift(answer(a), s), lift(answer(b), s)
    expected = {}  # what the example showed when it lifted both whole answers
    for path in differing[:EXAMPLE_VALUES]:
        va, vb = whole_a.fields.get(path, _MISSING), whole_b.fields.get(path, _MISSING)
        if path == "body" and whole_a.kind != whole_b.kind:
            va, vb = whole_a.body, whole_b.body
        expected[path] = [_json_value(va), _json_value(vb)]
    shown = values_of(pa, pb, differing)
    # serialised: `==` alone would take true for 1 and 1.0 for 1
    assert orjson.dumps(shown) == orjson.dumps(expected)
