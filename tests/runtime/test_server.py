"""A real server on 127.0.0.1 (ephemeral port) with tiny synthetic models: sessions, limits,
auth, refusals and cleanup."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from together import run_together  # tests/runtime is on sys.path (pytest rootdir mode)

from fc_edge.runtime.client import DeviceClient, SessionError
from fc_edge.runtime.proto import pb2, pb2_grpc
from fc_edge.runtime.protocol import PROTOCOL_VERSION
from fc_edge.runtime.server import start_server

pytestmark = pytest.mark.slow

LAYER = 2


@pytest.fixture(scope="module")
def server(tiny_llama):
    handle = start_server(tiny_llama, LAYER, port=0, max_sessions=12)
    yield handle
    handle.stop()


def prompts(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def wait_for(predicate, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def open_frame(fingerprint: str, layer: int = LAYER, codec: str = "identity",
               max_new_tokens: int = 8, max_seq_len: int = 64) -> pb2.ClientFrame:
    return pb2.ClientFrame(open=pb2.Open(
        protocol_version=PROTOCOL_VERSION, model_fingerprint=fingerprint, split_layer=layer,
        codec=pb2.CodecSpec(name=codec, config_json="{}"), max_seq_len=max_seq_len,
        max_new_tokens=max_new_tokens))


def test_concurrent_sessions_match_alone(server, tiny_llama):
    codecs = ["identity", "int8", "fourier", "rotated"]
    jobs = [(p, codecs[i % 4]) for i, p in enumerate(prompts(8))]
    clients = {c: DeviceClient(server.address, tiny_llama, LAYER, c) for c in codecs}
    alone = [clients[c].generate(p, 24, eos_token_id=None).token_ids for p, c in jobs]

    def run(i: int) -> list[int]:
        with DeviceClient(server.address, tiny_llama, LAYER, jobs[i][1]) as client:
            return client.generate(jobs[i][0], 24, eos_token_id=None).token_ids

    together = run_together(len(jobs), run)
    assert together == alone
    assert all(len(t) == 24 for t in alone)
    assert wait_for(lambda: server.active_sessions() == 0)


def test_garbage_payload_ends_only_that_session(server, tiny_llama):
    stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(server.address))
    fingerprint = server.fingerprint
    others: list[list[int]] = []
    errors: list[BaseException] = []

    def run(p: torch.Tensor) -> None:
        try:
            with DeviceClient(server.address, tiny_llama, LAYER, "identity") as client:
                others.append(client.generate(p, 32, eos_token_id=None).token_ids)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts(3)]
    for t in threads:
        t.start()
    frames = [open_frame(fingerprint),
              pb2.ClientFrame(activation=pb2.Activation(step=0, payload=b"\x00garbage" * 9))]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(iter(frames), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad activation payload" in info.value.details()
    for t in threads:
        t.join(120)
    assert not errors and len(others) == 3 and all(len(o) == 32 for o in others)
    assert wait_for(lambda: server.active_sessions() == 0)


def test_wrong_payload_codec_and_shape_refused(server, tiny_llama):
    from fc_edge.codecs import get_codec, wire

    stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(server.address))
    cases = [
        (get_codec("topk").encode(torch.randn(4, 64)), "not this session's codec"),
        (get_codec("identity").encode(torch.randn(4, 32)), "activation must be"),
    ]
    for enc, message in cases:
        frames = [open_frame(server.fingerprint),
                  pb2.ClientFrame(activation=pb2.Activation(step=0, payload=wire.pack(enc)))]
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(iter(frames), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()


# A protocol-level client (gRPC and the generated messages only, so it starts in well under a
# second): opens a session, sends the prefill, then one decode row per token, for ever.
CLIENT_SCRIPT = """
import sys
import grpc
from fc_edge.runtime.proto import pb2, pb2_grpc
address, fingerprint, layer, prefill, row = sys.argv[1:]
prefill, row = open(prefill, "rb").read(), open(row, "rb").read()
def frames():
    yield pb2.ClientFrame(open=pb2.Open(protocol_version=1, model_fingerprint=fingerprint,
        split_layer=int(layer), codec=pb2.CodecSpec(name="identity", config_json="{}")))
    yield pb2.ClientFrame(activation=pb2.Activation(step=0, payload=prefill))
    step = 1
    while True:
        tokens.get()
        yield pb2.ClientFrame(activation=pb2.Activation(step=step, payload=row))
        step += 1
