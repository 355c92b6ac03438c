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


# --- the bundle: one copy of the weights, the head alone -----------------------------------------


def safetensors_ranges(path):
    """name -> (offset, length) in the file, from its header as the format's spec says."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(n))
    entries.pop("__metadata__", None)
    return {k: (8 + n + e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0])
            for k, e in entries.items()}


@pytest.mark.parametrize("fixture", ["llama_engine", "qwen2_fourier_engine"])
def test_graphs_point_into_the_head_weights(request, fixture):
    """Both graphs hold every head matrix as external data at that tensor's bytes in
    head.safetensors (one copy shared by the graphs and the torch runner); the file holds the
    head's tensors and nothing else."""
    result = request.getfixturevalue(fixture)
    folder, m = result.folder, result.manifest
    ranges = safetensors_ranges(folder / "head.safetensors")
    layer = m["split_layer"]
    assert {int(k.split(".")[2]) for k in ranges if k.startswith("model.layers.")} == \
        set(range(layer))
    assert {k for k in ranges if not k.startswith("model.layers.")} == {
        "model.embed_tokens.weight"}
    matrices = {k for k in ranges if not k.endswith("norm.weight") and "bias" not in k}
    for graph in ("prefill", "decode"):
        proto = onnx.load(str(folder / m["graphs"][graph]["file"]), load_external_data=False)
        external = {}
        for init in proto.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                kv = {e.key: e.value for e in init.external_data}
                assert kv["location"] == "head.safetensors"
                external["model." + init.name.removeprefix("head.")] = (int(kv["offset"]),
                                                                        int(kv["length"]))
            else:
                assert len(init.raw_data) <= 4096, init.name  # small constants stay inline
        assert matrices <= set(external)
        assert all(external[k] == ranges[k] for k in external)
    assert m["weights"]["bytes"] == (folder / "head.safetensors").stat().st_size


def test_float16_graphs_keep_statistics_and_the_dft_in_float32(qwen2_fourier_engine, tmp_path):
    """The float16 ONNX a strongly typed TensorRT build runs: RMSNorm's square and mean,
    softmax and the fourier block's matrix products take float32 inputs (ONNX's own type
    inference is the oracle), while the weight matmuls run in float16."""
    from fc_edge.engine.export import export_engine

    model = qwen2_fourier_engine.manifest["model"]
    result = export_engine(model, 1, tmp_path / "b", fourier=(3, 8), float16=True,
                           exporter="torchscript", tensorrt=False)
    path = result.folder / result.manifest["graphs_float16"]["prefill"]["file"]
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    shapes = {i.name: list(i.dims) for i in proto.graph.initializer}
    for n in proto.graph.node:  # Constant nodes' outputs
        if n.op_type == "Constant":
            types[n.output[0]] = n.attribute[0].t.data_type
            shapes[n.output[0]] = list(n.attribute[0].t.dims)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    stats = [n for n in proto.graph.node if n.op_type in ("ReduceMean", "Pow", "Softmax")]
    assert {n.op_type for n in stats} == {"ReduceMean", "Pow", "Softmax"}
    assert all(types[n.input[0]] == f32 for n in stats)
    dft = [n for n in proto.graph.node if n.op_type == "MatMul"
           and any(shapes.get(x) == [64, 8] for x in n.input)]
    assert len(dft) == 2 and all(types[x] == f32 for n in dft for x in n.input)
    weights = [n for n in proto.graph.node if n.op_type == "MatMul" and n not in dft]
    assert weights and any(types[n.input[0]] == f16 for n in weights)


def test_a_bundle_is_not_a_model_to_serve(llama_engine):
    from fc_edge.errors import ModelError
    from fc_edge.models.pretrained import load_model

    with pytest.raises(ModelError, match="device bundle"):
        load_model(str(llama_engine.folder))


def test_torch_backend_runs_the_bundle_weights(llama_engine, tiny_llama):
    """`--engine-backend torch`: our head over the bundle's memory-mapped head.safetensors,
    equal to the head split from the model."""
    from fc_edge.engine import open_bundle

    device = open_bundle(llama_engine.folder, "torch").device_head()
    head, _ = split(tiny_llama, 2)
    ids = torch.arange(3, 14)
    torch.testing.assert_close(device.head.start(11).step(ids), head.start(11).step(ids),
                               rtol=0, atol=0)
    assert device.fingerprint == model_fingerprint(tiny_llama)


@pytest.mark.parametrize(("extra", "message"), [
    (["--model", "synthetic:tiny-llama"], "drop --model"),
    (["--engine-backend", "onnxruntime", "--device", "cpu"], "drop --device"),
])
def test_cli_engine_mistakes_are_one_line(llama_engine, extra, message, capsys):
    from fc_edge.cli import main

    rc = main(["generate", "--engine", str(llama_engine.folder), "--server", "127.0.0.1:1",
               "--prompt", "hi", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and message in err[0], err


def test_the_bundle_tokenizer_answers_as_transformers(smollm2_engine):
    """The device reads the bundle's tokenizer.json with the tokenizers library alone; the
    oracle is transformers' tokenizer over the same folder: ids of texts with special tokens,
    unicode and whitespace; the text of random ids, special tokens skipped or kept; the chat
    prompt; the EOS id."""
    import random

    from transformers import AutoTokenizer

    from fc_edge.models.checkpoint import BundleTokenizer, open_checkpoint

    folder = smollm2_engine.folder
    ours = open_checkpoint(str(folder)).tokenizer()
    ref = AutoTokenizer.from_pretrained(folder)
    assert isinstance(ours, BundleTokenizer) and ours.eos_token_id == ref.eos_token_id
    for text in ["The capital of France is", "  two spaces\n\ttab", "<|im_start|>user\nhi",
                 "héllo wörld 東京 🚀", "", "def f(x):\n    return x ** 2"]:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(ref.vocab_size) for _ in range(rng.randrange(1, 24))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                ref.decode(ids, skip_special_tokens=skip)
    chat = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                    return_dict=False) == \
        ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                return_dict=False)
