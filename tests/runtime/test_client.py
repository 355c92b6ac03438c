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


# --- the device as deployed: lazy heads, bundles, the CLI ----------------------------------------

LAYER = 2
PROMPT = "w1 w17 w42 w99 w3 w250 w7"


def word_tokenizer():
    """A word-level tokenizer over the tiny models' 256 ids: ``w<id>`` per token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


@pytest.fixture(scope="module")
def model_folder(tiny_llama, tmp_path_factory):
    """tiny Llama saved as a Hugging Face folder with a tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def expected(tiny_llama):
    ids = torch.tensor(word_tokenizer()(PROMPT)["input_ids"])
    return hf_greedy(tiny_llama, ids, 12)


# modules the device path must not import: plotting, simulation, code generation, the eval and
# server stacks, and any of transformers' model code (the device reads configs and tokenizers)
BLOCKER = r"""
import re, sys
# as if not installed: `import` fails and importlib.util.find_spec says None
for name in ("matplotlib", "simpy", "grpc_tools", "lm_eval", "ray", "scipy", "statsmodels",
             "accelerate", "grpc_health", "onnx", "onnxscript"):
    sys.modules[name] = None
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if re.match(r"transformers\.models\.\w+\.modeling_", name):
            raise ModuleNotFoundError(f"model code on the device: {name}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from fc_edge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_generate_from_a_bundle_alone(tiny_llama, model_folder, expected, tmp_path):
    """`fc-edge export`, then `fc-edge generate --engine DIR` in another process with the model
    folder moved away, an empty fc-edge cache, a Hugging Face hub offline, another working
    folder and the server-side, plotting and model-code packages blocked: the text streamed to
    stdout is Hugging Face's greedy generation, on onnxruntime and on torch."""
    import os
    import shutil
    import subprocess
    import sys

    from fc_edge.cli import main
    from fc_edge.models.checkpoint import BUNDLE_WEIGHTS

    src = tmp_path / "model"
    shutil.copytree(model_folder, src)
    bundle = tmp_path / "bundle"
    assert main(["export", "--model", str(src), "--split-layer", str(LAYER), "--out",
                 str(bundle), "--exporter", "torchscript", "--no-tensorrt"]) == 0
    shutil.move(src, tmp_path / "moved-away")
    (tmp_path / "empty-cache").mkdir()
    (tmp_path / "elsewhere").mkdir()
    from safetensors import safe_open

    with safe_open(str(bundle / BUNDLE_WEIGHTS), "pt") as f:  # the head, nothing of the tail
        assert {n.split(".")[2] for n in f.keys() if n.startswith("model.layers.")} == {"0", "1"}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "FC_EDGE_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "PYTHONPATH": repo,
           "OMP_NUM_THREADS": "1"}
    text = word_tokenizer().decode(expected, skip_special_tokens=True)
    with start_server(tiny_llama, LAYER, port=0) as handle:
        for backend in ("onnxruntime", "torch"):
            out = subprocess.run(
                [sys.executable, "-c", BLOCKER, "generate", "--engine", str(bundle),
                 "--engine-backend", backend, "--server", handle.address, "--prompt", PROMPT,
                 "--max-new-tokens", "12", "--codec", "identity"],
                capture_output=True, text=True, env=env, cwd=tmp_path / "elsewhere",
                timeout=300)
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == text, backend
            assert "prefill (x1)" in out.stderr and "12 tokens" in out.stderr


