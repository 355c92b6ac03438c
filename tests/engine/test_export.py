"""Export: files, manifest, the ONNX checker, and parity with the torch head on onnxruntime."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from fc_edge.engine.export import TOLERANCE, file_sha256, relative_error
from fc_edge.engine.runner import EngineHead
from fc_edge.models.pretrained import model_fingerprint
from fc_edge.models.split import split


def check_manifest(result, model, layer):
    folder, m = result.folder, result.manifest
    assert json.loads((folder / "manifest.json").read_text()) == m
    assert m["model_fingerprint"] == model_fingerprint(model)
    assert m["split_layer"] == layer and m["opset"] == 18 and m["dtype"] == "float32"
    for name, info in m["files"].items():
        assert file_sha256(folder / name) == info["sha256"]
    for graph in ("prefill", "decode"):
        path = folder / m["graphs"][graph]["file"]
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        assert {o.domain: o.version for o in proto.opset_import}[""] == 18
        assert all(n.op_type != "DFT" for n in proto.graph.node)  # runs on any TensorRT
    dec = m["graphs"]["decode"]
    for i in range(layer):
        for kind in ("key", "value"):
            past = dec["inputs"][f"past_key_values.{i}.{kind}"]
            assert past["dtype"] == "float32" and isinstance(past["shape"][2], str)
            assert f"present.{i}.{kind}" in dec["outputs"]
            assert f"present.{i}.{kind}" in m["graphs"]["prefill"]["outputs"]
    assert dec["inputs"]["input_ids"]["shape"] == [1, 1]
    assert isinstance(m["graphs"]["prefill"]["inputs"]["input_ids"]["shape"][1], str)
    errors = m["verification"]["max_relative_error"]
    assert errors and max(errors.values()) <= TOLERANCE


def check_parity(folder, head, lengths=(5, 17), decode=4):
    """Fresh prompts of other lengths than the export's; a multi-token step after prefill."""
    engine = EngineHead(folder, providers=["CPUExecutionProvider"], threads=1)
    gen = torch.Generator().manual_seed(1)
    for n in lengths:
        ids = torch.randint(0, head.decoder_config.vocab_size, (n + decode + 2,), generator=gen)
        hs, es = head.start(n + decode + 2), engine.start(n + decode + 2)
        steps = [ids[:n]] + [ids[n + j : n + j + 1] for j in range(decode)] + [ids[n + decode :]]
        for chunk in steps:
            assert relative_error(es.step(chunk), hs.step(chunk)) <= TOLERANCE
    return engine


def test_tiny_llama_export(llama_engine, tiny_llama):
    check_manifest(llama_engine, tiny_llama, 2)
    assert llama_engine.manifest["fourier"] is None
    head, _ = split(tiny_llama, 2)
    engine = check_parity(llama_engine.folder, head)
    assert engine.layer == 2 and engine.hidden_size == 64
    assert engine.config.model_type == "llama"


def test_tiny_qwen2_fourier_export(qwen2_fourier_engine, tiny_qwen2):
    from fc_edge.codecs.spectral import FourierCodec

    check_manifest(qwen2_fourier_engine, tiny_qwen2, 1)
    f = qwen2_fourier_engine.manifest["fourier"]
    assert (f["k_s"], f["k_d"], f["prefill_rows"]) == (3, 8, 5)
    head, _ = split(tiny_qwen2, 1)
    engine = check_parity(qwen2_fourier_engine.folder, head)
    codec = FourierCodec(k_s=3, k_d=8, value_dtype="float32")
    es = engine.start(32)
    for chunk in (torch.arange(20, 31), torch.tensor([7]), torch.tensor([9])):
        a = es.step(chunk)
        enc = codec.encode(a)  # FourierCodec's own block: coefficients x scale
        block = enc.tensors["coefs"].float() * enc.tensors["scale"].view(-1, 1, 1, 1)
        assert es.last_block.shape == block.shape
        assert relative_error(es.last_block, block) < 1e-5
    short = engine.start(8)
    a = short.step(torch.tensor([1, 2, 3]))  # shorter than the block: computed outside
    assert relative_error(short.last_block, codec.encode(a).tensors["coefs"]
                          * codec.encode(a).tensors["scale"].view(-1, 1, 1, 1)) < 1e-5


def test_smollm2_export(smollm2_engine, smollm2):
    model = smollm2[0]
    check_manifest(smollm2_engine, model, 1)
    head, _ = split(model, 1)
    check_parity(smollm2_engine.folder, head, lengths=(9,), decode=2)


def test_session_limits(llama_engine):
    from fc_edge.errors import ConfigError

    es = EngineHead(llama_engine.folder, threads=1).start(4)
    with pytest.raises(ConfigError, match="at least one token"):
        es.step(torch.tensor([], dtype=torch.long))
    with pytest.raises(ConfigError, match="larger max_seq_len"):
        es.step(torch.arange(5))


def test_not_an_engine(tmp_path):
    from fc_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="fc-edge export"):
        EngineHead(tmp_path)
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        from fc_edge.engine.runner import select_providers

        select_providers(["NoSuchExecutionProvider"])


def test_cli_tensorrt_missing_is_one_line(capsys, tmp_path):
    import importlib.util

    from fc_edge.cli import main

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    rc = main(["export", "--model", "synthetic:tiny-llama", "--split-layer", "1",
               "--out", str(tmp_path), "--tensorrt"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and "pip install tensorrt" in err
    assert not any(tmp_path.iterdir())


def test_cli_export_torchscript(capsys, tmp_path):
    from fc_edge.cli import main

    rc = main(["export", "--model", "synthetic:tiny-llama", "--split-layer", "1", "--out",
               str(tmp_path), "--exporter", "torchscript", "--in-graph-fourier", "--ratio", "8"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["fourier"]["k_s"] >= 1 and "wrote" in out
    assert "[1/7] loading the model" in err and "head.safetensors" in err  # progress, on stderr


def test_cli_flags_need_in_graph_fourier(capsys, tmp_path):
    from fc_edge.cli import main

    rc = main(["export", "--model", "synthetic:tiny-llama", "--split-layer", "1",
               "--out", str(tmp_path), "--k-s", "2", "--k-d", "3"])
    assert rc == 1 and "--in-graph-fourier" in capsys.readouterr().err
