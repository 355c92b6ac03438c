"""The protobuf / gRPC modules of ``fc_edge.proto``, generated once and committed.

``fc_edge_pb2.py`` and ``fc_edge_pb2_grpc.py`` beside this file are made by grpcio-tools
(``python tools/gen_proto.py``, see :mod:`fc_edge.runtime.protogen`) and kept in git, so
importing the package never runs a code generator: an installed package may be read-only, and a
device needs only ``grpcio`` and ``protobuf``.

>>> from fc_edge.runtime.proto import pb2, pb2_grpc
"""

from fc_edge.runtime import fc_edge_pb2 as pb2
from fc_edge.runtime import fc_edge_pb2_grpc as pb2_grpc

__all__ = ["pb2", "pb2_grpc"]
