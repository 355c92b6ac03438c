"""The eval path scores what the split runtime computes (issue 7, item 4).

The networked runtime returns tokens, not log-likelihoods, so the check has two parts:

1. scores: for a sample of PIQA items, every choice's summed continuation log-likelihood through
   the runtime's own pieces — the device head (``fc_edge.models.split``), the codec's encode ->
   wire bytes -> decode, the server tail — equals the eval path's (same codec, same split);
2. the real gRPC runtime (``start_server`` + ``DeviceClient``): the greedy token it returns after
   each scored sequence equals the argmax of the eval path's logits at that sequence's end.
"""

from __future__ import annotations

import pytest
import torch

from fc_edge.eval.accuracy import evaluate
from fc_edge.eval.forward import LayerStack
from fc_edge.eval.multiple_choice import send_prefills
from fc_edge.eval.settings import build_settings
from fc_edge.eval.tasks import default_data_dir, encode_item, load_task

pytestmark = pytest.mark.slow
LAYER = 1
CODEC = "rotated"
N_ITEMS = 2


@pytest.fixture(scope="module")
def sample(smollm2):
    if not (default_data_dir() / "piqa").is_dir():
        pytest.skip("../shared/datasets/piqa is absent")
    model, tok = smollm2
    items = load_task("piqa", limit=N_ITEMS)
    settings = build_settings(f"none,{CODEC}")
    res = evaluate(model, tok, ["piqa"], settings, [LAYER], limit=N_ITEMS, progress=False,
                   record_items=True)
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    encs = [encode_item(it, encode, prefix_id=tok.eos_token_id) for it in items]
    return model, tok, settings[1], encs, res["results"][str(LAYER)][settings[1].label]


def test_split_head_codec_tail_scores_equal_eval(sample):
    from fc_edge.codecs import decode, wire
    from fc_edge.models.split import split

    model, _, setting, encs, got = sample
    head, tail = split(model, LAYER)
    for enc, eval_ll in zip(encs, got["items"]["piqa"], strict=True):
        runtime_ll = []
        for seq, start in zip(enc.sequences, enc.starts, strict=True):
            ids = torch.tensor(seq)
            with torch.inference_mode():
                a = head.start(len(seq)).step(ids)
                a_hat = decode(wire.unpack(wire.pack(setting.codec.encode(a))))
                logits = tail.start().step(a_hat).double()
            lp = torch.log_softmax(logits, -1)
            runtime_ll.append(float(sum(lp[t - 1, seq[t]] for t in range(start, len(seq)))))
        assert runtime_ll == pytest.approx(eval_ll, rel=2e-3, abs=2e-3)
        assert max(range(len(eval_ll)), key=eval_ll.__getitem__) == \
            max(range(len(runtime_ll)), key=runtime_ll.__getitem__)


def test_grpc_runtime_next_token_equals_eval_argmax(sample):
    from fc_edge.runtime.client import DeviceClient
    from fc_edge.runtime.server import start_server

    model, tok, setting, encs, _ = sample
    stack = LayerStack(model)
    with start_server(model, LAYER, port=0) as server, \
            DeviceClient(server.address, (model, tok), LAYER, setting.codec) as client:
        for enc in encs[:1]:
            for seq in enc.sequences:
                ids = torch.tensor([seq])
                with torch.inference_mode():
                    h, ctx = stack.start(ids)
                    h = stack.run(h, ctx, 0, LAYER)
                    h = send_prefills(setting, h, [len(seq)])
                    h = stack.run(h, ctx, LAYER, stack.num_layers)
                    want = int(stack.logits(h)[0, -1].argmax())
                result = client.generate(list(seq), max_new_tokens=1, eos_token_id=None)
                assert result.token_ids == [want]
