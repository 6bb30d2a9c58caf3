"""gRPC answers in the comparison: status from grpc-status, trailers beside headers, protobuf
messages by field number (no schema) and by proto name (a descriptor set in the config).

Messages are built with classes generated at test time by the real protoc (grpcio-tools) from
tests/protos/compare_users.proto, framed as gRPC bodies, and run through the real engine: the
`Comparator` thread writing to a real SQLite store, `evaluate` for single decisions, and
`shadowlane report` over the store.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from shadowlane.compare import (
    Analysis,
    Captured,
    Comparator,
    CompareJob,
    CompareSettings,
    compile_settings,
    evaluate,
    lift,
)
from shadowlane.compare.protobuf import decode_raw
from shadowlane.config import ConfigError, GrpcCompare, ShadowCompare, parse_config
from shadowlane.report import render_report
from shadowlane.store import Store, open_store
from support.protoc import (
    CompiledProto,
    compile_proto,
    descriptor_set_without_imports,
    grpc_body,
)

GET_USER = "/shadowlane.test.users.Users/GetUser"
LIST_USERS = "/shadowlane.test.users.Users/ListUsers"
GRPC = [(b"content-type", b"application/grpc")]
OK = [(b"grpc-status", b"0")]
#: a GetUserRequest(id=7) as protoc's runtime writes it (field 1, varint 7)
GET_USER_7 = b"\x08\x07"


@pytest.fixture(scope="module")
def proto(tmp_path_factory: pytest.TempPathFactory) -> CompiledProto:
    return compile_proto("compare_users", tmp_path_factory.mktemp("protos"))


@pytest.fixture(scope="module")
def pb(proto: CompiledProto) -> ModuleType:
    return proto.module


def named(proto: CompiledProto, **extra: Any) -> CompareSettings:
    """Settings with the descriptor set, as `compare: {grpc: {descriptor_set: ...}}` gives."""
    return compile_settings(
        ShadowCompare(grpc=GrpcCompare(descriptor_set=str(proto.descriptor_set)), **extra)
    )


def user_response(pb: ModuleType, name: str = "Ada", **fields: Any) -> bytes:
    values: dict[str, Any] = {
        "id": 7,
        "display_name": name,
        "tags": ["a", "b"],
        "role": pb.ADMIN,
        "scores": {"x": 3},
        "avatar": b"\xff\x00",
        "balance": 1.5,
        "delta": -3,
        "address": pb.Address(city="Oslo", zip="0150"),
    }
    user = pb.User(**{**values, **fields})
    user.created.seconds = 1_700_000_000
    return bytes(pb.GetUserResponse(user=user, etag="e1").SerializeToString())


def answer(
    body: bytes,
    trailers: list[tuple[bytes, bytes]] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Captured:
    return Captured(
        200,
        list(GRPC if headers is None else headers),
        body,
        False,
        0.01,
        trailers=list(OK if trailers is None else trailers),
    )


def job(
    primary: Captured,
    candidate: Captured,
    settings: CompareSettings,
    i: int = 0,
    uri: str = GET_USER,
) -> CompareJob:
    return CompareJob(
        "users",
        "users-v2",
        f"r{i}",
        "POST",
        uri,
        grpc_body(GET_USER_7),
        primary,
        candidate,
        None,
        settings,
        ts=time.time(),
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path}/grpc.db")


def run_jobs(store: Store, jobs: list[CompareJob]) -> Comparator:
    comp = Comparator(store, None, 1000, flush_interval=0.05).start()
    for j in jobs:
        assert comp.submit(j)
    assert comp.wait_idle(20)
    assert comp.stop()
    assert comp.stats["errors"] == 0
    return comp


# ---------------------------------------------------------------------------------------------
# Through the engine and the store


def test_equal_messages_match(store: Store, pb: ModuleType, proto: CompiledProto) -> None:
    # the same message in other bytes: its fields in another order on the wire (any order is
    # valid protobuf), so the bodies are not byte-identical and the messages must be decoded
    user = pb.GetUserResponse(user=pb.GetUserResponse.FromString(user_response(pb)).user)
    etag = pb.GetUserResponse(etag="e1")
    wire_a = user.SerializeToString() + etag.SerializeToString()
    wire_b = etag.SerializeToString() + user.SerializeToString()
    assert wire_a != wire_b and pb.GetUserResponse.FromString(wire_b) == (
        pb.GetUserResponse.FromString(user_response(pb))
    )
    primary, candidate = answer(grpc_body(wire_a)), answer(grpc_body(wire_b))
    for settings in (named(proto), compile_settings(ShadowCompare())):
        out = evaluate(job(primary, candidate, settings))
        assert out.result == "match" and out.differing == []
        assert out.primary.kind == "grpc" and "body[0].2" in lift(primary, CompareSettings()).fields
    settings = named(proto)
    comp = run_jobs(store, [job(primary, candidate, settings, i) for i in range(20)])
    assert comp.stats["compared"] == 20
    (row,) = store.totals()
    assert (row.compared, row.matched, row.differing) == (20, 20, 0)


def test_changed_field_by_number_without_descriptor(store: Store, pb: ModuleType) -> None:
    settings = compile_settings(ShadowCompare())
    primary = answer(grpc_body(user_response(pb, "Ada")))
    candidate = answer(grpc_body(user_response(pb, "Grace")))
    out = evaluate(job(primary, candidate, settings))
    # message 0, field 1 (user), field 2 (display_name)
    assert out.result == "diff" and out.differing == ["body[0].1.2"]
    run_jobs(store, [job(primary, candidate, settings, i) for i in range(10)])
    fields = {f["field"]: f for f in Analysis(store).fields("users", "users-v2")}
    assert fields["body[0].1.2"]["raw"] == 10 and fields["body[0].1.2"]["reported"]
    (example,) = store.examples("users", "users-v2", limit=1)
    assert example["candidate"]["values"]["body[0].1.2"] == ["Ada", "Grace"]


def test_changed_field_by_proto_name_with_descriptor(
    store: Store, pb: ModuleType, proto: CompiledProto
) -> None:
    settings = named(proto)
    primary = answer(grpc_body(user_response(pb, "Ada")))
    candidate = answer(grpc_body(user_response(pb, "Grace", tags=["c"])))
    out = evaluate(job(primary, candidate, settings))
    assert out.differing == [
        "body[0].user.display_name",
        "body[0].user.tags[0]",
        "body[0].user.tags[1]",
    ]
    run_jobs(store, [job(primary, candidate, settings, i) for i in range(10)])
    reported = [f["field"] for f in Analysis(store).fields("users", "users-v2") if f["reported"]]
    assert "body[0].user.display_name" in reported
    (example,) = store.examples("users", "users-v2", field="body[0].user.display_name", limit=1)
    assert example["candidate"]["values"]["body[0].user.display_name"] == ["Ada", "Grace"]
    # the request is shown decoded by its type (GetUserRequest), the answers by theirs
    assert orjson.loads(example["request_body"]) == [{"id": 7}]
    shown = orjson.loads(example["candidate"]["body"])
    assert shown[0]["user"]["display_name"] == "Grace"
    assert shown[0]["user"]["role"] == "ADMIN"


def test_ignore_rule_by_proto_name_silences_the_field(
    store: Store, pb: ModuleType, proto: CompiledProto
) -> None:
    settings = named(proto, ignore=["body[*].user.display_name"])
    primary = answer(grpc_body(user_response(pb, "Ada")))
    candidate = answer(grpc_body(user_response(pb, "Grace")))
    assert evaluate(job(primary, candidate, settings)).result == "match"
    # the same rule does nothing to another field: the comparison still sees the messages
    changed = answer(grpc_body(user_response(pb, "Grace", id=8)))
    assert evaluate(job(primary, changed, settings)).differing == ["body[0].user.id"]
    run_jobs(store, [job(primary, candidate, settings, i) for i in range(10)])
    (row,) = store.totals()
    assert (row.compared, row.matched) == (10, 10)
    assert store.field_counts() == []


def test_not_found_vs_ok_in_trailers_is_a_difference(
    store: Store, pb: ModuleType, proto: CompiledProto
) -> None:
    settings = named(proto)
    primary = answer(grpc_body(user_response(pb)))
    # trailers-only answer: the status is in the headers and there is no message
    not_found = answer(
        b"",
        trailers=[],
        headers=[*GRPC, (b"grpc-status", b"5"), (b"grpc-message", b"no%20such%20user")],
    )
    out = evaluate(job(primary, not_found, settings))
    assert "status.grpc" in out.differing and "status.grpc_message" in out.differing
    assert out.primary.fields["status.grpc"] == "OK"
    assert out.candidate.fields["status.grpc"] == "NOT_FOUND"
    assert out.candidate.fields["status.grpc_message"] == "no such user"
    # grpc-status is the status, not a header or a trailer as well
    assert not any("grpc-status" in p for p in (*out.primary.fields, *out.candidate.fields))
    run_jobs(store, [job(primary, not_found, settings, i) for i in range(10)])
    (example,) = store.examples("users", "users-v2", field="status.grpc", limit=1)
    assert example["candidate"]["values"]["status.grpc"] == ["OK", "NOT_FOUND"]
    # the stored answers keep the trailers beside the headers
    assert example["primary"]["trailers"] == {"grpc-status": "0"}
    assert example["candidate"]["headers"]["grpc-status"] == "5"
    assert "trailers" not in example["candidate"]  # a trailers-only answer has none


def test_equal_bodies_different_trailers_are_not_taken_for_a_match(store: Store) -> None:
    """The comparator's shortcut for byte-identical answers must look at the trailers too."""
    settings = compile_settings(ShadowCompare())
    deadline = answer(b"", trailers=[(b"grpc-status", b"4")])
    ok = answer(b"", trailers=OK)
    same = answer(b"", trailers=OK)
    comp = run_jobs(
        store, [job(ok, deadline, settings, i) for i in range(5)] + [job(ok, same, settings, 9)]
    )
    assert comp.stats["compared"] == 6
    (row,) = store.totals()
    assert (row.compared, row.matched, row.differing) == (6, 1, 5)
    (field,) = store.field_counts()
    assert (field.field, field.raw) == ("status.grpc", 5)


