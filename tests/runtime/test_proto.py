"""The committed gRPC stubs are those of the .proto as it is now, byte for byte."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fc_edge.runtime import protogen


def test_committed_modules_are_current():
    # fails when fc_edge.proto was edited without `python tools/gen_proto.py`
    assert protogen.is_current(), "run: python tools/gen_proto.py, and commit the result"
    from fc_edge.runtime.proto import pb2, pb2_grpc

    assert pb2.Open.DESCRIPTOR.full_name == "fc_edge.v1.Open"
    assert hasattr(pb2_grpc, "SplitInferenceStub")


def test_regeneration_reproduces_the_committed_modules(tmp_path: Path):
    import grpc_tools

    committed = {n: (protogen.PACKAGE_DIR / f"{n}.py").read_text() for n in protogen.MODULES}
    made_with = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'",
                          committed["fc_edge_pb2_grpc"]).group(1)
    installed = getattr(grpc_tools, "__version__", None)
    if installed is None:
        from importlib.metadata import version

        installed = version("grpcio-tools")
    if installed != made_with:
        pytest.skip(f"stubs were made with grpcio-tools {made_with}, {installed} is installed")
    assert not protogen.is_current(tmp_path)
    protogen.generate(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".proto-")] == []
    for name, text in committed.items():
        assert (tmp_path / f"{name}.py").read_text() == text, name
