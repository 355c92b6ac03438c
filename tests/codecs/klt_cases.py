"""The small calibration ``K4`` of docs/wire-format.md's ``klt`` test vectors (D = 4, V = 3).

``k4_arrays()`` gives its tensors as plain float64/int lists (what the second reader takes);
``k4_context(tokens)`` the same as a ``CodecContext`` for fc_edge.
"""

from __future__ import annotations

import hashlib

H = 0.5  # the 4 x 4 Sylvester Hadamard matrix / 2: orthonormal
K4 = {
    "mean": [0.5, -0.25, 0.0, 1.0],
    "weights": [1.0, 2.0, 0.5, 1.0],
    "prefill_basis": [[H, H, H, H], [H, -H, H, -H], [H, H, -H, -H], [H, -H, -H, H]],
    "prefill_log_std": [16, 0, -16, -200],
    "decode_basis": [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0],
                     [0.0, 0.0, 1.0, 0.0]],
    "decode_log_std": [0, -8, -16, -32],
    "predictor_features": [[0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 0.5]],
    "predictor_embedding": [[1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0.25]],
    "predictor_bias": [0.1, 0.0, -0.1, 0.0],
}
#: f(t) and e(t) of the three tokens.
FEATURES = [[1.0, -2.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0], [2.0, 1.0, -1.0, 0.5]]
EMBEDDING = [[0.25, 0.5, 0.0, -1.0], [1.0, 1.0, 1.0, 1.0], [-0.5, 0.0, 2.0, 0.0]]
TOKENS = [2, 0]  # the token vectors' rows' tokens


def k4_arrays(tokens: list[int] | None = None) -> dict:
    out = dict(K4)
    out.update(features=FEATURES, embedding=EMBEDDING, tokens=tokens)
    return {k: v for k, v in out.items()}


def k4_calibration():
    import torch
    from safetensors.torch import save

    from fc_edge.codecs.calibration import Calibration

    t = {k: (torch.tensor(v, dtype=torch.int32) if k.endswith("log_std")
             else torch.tensor(v, dtype=torch.float32)) for k, v in K4.items()}
    digest = hashlib.sha256(save(t, metadata={"format": "fc-edge-klt-1"})).hexdigest()
    return Calibration(**t, meta={"name": "K4"}, digest=digest)


def k4_context(tokens: list[int] | None = None):
    import torch

    from fc_edge.codecs import CodecContext

    feats = torch.tensor(FEATURES)
    ctx = CodecContext(calibration=k4_calibration(), features=lambda t: feats[t],
                       embedding=torch.tensor(EMBEDDING))
    return ctx if tokens is None else ctx.with_tokens(tokens)
