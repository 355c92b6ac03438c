"""The generated protobuf / gRPC modules of ``fc_edge.proto``, built on first import.

The ``*_pb2*.py`` files are not in git: they are generated here with ``grpc_tools.protoc`` when
missing or stale. Each generated file starts with a line naming the SHA-256 of the ``.proto`` it
was made from, so an edited ``.proto`` regenerates them. Generation writes to a private temporary
folder and moves each file into place with ``os.replace`` (atomic), so two processes starting at
once each see either no file or a whole one (and both write identical bytes). Where the package
folder is read-only (an installed wheel), the files are generated into a per-user cache folder
and loaded from there under the same module names.

>>> from fc_edge.runtime.proto import pb2, pb2_grpc
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from fc_edge.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO = PACKAGE_DIR / "fc_edge.proto"
MODULES = ("fc_edge_pb2", "fc_edge_pb2_grpc")
_STAMP = "# fc-edge proto sha256: "
_lock = threading.Lock()


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


def _writable_folder(digest: str) -> Path:
    return PACKAGE_DIR if os.access(PACKAGE_DIR, os.W_OK) else _cache_folder(digest)


def _cache_folder(digest: str) -> Path:
    from fc_edge.models.pretrained import cache_root

    return cache_root() / "proto" / digest[:16]


def _load_from(folder: Path) -> tuple[ModuleType, ModuleType]:
    """Import the two modules from ``folder`` as ``fc_edge.runtime.fc_edge_pb2[_grpc]``."""
    import fc_edge.runtime as package

    loaded = []
    for name in MODULES:
        full = f"fc_edge.runtime.{name}"
        if full in sys.modules:
            loaded.append(sys.modules[full])
            continue
        spec = importlib.util.spec_from_file_location(full, folder / f"{name}.py")
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot import {folder / (name + '.py')}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[full]
            raise
        setattr(package, name, module)
        loaded.append(module)
    return loaded[0], loaded[1]


def load() -> tuple[ModuleType, ModuleType]:
    """``(fc_edge_pb2, fc_edge_pb2_grpc)``, generating them first when missing or stale."""
    with _lock:
        digest = proto_digest()
        folder = PACKAGE_DIR if _is_current(PACKAGE_DIR, digest) else _writable_folder(digest)
        if not _is_current(folder, digest):
            try:
                _generate(folder, digest)
            except OSError:
                if folder != PACKAGE_DIR:
                    raise
                # the package folder looked writable but is not (read-only mount)
                folder = _cache_folder(digest)
                if not _is_current(folder, digest):
                    _generate(folder, digest)
        return _load_from(folder)


pb2, pb2_grpc = load()
