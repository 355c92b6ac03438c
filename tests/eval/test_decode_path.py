"""Per-token perplexity mode == the runtime's decode path (issue 12, item 2).

Oracle: the runtime itself. (1) Its pieces, step by step as the server runs a session: the
device head one token at a time, the codec bound to the model's channel weights as
``DeviceClient`` binds it, ``wire.pack`` / ``wire.unpack`` / ``decode`` and the server's own tail
(``Tail.from_hf``, the one the engine runs) with its paged KV cache: payload bytes and
logits per token.
(2) The real gRPC runtime on loopback: a greedy generation whose every decode step is one row;
its per-step upload bytes and tokens against the eval path on the same sequence.
"""

from __future__ import annotations

import torch

from fc_edge.eval.forward import LayerStack
from fc_edge.eval.perplexity import score_document
from fc_edge.eval.settings import build_settings

LAYER = 2
SPEC = "rotated[bits=6]"  # one 64-value row of the tiny model does not fit 4 bits per element
IDS = [5, 17, 3, 99, 42, 7, 7, 120, 64, 1, 250, 33]


def _runtime_pieces(model, codec, ids):
    """Per token: (payload bytes, tail logits) through the runtime's decode path."""
    from fc_edge.codecs import decode, wire
    from fc_edge.models.split import channel_weights, split
    from fc_edge.models.tail import Tail

    head, _ = split(model, LAYER)
    codec.bind(channel_weights(model, LAYER))
    hs = head.start(len(ids))
    ts = Tail.from_hf(model, LAYER).start(len(ids))
    sizes, logits = [], []
    with torch.inference_mode():
        for t in ids:
            a = hs.step(torch.tensor([t]))
            data = wire.pack(codec.encode(a))
            sizes.append(len(data))
            logits.append(ts.step(decode(wire.unpack(data)).to(a.dtype)).double().reshape(-1))
    return sizes, torch.stack(logits)


def test_per_token_mode_equals_runtime_pieces(tiny_llama):
    (ref_setting, setting) = build_settings(f"none,{SPEC}")
    got = score_document(LayerStack(tiny_llama), tiny_llama, IDS, [LAYER],
                         [ref_setting, setting], per_token=True)
    st = got["s"][f"{LAYER}:{SPEC}"]
    from fc_edge.codecs import get_codec

    sizes, logits = _runtime_pieces(tiny_llama, get_codec("rotated", bits=6), IDS)
    assert st["seqs"] == len(IDS) and st["bytes"] == sum(sizes)
    targets = torch.tensor(IDS[1:])
    lp = torch.log_softmax(logits[:-1], -1)
    want_nll = -float(lp.gather(1, targets.view(-1, 1)).sum())
    assert abs(st["nll"] - want_nll) < 1e-4 * max(1.0, abs(want_nll))
    with torch.inference_mode():
        ref_top = tiny_llama(torch.tensor([IDS])).logits[0, :-1].argmax(-1)
    assert st["agree"] == int((logits[:-1].argmax(-1) == ref_top).sum())


def test_per_token_mode_equals_grpc_decode_steps(tiny_llama):
    """A 1-token prompt, then greedy decode steps of one row each: the runtime's upload bytes
    per step and its tokens equal the eval path's per-token messages and argmax."""
    from fc_edge.codecs import get_codec
    from fc_edge.runtime.client import DeviceClient
    from fc_edge.runtime.server import start_server

    n = 10
    with start_server(tiny_llama, LAYER, port=0) as handle, \
            DeviceClient(handle.address, tiny_llama, LAYER, get_codec("rotated", bits=6)) as client:
        result = client.generate([IDS[0]], n, eos_token_id=None)
    seq = [IDS[0]] + result.token_ids[:-1]  # the rows the device sent, one per step
    assert [s.rows for s in result.steps] == [1] * n
    (setting,) = build_settings(SPEC)
    got = score_document(LayerStack(tiny_llama), tiny_llama, seq, [LAYER], [setting],
                         per_token=True)["s"][f"{LAYER}:{SPEC}"]
    assert got["bytes"] == sum(s.bytes_up for s in result.steps)
    sizes, logits = _runtime_pieces(tiny_llama, get_codec("rotated", bits=6), seq)
    assert sizes == [s.bytes_up for s in result.steps]
    assert logits.argmax(-1).tolist() == result.token_ids
