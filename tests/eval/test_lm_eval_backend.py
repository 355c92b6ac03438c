"""The lm-evaluation-harness backend scores like `fc-edge eval` (eval/lm_eval_backend.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")

import torch  # noqa: E402

from fc_edge.eval.settings import build_settings  # noqa: E402


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 250 for c in text]}


def test_registered_under_fc_edge():
    from lm_eval.api.registry import get_model

    from fc_edge.eval.lm_eval_backend import FcEdgeLM

    assert get_model("fc-edge") is FcEdgeLM


def _hooked_logliks(model, tok, layer, setting, reqs):
    """Oracle: the full Hugging Face forward, one request at a time, with the codec applied to
    the output of decoder layer ``layer - 1`` by a forward hook (the definition of "codec at the
    split"); continuation tokens as lm-eval splits them (context encoded alone, the rest of
    ``encode(context + continuation)`` is the continuation)."""

    def hook(_module, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        x_hat, _, _ = setting.send(h[0])
        return (x_hat[None], *out[1:]) if isinstance(out, tuple) else x_hat[None]

    handle = model.model.layers[layer - 1].register_forward_hook(hook)
    out = []
    try:
        for ctx, cont in reqs:
            c = tok(ctx)["input_ids"]
            whole = tok(ctx + cont)["input_ids"]
            with torch.inference_mode():
                lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            out.append(float(sum(lp[t - 1, whole[t]] for t in range(len(c), len(whole)))))
    finally:
        handle.remove()
    return out


def test_loglikelihood_equals_hooked_full_model(tiny_llama):
    from fc_edge.eval.lm_eval_backend import FcEdgeLM

    tok = CharTokenizer()
    reqs = [("Question: q1?\nAnswer:", " yes"), ("Question: q1?\nAnswer:", " no way"),
            ("Question: a longer question?\nAnswer:", " z")]
    lm = FcEdgeLM(pretrained=(tiny_llama, tok), split_layer=2, codec="int8", batch_size=2)
    got = lm.loglikelihood([SimpleNamespace(args=r) for r in reqs], disable_tqdm=True)
    (setting,) = build_settings("int8")
    want = _hooked_logliks(tiny_llama, tok, 2, setting, reqs)
    assert [ll for ll, _ in got] == pytest.approx(want, rel=1e-5, abs=1e-5)
    with pytest.raises(NotImplementedError):
        lm.generate_until([])
