"""What the device client and the edge server share about a session: the protocol's constants
and the frames both sides build (docs/protocol.md). Neither side imports the other.

>>> from fc_edge.runtime.protocol import PROTOCOL_VERSION, FALLBACK_CODEC
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
SERVICE_NAME = "fc_edge.v1.SplitInference"
#: Codec accepted for any step the session codec refuses for its shape (BudgetError).
FALLBACK_CODEC = "fp16"