import queue
tokens = queue.Queue()
stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(address))
for frame in stub.Generate(frames()):
    if frame.WhichOneof("kind") == "token":
        print(frame.token.step, flush=True)
        tokens.put(1)
"""


def test_killed_client_leaves_no_session(tiny_llama, tmp_path: Path):
    from fc_edge.codecs import get_codec, wire

    identity = get_codec("identity")
    (tmp_path / "prefill").write_bytes(wire.pack(identity.encode(torch.randn(8, 64))))
    (tmp_path / "row").write_bytes(wire.pack(identity.encode(torch.randn(1, 64))))
    handle = start_server(tiny_llama, LAYER, port=0, max_seq_len=1_000_000)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT_SCRIPT, handle.address, handle.fingerprint,
             str(LAYER), str(tmp_path / "prefill"), str(tmp_path / "row")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(20):  # mid-generation: 20 tokens in
                line = proc.stdout.readline()
                assert line, proc.stderr.read()
            assert handle.active_sessions() == 1
        finally:
            proc.kill()
            proc.wait(30)
        assert wait_for(lambda: handle.active_sessions() == 0, timeout=20)
    finally:
        handle.stop()


def test_wrong_token_refused(tiny_llama):
    with start_server(tiny_llama, LAYER, port=0, token="s3cret") as handle:
        for token in (None, "wrong"):
            client = DeviceClient(handle.address, tiny_llama, LAYER, "identity", token=token)
            with pytest.raises(SessionError) as info:
                client.generate(torch.arange(1, 5), 4)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(SessionError):
                client.info()
        client = DeviceClient(handle.address, tiny_llama, LAYER, "identity", token="s3cret")
        assert len(client.generate(torch.arange(1, 5), 4, eos_token_id=None).token_ids) == 4
        assert client.info().token_required


def test_mismatched_model_refused(server, tiny_llama, tiny_qwen2):
    other = DeviceClient(server.address, tiny_qwen2, LAYER, "identity")
    with pytest.raises(SessionError) as info:
        other.generate(torch.arange(1, 5), 4)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "fingerprint" in str(info.value)
    # the same architecture with one weight changed
    changed = DeviceClient(server.address, tiny_llama, LAYER, "identity",
                           fingerprint="0" * 16)
    with pytest.raises(SessionError, match="model mismatch"):
        changed.generate(torch.arange(1, 5), 4)
    wrong_split = DeviceClient(server.address, tiny_llama, LAYER + 1, "identity")
    with pytest.raises(SessionError, match="split mismatch"):
        wrong_split.generate(torch.arange(1, 5), 4)


def test_unknown_codec_refused(server):
    stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(server.address))
    bad = open_frame(server.fingerprint, codec="nope")
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(iter([bad]), timeout=30))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "codec mismatch" in info.value.details()


def test_limits(tiny_llama):
    with start_server(tiny_llama, LAYER, port=0, max_sessions=1, max_seq_len=16,
                      idle_timeout_s=0.5) as handle:
        client = DeviceClient(handle.address, tiny_llama, LAYER, "identity")
        with pytest.raises(SessionError) as info:  # prompt + new tokens > max_seq_len
            client.generate(torch.arange(1, 10), 10)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # a silent session is closed after the idle timeout and frees its slot
        stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(handle.address))
        gate = threading.Event()

        def frames():
            yield open_frame(handle.fingerprint, max_seq_len=16)
            gate.wait(10)

        call = stub.Generate(frames(), timeout=30)
        assert next(call).WhichOneof("kind") == "ready"
        assert handle.active_sessions() == 1
        with pytest.raises(SessionError) as info:  # max_sessions = 1
            client.generate(torch.arange(1, 5), 4)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as idle:
            next(call)
        gate.set()
        assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_for(lambda: handle.active_sessions() == 0)
        assert len(client.generate(torch.arange(1, 5), 4, eos_token_id=None).token_ids) == 4


def test_payload_limit(tiny_llama):
    with start_server(tiny_llama, LAYER, port=0, max_payload_bytes=1000) as handle:
        client = DeviceClient(handle.address, tiny_llama, LAYER, "identity")
        with pytest.raises(SessionError) as info:  # 10 x 64 float32 rows > 1000 bytes
            client.generate(torch.arange(1, 11), 2)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(client.generate(torch.arange(1, 3), 3, eos_token_id=None).token_ids) == 3


def test_fallback_codec_for_refused_rows(server, tiny_llama):
    client = DeviceClient(server.address, tiny_llama, LAYER, "svd")
    result = client.generate(torch.arange(1, 17), 6, eos_token_id=None)
    assert [s.codec for s in result.steps] == ["svd"] + ["fp16"] * 5
    assert [s.rows for s in result.steps] == [16] + [1] * 5
    assert result.steps[1].bytes_up < 64 * 4


def test_sampling_over_the_wire(server, tiny_llama):
    from fc_edge.runtime.sampling import SamplingConfig

    client = DeviceClient(server.address, tiny_llama, LAYER, "identity")
    cfg = SamplingConfig(temperature=1.5, top_k=50, top_p=0.95, seed=7)
    a = client.generate(torch.arange(1, 5), 16, sampling=cfg, eos_token_id=None).token_ids
    b = client.generate(torch.arange(1, 5), 16, sampling=cfg, eos_token_id=None).token_ids
    greedy = client.generate(torch.arange(1, 5), 16, eos_token_id=None).token_ids
    assert a == b and a != greedy


def test_eos_and_timings(server, tiny_llama):
    client = DeviceClient(server.address, tiny_llama, LAYER, "int8")
    first = client.generate(torch.arange(1, 7), 8, eos_token_id=None)
    stop = first.token_ids[3]
    result = client.generate(torch.arange(1, 7), 8, eos_token_id=stop)
    assert result.token_ids == first.token_ids[: first.token_ids.index(stop) + 1]
    s = first.steps
    assert [x.phase for x in s] == ["prefill"] + ["decode"] * 7
    assert s[0].rows == 6 and all(x.rows == 1 for x in s[1:])
    for x in s:
        assert x.codec == "int8" and x.bytes_up > 0 and x.bytes_down > 0
        parts = (x.device_compute_s + x.encode_s + x.pack_s + x.network_s + x.server_unpack_s
                 + x.server_decode_s + x.server_compute_s)
        assert 0 < x.server_compute_s and parts <= x.total_s * 1.01 + 1e-4
    assert first.ttft_s > 0 and first.tpot_s > 0 and first.session_id


def test_serve_runs_as_a_process(tiny_llama, tmp_path: Path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fc_edge.cli", "serve", "--model", "synthetic:tiny-llama",
         "--split-layer", str(LAYER), "--port", "0", "--token", "t0k"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert " on 127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        address = line.split(" on ")[1].split()[0]
        client = DeviceClient(address, tiny_llama, LAYER, "rotated", token="t0k")
        assert len(client.generate(torch.arange(1, 6), 5, eos_token_id=None).token_ids) == 5
        info = client.info()
        assert info.split_layer == LAYER and info.active_sessions == 0
        client.close()
        proc.terminate()  # SIGTERM stops it cleanly
        assert proc.wait(30) == 0
        assert "stopping" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(tiny_llama, tmp_path: Path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True)
    with start_server(tiny_llama, LAYER, port=0, tls_cert=cert, tls_key=key) as handle:
        client = DeviceClient(handle.address, tiny_llama, LAYER, "identity", tls_ca=cert)
        assert len(client.generate(torch.arange(1, 5), 4, eos_token_id=None).token_ids) == 4
        plain = DeviceClient(handle.address, tiny_llama, LAYER, "identity", timeout_s=5)
        with pytest.raises(SessionError):
            plain.generate(torch.arange(1, 5), 4)


def test_info(server):
    stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(server.address))
    info = stub.Info(pb2.InfoRequest(), timeout=10)
    assert info.model_fingerprint == server.fingerprint
    assert info.split_layer == LAYER and info.hidden_size == 64
    assert json.loads(json.dumps(info.max_sessions)) == 12
