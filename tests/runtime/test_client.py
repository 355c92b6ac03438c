"""Split generation over a real loopback server equals the model's own greedy generation."""

from __future__ import annotations

import pytest
import torch

from fc_edge.runtime.client import DeviceClient
from fc_edge.runtime.server import start_server

pytestmark = pytest.mark.slow


def hf_greedy(model, ids: torch.Tensor, n: int, eos=None) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids[None], attention_mask=torch.ones_like(ids)[None],
                             max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos if eos is not None else 0)
    return out[0, ids.numel():].tolist()


@pytest.mark.parametrize(("fixture", "layer"), [("tiny_llama", 1), ("tiny_qwen2", 3)])
def test_identity_equals_generate_tiny(fixture, layer, request):
    model = request.getfixturevalue(fixture)
    ids = torch.tensor([1, 17, 42, 99, 3, 250, 7])
    expected = hf_greedy(model, ids, 64)
    with start_server(model, layer, port=0) as handle, \
            DeviceClient(handle.address, model, layer, "identity") as client:
        result = client.generate(ids, 64, eos_token_id=None)
    assert result.token_ids == expected
    assert len(result.steps) == 64


def test_identity_equals_generate_smollm2(smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor(tokenizer("The three primary colors are")["input_ids"])
    eos = model.generation_config.eos_token_id
    expected = hf_greedy(model, ids, 64, eos=eos)
    with start_server(model, 8, port=0) as handle, \
            DeviceClient(handle.address, smollm2, 8, "identity") as client:
        result = client.generate(ids, 64)
        text = client.generate("The three primary colors are", 8)  # the tokenizer path
    assert result.token_ids == expected
    assert text.token_ids == expected[:8]
    assert text.text == tokenizer.decode(expected[:8], skip_special_tokens=True)


def test_codec_matches_in_process_reference(tiny_llama):
    """With a lossy codec the networked run equals the in-process split with the same codec."""
    from fc_edge.codecs import get_codec
    from fc_edge.models.local import generate_split
    from fc_edge.models.split import split

    ids = torch.tensor([5, 6, 7, 8, 9, 10])
    head, tail = split(tiny_llama, layer=2)
    for name in ("int8", "bf16"):
        codec = get_codec(name)
        expected = generate_split(head, tail, ids, 20, codec=codec)
        with start_server(tiny_llama, 2, port=0) as handle, \
                DeviceClient(handle.address, tiny_llama, 2, name) as client:
            assert client.generate(ids, 20, eos_token_id=None).token_ids == expected


def test_engine_head_drop_in(tiny_llama):
    """Any object with start(max_seq_len).step(ids) can stand in for the head."""
    from fc_edge.models.split import split

    head, _ = split(tiny_llama, layer=2)
    calls = []

    class Runner:
        def start(self, max_seq_len):
            session = head.start(max_seq_len)

            class Session:
                def step(self, ids):
                    calls.append(ids.numel())
                    return session.step(ids)
            return Session()

    from fc_edge.models.pretrained import model_fingerprint

    ids = torch.arange(1, 6)
    with start_server(tiny_llama, 2, port=0) as handle:
        client = DeviceClient(handle.address, None, 2, "identity", head=Runner(),
                              fingerprint=model_fingerprint(tiny_llama))
        out = client.generate(ids, 5, eos_token_id=None)
    assert out.token_ids == hf_greedy(tiny_llama, ids, 5)
    assert calls == [5, 1, 1, 1, 1]