def test_cli_generate_from_a_model_folder(tiny_llama, model_folder, expected, capsys):
    from fc_edge.cli import main

    with start_server(tiny_llama, LAYER, port=0) as handle:
        rc = main(["generate", "--model", str(model_folder), "--split-layer", str(LAYER),
                   "--server", handle.address, "--prompt", PROMPT, "--max-new-tokens", "12",
                   "--codec", "identity"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip() == word_tokenizer().decode(expected, skip_special_tokens=True)


def test_rotated_from_a_bundle_binds_the_servers_channel_weights(tiny_llama, model_folder,
                                                                  tmp_path):
    """The bundle's channel weights (the tail's norm gains, from the manifest) are the server's
    to the bit: a rotated session decodes, with the tokens of the in-process split."""
    from fc_edge.codecs import get_codec
    from fc_edge.engine import export_engine, open_bundle
    from fc_edge.models.local import generate_split
    from fc_edge.models.split import bind_codec, split

    export_engine(tiny_llama, LAYER, tmp_path / "b", tokenizer=word_tokenizer(),
                  exporter="torchscript", tensorrt=False)
    ids = torch.tensor(word_tokenizer()(PROMPT)["input_ids"])
    head, tail = split(tiny_llama, LAYER)
    codec = bind_codec(get_codec("rotated", bits=8), tiny_llama, LAYER)
    want = generate_split(head, tail, ids, 8, codec=codec)
    with start_server(tiny_llama, LAYER, port=0) as handle:
        for backend in ("onnxruntime", "torch"):
            with DeviceClient(handle.address, open_bundle(tmp_path / "b", backend), None,
                              get_codec("rotated", bits=8)) as client:
                got = client.generate(ids, 8, eos_token_id=None)
            assert got.token_ids == want and {s.codec for s in got.steps} == {"rotated"}


def never_read(monkeypatch):
    """Make any read of a tensor fail the test."""
    from fc_edge.models import checkpoint

    def refuse(self, names):
        raise AssertionError(f"read {list(names)[:3]} before the servers were checked")

    for cls in (checkpoint.SafetensorsCheckpoint, checkpoint.GGUFCheckpoint):
        monkeypatch.setattr(cls, "read", refuse)


def test_servers_are_checked_before_any_weight(tiny_llama, tiny_qwen2, model_folder,
                                               monkeypatch):
    import socket

    from fc_edge.errors import ConfigError
    from fc_edge.runtime.client import SessionError

    never_read(monkeypatch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SessionError, match="cannot reach the server .*connection refused") as e:
        DeviceClient(dead, str(model_folder), LAYER, "identity")
    assert e.value.code.name == "UNAVAILABLE"
    with start_server(tiny_llama, LAYER, port=0) as handle:
        with pytest.raises(ConfigError, match=f"splits after layer {LAYER}, not 1"):
            DeviceClient(handle.address, str(model_folder), 1, "identity")
    with start_server(tiny_qwen2, LAYER, port=0) as handle:
        with pytest.raises(ConfigError, match="serves another model"):
            DeviceClient(handle.address, str(model_folder), LAYER, "identity")


def test_fallbacks_and_clamps_warn_once_and_strict_refuses(tiny_llama):
    from fc_edge.codecs import get_codec
    from fc_edge.errors import BudgetError

    ids = torch.arange(1, 10)
    with start_server(tiny_llama, LAYER, port=0) as handle:
        warnings: list[str] = []
        with DeviceClient(handle.address, tiny_llama, LAYER, get_codec("topk", ratio=1000),
                          on_warning=warnings.append) as client:
            result = client.generate(ids, 5, eos_token_id=None)
        assert [s.codec for s in result.steps] == ["fp16"] * 5
        # one line per kind: the prefill's shape, then the decode rows'
        assert len(warnings) == 2 and all("as fp16" in w for w in warnings)
        warnings.clear()
        with DeviceClient(handle.address, tiny_llama, LAYER,
                          get_codec("fourier", k_s=1000, k_d=1000),
                          on_warning=warnings.append) as client:
            client.generate(ids, 4, eos_token_id=None)
        assert any("k_s=1000 is clamped to 5" in w for w in warnings)
        assert any("no fewer than float16's" in w for w in warnings)
        assert len(warnings) == len(set(warnings))
        for codec in (get_codec("topk", ratio=1000), get_codec("fourier", k_s=1000, k_d=1000)):
            with DeviceClient(handle.address, tiny_llama, LAYER, codec, strict=True) as client:
                with pytest.raises(BudgetError, match="strict"):
                    client.generate(ids, 3, eos_token_id=None)


def test_token_printer_streams_whole_characters():
    from fc_edge.runtime.commands import TokenPrinter

    class Bytes:  # each token a byte of UTF-8: "é" is two tokens
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    writes: list[str] = []

    class Out:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    printer = TokenPrinter(Bytes(), Out())
    for i, b in enumerate("aé!".encode()):
        printer(i, b, "s")
    printer.finish()
    assert writes[:3] == ["a", "é", "!"] and "".join(writes) == "aé!\n"