def test_report_names_the_field(
    store: Store, pb: ModuleType, proto: CompiledProto, tmp_path: Path
) -> None:
    settings = named(proto)
    jobs = [
        job(
            answer(grpc_body(user_response(pb, "Ada"))),
            answer(grpc_body(user_response(pb, "Grace" if i % 2 else "Ada"))),
            settings,
            i,
        )
        for i in range(40)
    ]
    run_jobs(store, jobs)
    text = render_report(store, "text")
    assert "users -> users-v2: 1 field(s) really differ" in text
    assert "body[0].user.display_name" in text
    # and the command a user runs prints the same
    done = subprocess.run(
        [sys.executable, "-m", "shadowlane", "report", "--store", f"sqlite:///{tmp_path}/grpc.db"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if "body[0].user.display_name" in x)
    assert line.split()[1:] == ["50.0%", "0%", "20"]


# ---------------------------------------------------------------------------------------------
# Lifting rules


def test_fields_by_proto_name(pb: ModuleType, proto: CompiledProto) -> None:
    fields = lift(answer(grpc_body(user_response(pb))), named(proto), GET_USER).fields
    body = {p: v for p, v in fields.items() if p.startswith("body")}
    assert body == {
        "body[0].user.id": 7,
        "body[0].user.display_name": "Ada",
        "body[0].user.tags[0]": "a",
        "body[0].user.tags[1]": "b",
        "body[0].user.address.city": "Oslo",
        "body[0].user.address.zip": "0150",
        "body[0].user.role": "ADMIN",
        "body[0].user.scores.x": 3,
        "body[0].user.avatar": "/wA=",
        "body[0].user.balance": 1.5,
        "body[0].user.delta": -3,
        "body[0].user.created.seconds": 1_700_000_000,
        "body[0].etag": "e1",
    }
    assert fields["status.grpc"] == "OK"


def test_fields_by_number_without_a_schema(pb: ModuleType) -> None:
    fields = lift(answer(grpc_body(user_response(pb))), CompareSettings(), GET_USER).fields
    body = {p: v for p, v in fields.items() if p.startswith("body")}
    assert body == {
        "body[0].1.1": 7,
        "body[0].1.2": "Ada",
        "body[0].1.3[0]": "a",  # a number seen twice is a list
        "body[0].1.3[1]": "b",
        "body[0].1.4.1": "Oslo",  # a sub-message that parses
        "body[0].1.4.2": "0150",  # printable text stays text even where it could parse
        "body[0].1.5": 1,  # an enum is its number
        "body[0].1.6.1": "x",  # a map entry is a message of key (1) and value (2)
        "body[0].1.6.2": 3,
        "body[0].1.7": "/wA=",  # bytes that are neither a message nor UTF-8: base64
        "body[0].1.8": 0x3FF8000000000000,  # a double is a fixed64: its bits as unsigned
        "body[0].1.9": 5,  # sint32 -3, zigzag-encoded: the wire does not say
        "body[0].1.10.1": 1_700_000_000,
        "body[0].2": "e1",
    }


def test_a_schema_is_used_only_for_its_methods(pb: ModuleType, proto: CompiledProto) -> None:
    body = grpc_body(user_response(pb))
    settings = named(proto)
    assert "body[0].user.id" in lift(answer(body), settings, GET_USER).fields
    # unknown method, unknown service, not a gRPC path: fields by number
    for path in ("/shadowlane.test.users.Users/Nope", "/other.Svc/GetUser", "/", ""):
        assert "body[0].1.1" in lift(answer(body), settings, path).fields
    only_other = compile_settings(
        ShadowCompare(
            grpc=GrpcCompare(
                descriptor_set=str(proto.descriptor_set), services=["shadowlane.test.users.Users"]
            )
        )
    )
    assert "body[0].user.id" in lift(answer(body), only_other, GET_USER + "?x=1").fields


def test_fields_the_schema_does_not_know_are_kept_by_number(
    pb: ModuleType, proto: CompiledProto
) -> None:
    """A newer server adds field 11 to User: the older schema still reports it, by number."""
    user = pb.User(id=7, display_name="Ada")
    newer_user = user.SerializeToString() + b"\x5a\x03new"  # field 11, length-delimited
    newer = bytes(pb.GetUserResponse(etag="e1").SerializeToString())
    newer += b"\x0a" + bytes([len(newer_user)]) + newer_user
    older = pb.GetUserResponse(user=user, etag="e1").SerializeToString()
    out = evaluate(job(answer(grpc_body(older)), answer(grpc_body(newer)), named(proto)))
    assert out.differing == ["body[0].user.11"]
    assert out.candidate.fields["body[0].user.11"] == "new"


def test_server_stream_messages_by_index(pb: ModuleType, proto: CompiledProto) -> None:
    users = [pb.User(id=i, display_name=f"u{i}").SerializeToString() for i in range(3)]
    changed = list(users)
    changed[1] = pb.User(id=1, display_name="renamed").SerializeToString()
    settings = named(proto)
    out = evaluate(
        job(answer(grpc_body(*users)), answer(grpc_body(*changed)), settings, uri=LIST_USERS)
    )
    assert out.differing == ["body[1].display_name"]
    fewer = evaluate(
        job(answer(grpc_body(*users)), answer(grpc_body(*users[:2])), settings, uri=LIST_USERS)
    )
    assert fewer.differing == ["body[2].display_name", "body[2].id"]


def test_gzip_messages_are_decoded_other_encodings_are_opaque(
    pb: ModuleType, proto: CompiledProto
) -> None:
    message = user_response(pb)
    plain = answer(grpc_body(message))
    gz = answer(grpc_body(message, compress=True), headers=[*GRPC, (b"grpc-encoding", b"gzip")])
    settings = named(proto, ignore_headers=["grpc-encoding"])
    assert evaluate(job(plain, gz, settings)).result == "match"
    gz_changed = answer(
        grpc_body(user_response(pb, "Grace"), compress=True),
        headers=[*GRPC, (b"grpc-encoding", b"gzip")],
    )
    assert evaluate(job(gz, gz_changed, settings)).differing == ["body[0].user.display_name"]
    # a compressed message under an encoding we cannot undo is compared as opaque bytes
    snappy = answer(
        grpc_body(message, compress=True), headers=[*GRPC, (b"grpc-encoding", b"snappy")]
    )
    lifted = lift(snappy, settings, GET_USER)
    assert lifted.kind == "grpc"
    assert [p for p in lifted.fields if p.startswith("body")] == ["body[0]"]
    assert evaluate(job(plain, snappy, settings)).differing[0] == "body[0]"


def test_trailers_are_fields_beside_headers(pb: ModuleType) -> None:
    settings = compile_settings(ShadowCompare(ignore_headers=["x-debug"]))
    body = grpc_body(user_response(pb))
    a = answer(body, trailers=[*OK, (b"x-cost", b"3"), (b"x-debug", b"a")])
    b = answer(body, trailers=[*OK, (b"x-cost", b"4"), (b"x-debug", b"b")])
    out = evaluate(job(a, b, settings))
    # ignore_headers applies to trailers as it does to headers
    assert out.differing == ["trailers.x-cost"]
    assert out.primary.fields["trailers.x-cost"] == "3"
    silenced = compile_settings(
        ShadowCompare(ignore_headers=["x-debug"], ignore=["trailers.x-cost"])
    )
    assert evaluate(job(a, b, silenced)).result == "match"
    # ignoring the status ignores the gRPC status too
    no_status = compile_settings(ShadowCompare(ignore=["status"]))
    failed = answer(body, trailers=[(b"grpc-status", b"13")])
    assert evaluate(job(a, failed, no_status)).differing == ["trailers.x-cost", "trailers.x-debug"]


def test_an_ignored_grpc_status_leaves_the_rest_compared(
    pb: ModuleType, proto: CompiledProto
) -> None:
    settings = named(proto, ignore=["status.grpc", "status.grpc_message"])
    a = answer(grpc_body(user_response(pb, "Ada")))
    b = answer(grpc_body(user_response(pb, "Grace")), trailers=[(b"grpc-status", b"13")])
    out = evaluate(job(a, b, settings))
    # the status is ignored; the message is still decoded by its proto names
    assert out.differing == ["body[0].user.display_name"]
    assert out.primary.fields["status"] == 200
    # naming the headers in ignore_headers does the same
    by_name = named(proto, ignore_headers=["grpc-status", "grpc-message"])
    assert evaluate(job(a, b, by_name)).differing == ["body[0].user.display_name"]


def test_schema_mode_compares_shapes_but_grpc_status_by_value(
    pb: ModuleType, proto: CompiledProto
) -> None:
    settings = named(proto, mode="schema")
    a = answer(grpc_body(user_response(pb, "Ada")))
    b = answer(grpc_body(user_response(pb, "Grace", id=9)))
    assert evaluate(job(a, b, settings)).result == "match"
    c = answer(grpc_body(user_response(pb, "Ada")), trailers=[(b"grpc-status", b"5")])
    assert evaluate(job(a, c, settings)).differing == ["status.grpc"]


def test_subset_mode_lets_the_candidate_add_fields(pb: ModuleType, proto: CompiledProto) -> None:
    settings = named(proto, mode="subset")
    a = answer(grpc_body(bytes(pb.GetUserResponse(etag="e1").SerializeToString())))
    b = answer(grpc_body(user_response(pb)))
    assert evaluate(job(a, b, settings)).result == "match"
    assert evaluate(job(b, a, settings)).result == "diff"


def test_a_body_that_is_not_grpc_framed_is_compared_whole(proto: CompiledProto) -> None:
    settings = named(proto)
    broken = answer(b"\x00\x00\x00\x00\x09abc")  # length past the end
    lifted = lift(broken, settings, GET_USER)
    assert lifted.kind == "text" and list(lifted.body_fields()) == ["body"]
    other = answer(b"\x00\x00\x00\x00\x09abd")
    assert evaluate(job(broken, other, settings)).differing == ["body"]


def test_raw_decoding_rules() -> None:
    assert decode_raw(b"") == {}
    assert decode_raw(b"\x12\x02hi") == {"2": "hi"}  # "hi" would parse as field 13 = 105
    assert decode_raw(b"\x12\x02\x08\x01") == {"2": {"1": 1}}  # a sub-message
    assert decode_raw(b"\x12\x00") == {"2": ""}
    assert decode_raw(b"\x12\x02\xc3\xa9") == {"2": "é"}
    assert decode_raw(b"\x12\x02\xff\xfe") == {"2": "//4="}
    assert decode_raw(b"\x08\x01\x08\x02\x08\x03") == {"1": [1, 2, 3]}
    assert decode_raw(b"\x0d\x01\x00\x00\x00") == {"1": 1}  # fixed32
    assert decode_raw(b"\xe0\x12\x96\x01") == {"300": 150}  # two-byte tag and value
    assert decode_raw(b"\x08\x01\x10\x02\x08\x03") == {"1": [1, 3], "2": 2}
    for bad in (b"\x00\x01", b"\x0b", b"\x0f\x00", b"\x12\x05ab", b"\x08\xff\xff\xff"):
        with pytest.raises(ValueError):
            decode_raw(bad)


def test_a_schema_pickles(pb: ModuleType, proto: CompiledProto) -> None:
    """A comparator in another process receives the settings pickled: the schema travels as
    the descriptor set's bytes and its pool is rebuilt there."""
    schema = named(proto).grpc
    assert schema is not None
    copy = pickle.loads(pickle.dumps(schema))
    assert copy == schema and copy is not schema
    settings = CompareSettings(grpc=copy)
    assert (
        "body[0].user.id" in lift(answer(grpc_body(user_response(pb))), settings, GET_USER).fields
    )


# ---------------------------------------------------------------------------------------------
# Config


def _config(grpc: str, where: str = "shadow") -> str:
    block = f"compare: {{grpc: {grpc}}}"
    route_block = f"    {block}\n" if where == "route" else ""
    shadow_block = f"        {block}\n" if where == "shadow" else "        compare: true\n"
    return (
        "backends:\n"
        "  v1: {endpoints: [http://127.0.0.1:9001]}\n"
        "  v2: {endpoints: [http://127.0.0.1:9002]}\n"
        "routes:\n"
        "  - name: users\n"
        "    match: {path_prefix: /}\n"
        "    backend: v1\n"
        f"{route_block}"
        "    shadows:\n"
        "      - backend: v2\n"
        f"{shadow_block}"
    )


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.errors


def test_config_accepts_a_descriptor_set(proto: CompiledProto) -> None:
    cfg = parse_config(
        _config(
            f"{{descriptor_set: {proto.descriptor_set}, services: [shadowlane.test.users.Users]}}"
        )
    )
    sc = cfg.routes[0].shadows[0].compare_enabled
    assert sc is not None and sc.grpc is not None
    settings = compile_settings(cfg.routes[0].shadows[0], cfg.routes[0], cfg.compare)
    assert settings.grpc is not None and settings.grpc.services == ("shadowlane.test.users.Users",)
    # on the route: every compared shadow of the route gets it
    cfg = parse_config(_config(f"{{descriptor_set: {proto.descriptor_set}}}", where="route"))
    settings = compile_settings(cfg.routes[0].shadows[0], cfg.routes[0], cfg.compare)
    assert settings.grpc is not None


def test_config_errors_name_the_key(proto: CompiledProto, tmp_path: Path) -> None:
    assert _errors(_config("{descriptor_set: /nonexistent/users.pb}")) == [
        "routes[0].shadows[0].compare.grpc.descriptor_set: no such file: /nonexistent/users.pb"
    ]
    (error,) = _errors(
        _config(f"{{descriptor_set: {proto.descriptor_set}, services: [shadowlane.test.Nope]}}")
    )
    assert error.startswith("routes[0].shadows[0].compare.grpc: unknown service ")
    assert "'shadowlane.test.Nope'" in error and "shadowlane.test.users.Users" in error
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\xff\xff")
    (error,) = _errors(_config(f"{{descriptor_set: {junk}}}", where="route"))
    assert error.startswith("routes[0].compare.grpc: ")
    assert "is not a FileDescriptorSet" in error
    lacking = descriptor_set_without_imports("compare_users", tmp_path)
    (error,) = _errors(_config(f"{{descriptor_set: {lacking}}}"))
    assert "imports google/protobuf/timestamp.proto, which is not in the set" in error
    assert "--include_imports" in error
    (error,) = _errors(_config(f"{{descriptor_set: {proto.descriptor_set}, service: [x]}}"))
    assert error == "routes[0].shadows[0].compare.grpc.service: unknown key"


def test_trailers_is_a_field_path_root() -> None:
    cfg = parse_config(
        _config("null").replace("compare: {grpc: null}", "compare: {ignore: [trailers.x-cost]}")
    )
    sc = cfg.routes[0].shadows[0].compare_enabled
    assert sc is not None and sc.ignore == ["trailers.x-cost"]


def test_unordered_repeated_field_by_proto_name(pb: ModuleType, proto: CompiledProto) -> None:
    a = answer(grpc_body(user_response(pb, tags=["a", "b"])))
    b = answer(grpc_body(user_response(pb, tags=["b", "a"])))
    assert evaluate(job(a, b, named(proto))).differing == [
        "body[0].user.tags[0]",
        "body[0].user.tags[1]",
    ]
    assert evaluate(job(a, b, named(proto, unordered=["body[*].user.tags"]))).result == "match"
    c = answer(grpc_body(user_response(pb, tags=["b", "a", "a"])))
    unordered = named(proto, unordered=["body[*].user.tags"])
    assert evaluate(job(a, c, unordered)).differing == ["body[0].user.tags"]


def test_a_message_that_is_not_its_type_is_decoded_by_number(
    pb: ModuleType, proto: CompiledProto
) -> None:
    # field 1 of GetUserResponse is a message (User); here it is a varint
    wrong = b"\x08\x05"
    lifted = lift(answer(grpc_body(wrong)), named(proto), GET_USER)
    assert lifted.kind == "grpc"
    assert {p: v for p, v in lifted.fields.items() if p.startswith("body")} == {"body[0].1": 5}


def test_shadowlane_check_with_a_descriptor_set(proto: CompiledProto, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        _config(
            f"{{descriptor_set: {proto.descriptor_set}, services: [shadowlane.test.users.Users]}}"
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "shadowlane", "check", "-c", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"gRPC fields named by {proto.descriptor_set}" in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(_config("{descriptor_set: missing.pb}"))
    done = subprocess.run(
        [sys.executable, "-m", "shadowlane", "check", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "routes[0].shadows[0].compare.grpc.descriptor_set: no such file: missing.pb" in (
        done.stdout + done.stderr
    )
