"""Calibrated codecs (``klt``) through the gRPC runtime: a session's ``Open`` names the
calibration artifact by its SHA-256, the server refuses what it has not loaded, and each
session's decode rows are decoded with the token the server sampled last, as the device encoded
them. The oracle is the in-process split (``generate_split``) with the same artifact (and, for
the sessions without a calibration, the model's own greedy generation)."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from together import run_together  # tests/runtime is on sys.path (pytest rootdir mode)

from fc_edge.codecs import get_codec, wire
from fc_edge.codecs.calibration import fit, model_context
from fc_edge.errors import ConfigError
from fc_edge.runtime.client import DeviceClient, SessionError
from fc_edge.runtime.proto import pb2, pb2_grpc
from fc_edge.runtime.protocol import PROTOCOL_VERSION
from fc_edge.runtime.server import start_server

pytestmark = pytest.mark.slow

LAYER = 2
PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 61, 128, 33])


class ByteTokenizer:
    """Text -> its UTF-8 bytes as token ids (the tiny models' vocabulary is 256)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    """A tiny klt artifact of tiny-llama after layer LAYER, fitted on random text."""
    g = torch.Generator().manual_seed(1)
    texts = ["".join(chr(int(c)) for c in torch.randint(32, 127, (96,), generator=g))
             for _ in range(8)]
    cal = fit(tiny_llama, ByteTokenizer(), LAYER, texts, progress=False)
    return cal.save(tmp_path_factory.mktemp("cal"))


@pytest.fixture(scope="module")
def server(tiny_llama, artifact):
    handle = start_server(tiny_llama, LAYER, port=0, calibrations=[artifact])
    yield handle
    handle.stop()


def digest(path) -> str:
    return json.loads(path.with_suffix(".json").read_text())["sha256"]


def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids[None], attention_mask=torch.ones_like(ids)[None],
                             max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, ids.numel():].tolist()


def open_frame(fingerprint: str, codec: str = "klt", config: str = "{}",
               calibration: str = "") -> pb2.ClientFrame:
    return pb2.ClientFrame(open=pb2.Open(
        protocol_version=PROTOCOL_VERSION, model_fingerprint=fingerprint, split_layer=LAYER,
        codec=pb2.CodecSpec(name=codec, config_json=config), max_seq_len=64,
        max_new_tokens=4, calibration=calibration))


def refusal(server, frame) -> grpc.RpcError:
    stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(server.address))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(iter([frame]), timeout=30))
    assert "\n" not in info.value.details()
    return info.value


def test_klt_over_grpc_equals_the_in_process_split(server, tiny_llama, artifact):
    from fc_edge.codecs.calibration import load
    from fc_edge.models.local import generate_split
    from fc_edge.models.split import split

    head, tail = split(tiny_llama, LAYER)
    cal = load(artifact)
    codec = get_codec("klt", bits=4).bind(model_context(tiny_llama, LAYER, cal))
    want = generate_split(head, tail, PROMPT, 16, codec=codec)
    payloads = []
    with DeviceClient(server.address, tiny_llama, LAYER, get_codec("klt", bits=4),
                      calibration=artifact) as client:
        encode = client._encode

        def recording(a, tokens=None):
            out = encode(a, tokens)
            payloads.append(out[0])
            return out

        client._encode = recording
        got = client.generate(PROMPT, 16, eos_token_id=None)
    assert got.token_ids == want
    assert {s.codec for s in got.steps} == {"klt"}
    # the prefill is coded against the means, every decode row against its token's prediction
    predict = [_predict_param(p) for p in payloads]
    assert predict == [0] + [1] * 15


