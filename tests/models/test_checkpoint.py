"""The lazy checkpoint reader: what it reads of a model's files (a file-access check), GGUF and
bfloat16 files against transformers' own loading, hub ids from the local Hugging Face cache."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch

from fc_edge.errors import ModelError
from fc_edge.models.checkpoint import open_checkpoint
from fc_edge.models.pretrained import load_model, model_fingerprint
from fc_edge.models.split import channel_weights, split


def header(path) -> tuple[int, dict]:
    """The safetensors header, read as the format's spec says (an independent reader):
    8 bytes little-endian length N, N bytes of JSON; data starts at 8 + N."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(n))
    entries.pop("__metadata__", None)
    return 8 + n, entries


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A Llama whose MLP matrices hold 1.2 M elements each (4.7 MB), so the fingerprint's 1024
    samples of one lie more than a page apart; saved to a folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=4608,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("wide-llama")
    model.save_pretrained(folder)
    return model, folder


def test_a_folder_is_read_head_and_samples_only(wide_llama, monkeypatch):
    """A file-access check: every tensor read whole (through safetensors.safe_open) is the
    embedding, a layer < L, or an input-norm gain after the split (the channel weights); of
    every other tensor, only the fingerprint's 1024 elements are read (os.preadv, 4 bytes each
    where they lie over a page apart). The head still equals the model's."""
    import safetensors

    from fc_edge.models import checkpoint as checkpoint_module

    model, folder = wide_llama
    whole: list[str] = []
    reads: list[tuple[int, int]] = []
    real_open, real_preadv = safetensors.safe_open, os.preadv

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            whole.append(name)
            return self.inner.get_tensor(name)

    def preadv(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        reads.append((offset, got))
        return got

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    monkeypatch.setattr(checkpoint_module.os, "preadv", preadv)
    device = open_checkpoint(str(folder)).device_head(2)

    assert device.fingerprint == model_fingerprint(model)
    allowed = {"model.embed_tokens.weight"} | {n for n in model.state_dict()
                                              if n.startswith(("model.layers.0.",
                                                               "model.layers.1."))}
    allowed |= {f"model.layers.{i}.input_layernorm.weight" for i in (2, 3)}
    assert set(whole) <= allowed and allowed - set(whole) == set()
    start, entries = header(folder / "model.safetensors")
    big = [n for n, e in entries.items() if n.startswith(("model.layers.2.mlp",
                                                          "model.layers.3.mlp"))]
    assert len(big) == 6
    for name in big:
        lo, hi = (start + o for o in entries[name]["data_offsets"])
        inside = [n for off, n in reads if lo <= off < hi]
        assert len(inside) == 1024 and sum(inside) == 1024 * 4, name
    ids = torch.randint(0, 512, (9,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(device.head.start(9).step(ids),
                               split(model, 2)[0].start(9).step(ids), rtol=0, atol=0)
    # the head's weights are views of the mapped file, not copies
    assert not device.head.embed_tokens.weight.untyped_storage().resizable()


def test_bfloat16_files_give_the_float32_fingerprint(tiny_llama, tmp_path):
    import copy

    copy.deepcopy(tiny_llama).to(torch.bfloat16).save_pretrained(tmp_path)  # never in place
    assert open_checkpoint(str(tmp_path)).fingerprint() == \
        model_fingerprint(load_model(str(tmp_path))[0])


def write_tiny_gguf(path, layers=3, hidden=64, heads=4, kv=2, ff=96, vocab=256):
    """A Llama GGUF written with the gguf package: Q8_0 matrices, float32 norms, no
    tokenizer (transformers reverses the q/k row order of llama.cpp on load)."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    hd = hidden // heads

    def mat(name, shape):
        a = (rng.standard_normal(shape) * 0.08).astype(np.float32)
        q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def vec(name, n):
        w.add_tensor(name, (1 + 0.3 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        vec(f"blk.{i}.attn_norm.weight", hidden)
        mat(f"blk.{i}.attn_q.weight", (heads * hd, hidden))
        mat(f"blk.{i}.attn_k.weight", (kv * hd, hidden))
        mat(f"blk.{i}.attn_v.weight", (kv * hd, hidden))
        mat(f"blk.{i}.attn_output.weight", (hidden, heads * hd))
        vec(f"blk.{i}.ffn_norm.weight", hidden)
        mat(f"blk.{i}.ffn_gate.weight", (ff, hidden))
        mat(f"blk.{i}.ffn_up.weight", (ff, hidden))
        mat(f"blk.{i}.ffn_down.weight", (hidden, ff))
    vec("output_norm.weight", hidden)
    mat("output.weight", (vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_head_reads_its_tensors_alone(tmp_path, monkeypatch):
    """A GGUF file: the fingerprint and the head equal transformers' own load of the file (its
    dequantization and q/k row order); the fingerprint is cached; then a head reads the byte
    ranges of token_embd and blk.0 / blk.1 alone (plus blk.2's attn_norm: channel weights)."""
    from gguf import GGUFReader

    from fc_edge.models import checkpoint as checkpoint_module

    monkeypatch.setenv("FC_EDGE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    model, tokenizer = load_model(str(path))
    assert tokenizer is None and type(model).__name__ == "LlamaForCausalLM"
    checkpoint = open_checkpoint(str(path))
    assert checkpoint.fingerprint() == model_fingerprint(model)
    assert list((tmp_path / "cache" / "fingerprints").iterdir())

    reads: list[tuple[int, int]] = []
    real = os.preadv

    def preadv(fd, buffers, offset):
        got = real(fd, buffers, offset)
        reads.append((offset, got))
        return got

    monkeypatch.setattr(checkpoint_module.os, "preadv", preadv)
    device = open_checkpoint(str(path)).device_head(2)
    assert device.fingerprint == model_fingerprint(model) and device.tokenizer is None
    ranges = {t.name: (int(t.data_offset), int(t.data_offset) + int(t.n_bytes))
              for t in GGUFReader(path).tensors}
    read_names = {n for off, got in reads for n, (lo, hi) in ranges.items()
                  if lo <= off and off + got <= hi}
    assert len(read_names) == len(reads)  # every read lies inside one tensor
    assert read_names == {"token_embd.weight", "blk.2.attn_norm.weight"} | {
        n for n in ranges if n.startswith(("blk.0.", "blk.1."))}
    ids = torch.arange(3, 15)
    torch.testing.assert_close(device.head.start(12).step(ids),
                               split(model, 2)[0].start(12).step(ids), rtol=0, atol=0)
    torch.testing.assert_close(device.channel_weights, channel_weights(model, 2), rtol=0, atol=0)


def make_hub_cache(root, repo_id, model, revision="0123abc"):
    """The layout huggingface_hub leaves: models--ORG--NAME/refs/main and snapshots/REV/."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    model.save_pretrained(repo / "snapshots" / revision)
    return repo / "snapshots" / revision


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_hub_id_resolves_from_the_local_cache(tiny_qwen2, tmp_path, monkeypatch, variable):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "hub"
    monkeypatch.setenv(variable, str(hub if variable == "HF_HUB_CACHE" else tmp_path))
    make_hub_cache(hub, "tiny-org/tiny-qwen2", tiny_qwen2)
    monkeypatch.chdir(tmp_path)  # the id is no local path
    model, _ = load_model("tiny-org/tiny-qwen2")
    assert model_fingerprint(model) == model_fingerprint(tiny_qwen2)
    assert open_checkpoint("tiny-org/tiny-qwen2").fingerprint() == model_fingerprint(tiny_qwen2)
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        load_model("tiny-org/absent")


def test_checks_before_any_weight(tmp_path, tiny_llama):
    """An unsupported family and a split layer out of range fail on the config alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fc_edge.errors import ConfigError

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(
        tmp_path / "gpt2")
    (tmp_path / "gpt2" / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ModelError, match="GPT2LMHeadModel.*supported families"):
        open_checkpoint(str(tmp_path / "gpt2"))
    tiny_llama.save_pretrained(tmp_path / "llama")
    checkpoint = open_checkpoint(str(tmp_path / "llama"))
    with pytest.raises(ConfigError, match=r"1\.\.3"):
        checkpoint.device_head(4)
