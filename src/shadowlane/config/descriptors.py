"""Reading a protobuf descriptor set (`protoc --include_imports --descriptor_set_out=FILE`).

The config checks a `compare.grpc.descriptor_set` by building the very descriptor pool the
comparator will use, with the same function: what `shadowlane check` accepts, `run` can use,
and a set that lacks its imports, or is not a descriptor set at all, is an error naming the key
rather than gRPC answers silently compared by field number. The `protobuf` package is imported
only here and only when a descriptor set is configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DescriptorSet:
    """A descriptor set's bytes, its pool (every file, dependencies first) and its services."""

    data: bytes
    #: a `google.protobuf.descriptor_pool.DescriptorPool`
    pool: Any
    #: full service names (`pkg.Users`), in file order
    services: tuple[str, ...]


def read_descriptor_set(path: str) -> DescriptorSet:
    """Read and build the set at `path`; ValueError says what is wrong with it."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return build_descriptor_set(data, path)


def build_descriptor_set(data: bytes, source: str = "descriptor set") -> DescriptorSet:
    """The pool of a serialized FileDescriptorSet; ValueError names the problem and `source`."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from google.protobuf.message import DecodeError

    fds = descriptor_pb2.FileDescriptorSet()
    try:
        fds.ParseFromString(data)
    except DecodeError:
        raise ValueError(
            f"{source} is not a FileDescriptorSet (write one with protoc --include_imports "
            "--descriptor_set_out=FILE)"
        ) from None
    if not fds.file:
        raise ValueError(f"{source} holds no .proto files")
    files = {f.name: f for f in fds.file}
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in added:
            return
        if name in chain:
            raise ValueError(f"{source}: import cycle through {name}")
        f = files.get(name)
        if f is None:
            raise ValueError(
                f"{source}: {chain[-1]} imports {name}, which is not in the set "
                "(write it with protoc --include_imports)"
            )
        for dep in f.dependency:
            add(dep, (*chain, name))
        try:
            pool.AddSerializedFile(f.SerializeToString())
        except Exception as exc:  # upb raises TypeError, the pure-Python pool others
            raise ValueError(f"{source}: {name}: {exc}") from None
        added.add(name)

    for name in files:
        add(name, ())
    services = tuple(
        f"{f.package}.{s.name}" if f.package else s.name for f in fds.file for s in f.service
    )
    return DescriptorSet(data, pool, services)
