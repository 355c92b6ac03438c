"""Split inference over the network: a device client runs the head, an edge server the tail.

* :mod:`.server` — ``start_server(...)``: gRPC sessions, one KV cache each, limits, auth.
* :mod:`.client` — ``DeviceClient(...).generate(...)``: head, codec, stream, timings.
* :mod:`.sampling` — greedy / temperature / top-k / top-p, applied on the server.
* :mod:`.timing` — per-step stage timings and the stage timer (CUDA events, NVTX).
* :mod:`.proto` — the generated protobuf / gRPC modules of ``fc_edge.proto``.

Protocol: ``docs/protocol.md``.
"""

import os as _os

# gRPC's C core logs connection teardown (GOAWAY) at INFO on stderr; keep to errors unless the
# user asked for more.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
