"""Making ``fc_edge_pb2.py`` and ``fc_edge_pb2_grpc.py`` from ``fc_edge.proto`` (grpcio-tools).

Run by ``python tools/gen_proto.py`` after editing the ``.proto``; the outputs are committed
(see :mod:`fc_edge.runtime.proto`). Each starts with a line naming the SHA-256 of the ``.proto``
it was made from, so a test tells when they are stale.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from fc_edge.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO = PACKAGE_DIR / "fc_edge.proto"
MODULES = ("fc_edge_pb2", "fc_edge_pb2_grpc")
_STAMP = "# fc-edge proto sha256: "


def proto_digest() -> str:
    return hashlib.sha256(PROTO.read_bytes()).hexdigest()


def _is_current(folder: Path, digest: str) -> bool:
    for name in MODULES:
        try:
            with open(folder / f"{name}.py", encoding="utf-8") as f:
                if f.readline().strip() != _STAMP + digest:
                    return False
        except OSError:
            return False
    return True


def _generate(folder: Path, digest: str) -> None:
    """Run protoc into a temporary folder and move the stamped outputs into ``folder``."""
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise ConfigError(
            "generating the gRPC stubs needs grpcio-tools: pip install grpcio-tools"
        ) from e
    import grpc_tools

    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".proto-", dir=folder))
    try:
        # protoc sees the proto as fc_edge/runtime/fc_edge.proto so that the gRPC module imports
        # its messages as `from fc_edge.runtime import fc_edge_pb2`.
        src = tmp / "src" / "fc_edge" / "runtime"
        src.mkdir(parents=True)
        shutil.copyfile(PROTO, src / "fc_edge.proto")
        include = Path(grpc_tools.__file__).parent / "_proto"
        rc = protoc.main([
            "grpc_tools.protoc", f"-I{tmp / 'src'}", f"-I{include}",
            f"--python_out={tmp}", f"--grpc_python_out={tmp}",
            "fc_edge/runtime/fc_edge.proto",
        ])
        if rc != 0:
            raise ConfigError(f"protoc failed ({rc}) on {PROTO}")
        for name in MODULES:
            out = tmp / "fc_edge" / "runtime" / f"{name}.py"
            staged = tmp / f"{name}.py"
            staged.write_text(_STAMP + digest + "\n" + out.read_text(encoding="utf-8"),
                              encoding="utf-8")
            os.replace(staged, folder / f"{name}.py")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate(folder: Path = PACKAGE_DIR) -> None:
    """(Re)write the two modules into ``folder`` (the package by default)."""
    _generate(folder, proto_digest())


def is_current(folder: Path = PACKAGE_DIR) -> bool:
    """Whether ``folder`` holds modules made from the ``.proto`` as it is now."""
    return _is_current(folder, proto_digest())
