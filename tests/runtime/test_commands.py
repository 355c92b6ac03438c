"""`fc-edge serve | generate | demo`: the demo end to end, and one-line errors for mistakes."""

from __future__ import annotations

import socket

import pytest

from fc_edge.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture
def cached_smollm2(smollm2, monkeypatch):
    """The CLI's load_model answers the default model from the session fixture."""
    import fc_edge.models.pretrained as pretrained

    real = pretrained.load_model

    def load(spec="smollm2-135m", *a, **kw):
        return smollm2 if spec == "smollm2-135m" else real(spec, *a, **kw)

    monkeypatch.setattr(pretrained, "load_model", load)
    return smollm2


def test_demo(cached_smollm2, capsys):
    assert main(["demo", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    for name in ("identity", "fourier", "int8", "rotated"):
        assert f"[{name}] " in out
        assert any(line.startswith(name + " ") for line in out.splitlines())
    assert "vs fp16 pre" in out and "6/6 (6)" in out  # identity agrees with itself


def test_generate_against_a_server(cached_smollm2, capsys):
    from fc_edge.runtime.server import start_server

    with start_server(cached_smollm2[0], 4, port=0, token="tk") as handle:
        rc = main(["generate", "--server", handle.address, "--split-layer", "4", "--prompt",
                   "Hi", "--chat", "--codec", "fourier", "--ratio", "4", "--max-new-tokens", "5",
                   "--token", "tk"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip()  # the text on stdout, the stage table on stderr
    assert "prefill (x1)" in err and "tokens, time to first token" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, message", [
    (["demo", "--codecs", "nope"], "unknown codec 'nope'"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["demo", "--model", "/no/such/model"], "no such file or folder"),
    (["serve", "--model", "synthetic:tiny-llama", "--split-layer", "9"],
     "split layer must be an integer in 1..3"),
    (["serve", "--model", "synthetic:tiny-llama", "--tls-cert", "x.pem"],
     "TLS needs both --tls-cert and --tls-key"),
    (["serve", "--model", "synthetic:tiny-llama", "--device", "tpu"], "unknown device 'tpu'"),
    (["serve", "--model", "synthetic:tiny-llama", "--max-batch", "0"],
     "max_batch must be an integer >= 1"),
    (["serve", "--model", "synthetic:tiny-llama", "--open-timeout", "0"],
     "open_timeout_s must be > 0"),
    (["demo", "--device", "cuda:x"], "unknown device 'cuda:x'"),
    (["generate", "--server", "127.0.0.1:1", "--model", "synthetic:tiny-llama", "--prompt",
      "hi", "--codec", "nope"], "unknown codec 'nope'"),
    (["generate", "--server", "127.0.0.1:1", "--model", "synthetic:tiny-llama", "--prompt",
      "hi", "--codec", "int8"], "has no tokenizer"),
])
def test_user_mistakes_are_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("verb", [["serve", "--model", "synthetic:tiny-llama"],
                                  ["demo", "--model", "synthetic:tiny-llama"],
                                  ["generate", "--server", "127.0.0.1:1", "--prompt", "hi",
                                   "--model", "synthetic:tiny-llama"],
                                  ["profile", "--model", "synthetic:tiny-llama"],
                                  ["eval", "--model", "synthetic:tiny-llama"]])
def test_missing_gpu_is_one_line(verb, capsys):
    assert main([*verb, "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sees no CUDA GPU" in err[0] and "--device cpu" in err[0], err


def test_unreachable_server_is_one_line(cached_smollm2, capsys):
    port = free_port()
    argv = ["generate", "--server", f"127.0.0.1:{port}", "--prompt", "hi", "--codec", "int8",
            "--max-new-tokens", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "UNAVAILABLE" in err[0], err
