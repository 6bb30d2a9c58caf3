"""Compiling the tests' .proto files at test time, and framing messages as gRPC bodies.

`compile_proto` runs the real protoc shipped by grpcio-tools (`python -m grpc_tools.protoc`) into
a directory of the caller's, writing the generated Python module and a descriptor set as
`protoc --descriptor_set_out` writes it, so tests build their messages with generated classes
and configure the comparison with the same file a user would. Nothing here imports shadowlane.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PROTOS = Path(__file__).resolve().parent.parent / "protos"


@dataclass(frozen=True)
class CompiledProto:
    #: the generated `<name>_pb2` module, imported
    module: ModuleType
    #: the FileDescriptorSet file (with `--include_imports` unless asked otherwise)
    descriptor_set: Path


def _protoc(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"protoc {' '.join(args)} failed: {done.stderr or done.stdout}")


def compile_proto(name: str, out: Path, *, grpc: bool = False) -> CompiledProto:
    """Compile `tests/protos/<name>.proto` into `out` and import its `<name>_pb2` module (and
    write `<name>_pb2_grpc.py` with `grpc`). The module is imported under its own name once per
    process: the generated code registers its file in protobuf's default pool."""
    out.mkdir(parents=True, exist_ok=True)
    descriptors = out / f"{name}.pb"
    args = [
        f"-I{PROTOS}",
        f"--python_out={out}",
        "--include_imports",
        f"--descriptor_set_out={descriptors}",
    ]
    if grpc:
        args.append(f"--grpc_python_out={out}")
    _protoc([*args, str(PROTOS / f"{name}.proto")])
    module_name = f"{name}_pb2"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, out / f"{module_name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return CompiledProto(module, descriptors)


def descriptor_set_without_imports(name: str, out: Path) -> Path:
    """The descriptor set as protoc writes it without `--include_imports` (a common mistake)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-no-imports.pb"
    _protoc([f"-I{PROTOS}", f"--descriptor_set_out={path}", str(PROTOS / f"{name}.proto")])
    return path


def grpc_frame(payload: bytes, *, compress: bool = False) -> bytes:
    """One length-prefixed gRPC message: compressed flag, 4-byte big-endian length, payload
    (gzipped when `compress`, to go with `grpc-encoding: gzip`)."""
    if compress:
        payload = gzip.compress(payload)
    return struct.pack(">BI", 1 if compress else 0, len(payload)) + payload


def grpc_body(*messages: bytes, compress: bool = False) -> bytes:
    return b"".join(grpc_frame(m, compress=compress) for m in messages)