def _predict_param(payload: bytes) -> int:
    """The ``predict`` wire parameter of a klt payload, read from its header (after the fixed
    6 bytes and the shape's varints come calibration, predict, ...), without decoding it."""
    pos, values = 6, []
    while len(values) < payload[5] + 2:  # shape dims, then calibration, then predict
        value, shift = 0, 0
        while True:
            b = payload[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        values.append(value)
    return values[-1]


def test_concurrent_klt_sessions_keep_their_own_state(server, tiny_llama, artifact):
    """Each session's decode rows are decoded with its own last sampled token: sessions run at
    once (their steps batched together) each give the in-process split's tokens."""
    from fc_edge.codecs.calibration import load
    from fc_edge.models.local import generate_split
    from fc_edge.models.split import split

    head, tail = split(tiny_llama, LAYER)
    codec = get_codec("klt", bits=4).bind(model_context(tiny_llama, LAYER, load(artifact)))
    prompts = [PROMPT[i:] for i in range(3)]
    want = [generate_split(head, tail, p, 10, codec=codec) for p in prompts]
    assert len({tuple(w) for w in want}) == 3  # different sessions, different tokens

    def work(i: int) -> list[int]:
        with DeviceClient(server.address, tiny_llama, LAYER, get_codec("klt", bits=4),
                          calibration=artifact) as client:
            return client.generate(prompts[i], 10, eos_token_id=None).token_ids

    assert run_together(3, work) == want


def test_info_lists_the_artifact_and_an_old_client_still_works(server, tiny_llama, artifact):
    with DeviceClient(server.address, tiny_llama, LAYER, "identity") as client:
        assert list(client.info().calibrations) == [digest(artifact)]
        # an Open without the calibration field (an old client): none, as before
        got = client.generate(PROMPT, 8, eos_token_id=None)
    assert got.token_ids == hf_greedy(tiny_llama, PROMPT, 8)


def test_refusals(server, artifact):
    fp = server.fingerprint
    e = refusal(server, open_frame(fp, calibration="ab" * 32))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "not loaded" in e.details()
    e = refusal(server, open_frame(fp))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs a calibration" in e.details()
    for bad in ("xyz", digest(artifact)[:63], digest(artifact).upper(), "klt-" + "0" * 16):
        e = refusal(server, open_frame(fp, calibration=bad))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "SHA-256" in e.details()
    # config_json must never name a file the server would read
    for cal in ("", digest(artifact)):
        e = refusal(server, open_frame(fp, config=json.dumps({"calibration": str(artifact)}),
                                       calibration=cal))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must not name a calibration" in e.details()


def test_a_payload_of_another_artifact_ends_only_its_session(server, tiny_llama, artifact,
                                                              tmp_path):
    """A payload coded with an artifact other than the one the session named is refused
    (INVALID_ARGUMENT); the server's shared state is untouched: the next session generates
    as before."""
    from fc_edge.codecs.calibration import load
    from fc_edge.models.local import generate_split
    from fc_edge.models.split import split

    g = torch.Generator().manual_seed(2)
    texts = ["".join(chr(int(c)) for c in torch.randint(32, 127, (96,), generator=g))
             for _ in range(8)]
    other = load(fit(tiny_llama, ByteTokenizer(), LAYER, texts, progress=False).save(tmp_path))
    head, tail = split(tiny_llama, LAYER)
    codec = get_codec("klt", bits=4).bind(model_context(tiny_llama, LAYER, other))
    payload = wire.pack(codec.encode(head.start(64).step(PROMPT)))
    frames = [open_frame(server.fingerprint, calibration=digest(artifact)),
              pb2.ClientFrame(activation=pb2.Activation(step=0, payload=payload))]
    stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(server.address))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(iter(frames), timeout=30))
    e = info.value
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "calibration" in e.details()
    mine = get_codec("klt", bits=4).bind(model_context(tiny_llama, LAYER, load(artifact)))
    with DeviceClient(server.address, tiny_llama, LAYER, get_codec("klt", bits=4),
                      calibration=artifact) as client:
        assert client.generate(PROMPT, 6, eos_token_id=None).token_ids \
            == generate_split(head, tail, PROMPT, 6, codec=mine)
    assert server.active_sessions() == 0


def test_client_checks_the_servers_artifacts(tiny_llama, artifact):
    with start_server(tiny_llama, LAYER, port=0) as bare:
        with pytest.raises(ConfigError, match="has not loaded calibration"):
            DeviceClient(bare.address, tiny_llama, LAYER, get_codec("klt"),
                         calibration=artifact)
    with pytest.raises(ConfigError, match="needs its calibration artifact"):
        DeviceClient("127.0.0.1:1", tiny_llama, LAYER, "klt")


def test_server_refuses_an_artifact_of_another_split(tiny_llama, artifact):
    with pytest.raises(ConfigError, match="fitted after layer 2, the split is at layer 1"):
        start_server(tiny_llama, 1, port=0, calibrations=[artifact])


def test_session_error_names_the_refusal(server, tiny_llama, artifact, monkeypatch):
    """Through the client: an Open naming an artifact the server lacks is a one-line
    SessionError (FAILED_PRECONDITION), not a traceback."""
    with DeviceClient(server.address, tiny_llama, LAYER, get_codec("klt"),
                      calibration=artifact) as client:
        monkeypatch.setattr(type(client), "calibration_hash", property(lambda self: "cd" * 32))
        with pytest.raises(SessionError) as info:
            client.generate(PROMPT, 2, eos_token_id=None)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_an_engine_head_refuses_klt_in_one_line(server, tiny_llama, artifact):
    """A head run by ONNX Runtime or TensorRT (an exported bundle's graphs) has no torch layers
    to run on each token alone, which klt's decode-step predictor needs: refused at once."""

    class OnnxHead:  # what fc_edge.engine.runner.EngineHead shows of itself
        backend = "onnxruntime"
        hidden_size = 64

        def start(self, max_seq_len):
            raise AssertionError("never started")

    with pytest.raises(ConfigError, match="the onnxruntime engine cannot run codec klt") as e:
        DeviceClient(server.address, tiny_llama, LAYER, get_codec("klt", bits=4),
                     head=OnnxHead(), calibration=artifact)
    assert "\n" not in str(e.value) and "--engine-backend torch" in str(e.value)


def test_cli_one_line_errors_and_info(server, artifact, capsys):
    from fc_edge.cli import main

    assert main(["generate", "--model", "synthetic:tiny-llama", "--split-layer", str(LAYER),
                 "--server", server.address, "--codec", "klt", "--bits", "4.5",
                 "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fc-edge generate: error:") and "--calibration PATH" in err
    assert "\n" not in err
    assert main(["serve", "--model", "synthetic:tiny-llama", "--split-layer", "1", "--port",
                 "0", "--calibration", str(artifact)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"fc-edge serve: error: calibration {artifact.stem} was fitted after layer "
                   f"{LAYER}, the split is at layer 1")
    assert main(["info", server.address]) == 0
    assert f"calibrations           {digest(artifact)}" in capsys.readouterr().out
