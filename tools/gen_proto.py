"""Regenerate fc_edge/runtime/fc_edge_pb2*.py from fc_edge.proto; commit the result."""

from fc_edge.runtime.protogen import PACKAGE_DIR, generate

if __name__ == "__main__":
    generate()
    print(f"wrote {PACKAGE_DIR}/fc_edge_pb2.py and fc_edge_pb2_grpc.py")
