"""What the device client and the edge server share about a session: the protocol's constants
and the frames both sides build (docs/protocol.md). Neither side imports the other.

>>> from fc_edge.runtime.protocol import PROTOCOL_VERSION, FALLBACK_CODEC, open_frame
>>> frame = open_frame("57bba2b7bb38f605", 1, "identity", "{}", max_seq_len=64)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from fc_edge.models.defaults import DEFAULT_SPLIT_LAYER
from fc_edge.runtime.proto import pb2

PROTOCOL_VERSION = 1
SERVICE_NAME = "fc_edge.v1.SplitInference"
#: Codec accepted for any step the session codec refuses for its shape (BudgetError).
FALLBACK_CODEC = "fp16"
#: Codecs whose payloads need a calibration artifact on both ends (``Open.calibration``).
CALIBRATED_CODECS = frozenset({"klt"})
#: How ``Open.calibration`` names an artifact: the SHA-256 of its ``.safetensors`` bytes
#: (:attr:`fc_edge.codecs.calibration.Calibration.digest`), 64 lowercase hex digits.
CALIBRATION_HASH = re.compile(r"[0-9a-f]{64}")


def default_split_layer(model: Any = None) -> int:
    """The split layer used when none is given
    (:data:`fc_edge.models.defaults.DEFAULT_SPLIT_LAYER`, the device's too, whatever the model).
    """
    del model
    return DEFAULT_SPLIT_LAYER


# --- client -> server -------------------------------------------------------------------------
def open_frame(fingerprint: str, split_layer: int, codec_name: str, config_json: str = "{}", *,
               max_seq_len: int = 0, max_new_tokens: int = 0,
               eos_token_ids: Iterable[int] = (), temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, calibration: str = "") -> Any:
    """The ``Open`` that starts a session (``max_seq_len``: prompt + new tokens, 0: the
    server's limit; ``max_new_tokens`` 0: no count limit; ``seed`` None: the server draws
    one; ``calibration``: the SHA-256 of the codec's calibration artifact, "" for none)."""
    return pb2.ClientFrame(open=pb2.Open(
        protocol_version=PROTOCOL_VERSION, model_fingerprint=fingerprint,
        split_layer=split_layer, codec=pb2.CodecSpec(name=codec_name, config_json=config_json),
        sampling=pb2.Sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed or 0, has_seed=seed is not None),
        max_seq_len=max_seq_len, max_new_tokens=max_new_tokens,
        eos_token_ids=[int(t) for t in eos_token_ids], calibration=calibration))


def activation_frame(step: int, payload: bytes) -> Any:
    """Step ``step``'s activation: ``payload`` is ``wire.pack(codec.encode(A))``, A (S, D)."""
    return pb2.ClientFrame(activation=pb2.Activation(step=step, payload=payload))


def close_frame() -> Any:
    return pb2.ClientFrame(close=pb2.Close())


# --- server -> client -------------------------------------------------------------------------
def ready_frame(session_id: str, max_seq_len: int, max_payload_bytes: int) -> Any:
    return pb2.ServerFrame(ready=pb2.Ready(
        session_id=session_id, max_seq_len=max_seq_len, max_payload_bytes=max_payload_bytes,
        fallback_codec=FALLBACK_CODEC))


def token_frame(step: int, token: int, done: bool, *, unpack_s: float = 0.0,
                decode_s: float = 0.0, compute_s: float = 0.0, total_s: float = 0.0,
                codec: str = "") -> Any:
    """The answer to step ``step``: the sampled ``token`` and the server's timings (seconds)."""
    return pb2.ServerFrame(token=pb2.Token(
        step=step, id=token, done=done,
        timings=pb2.ServerTimings(unpack_s=unpack_s, decode_s=decode_s, compute_s=compute_s,
                                  total_s=total_s, codec=codec)))
