"""The gRPC stubs are generated when missing or stale, atomically, also by two processes at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fc_edge.runtime import proto

GENERATE = """
import sys
from pathlib import Path
from fc_edge.runtime import proto
folder = Path(sys.argv[1])
for _ in range(3):
    proto._generate(folder, proto.proto_digest())
assert proto._is_current(folder, proto.proto_digest())
"""


def test_loaded_modules_are_current():
    assert proto._is_current(proto.PACKAGE_DIR, proto.proto_digest()) or proto.pb2 is not None
    assert proto.pb2.Open.DESCRIPTOR.full_name == "fc_edge.v1.Open"
    assert hasattr(proto.pb2_grpc, "SplitInferenceStub")


def test_stale_files_are_regenerated(tmp_path: Path):
    digest = proto.proto_digest()
    assert not proto._is_current(tmp_path, digest)
    for name in proto.MODULES:
        (tmp_path / f"{name}.py").write_text("# fc-edge proto sha256: old\n")
    assert not proto._is_current(tmp_path, digest)
    proto._generate(tmp_path, digest)
    assert proto._is_current(tmp_path, digest)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".proto-")] == []


def test_two_processes_generate_at_once(tmp_path: Path):
    procs = [subprocess.Popen([sys.executable, "-c", GENERATE, str(tmp_path)],
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    text = (tmp_path / "fc_edge_pb2.py").read_text()
    compile(text, "fc_edge_pb2.py", "exec")
