"""The server as a serving engine, on loopback: batched equals solo equals ``model.generate``;
silent streams hold nothing; health, drain, logs and the payload checks the docs promise."""

from __future__ import annotations

import json
import logging
import threading
import time

import grpc
import pytest
import torch
from together import hf_generate as reference  # tests/runtime is on sys.path (rootdir)
from together import run_together

from fc_edge.codecs import wire
from fc_edge.codecs.base import Encoded
from fc_edge.runtime.client import DeviceClient
from fc_edge.runtime.proto import pb2, pb2_grpc
from fc_edge.runtime.protocol import PROTOCOL_VERSION
from fc_edge.runtime.server import start_server

pytestmark = pytest.mark.slow

LAYER = 2


def prompts(n: int, low: int = 2, high: int = 40, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 200, (int(torch.randint(low, high, (1,), generator=g)),),
                          generator=g) for _ in range(n)]


def generate_together(address: str, model, jobs: list[torch.Tensor], n: int, layer: int,
                      **client_kw) -> list[list[int]]:
    """Greedy identity sessions of every prompt at once, EOS off."""

    def run(i: int) -> list[int]:
        with DeviceClient(address, model, layer, "identity", **client_kw) as client:
            return client.generate(jobs[i], n, eos_token_id=None).token_ids

    return run_together(len(jobs), run)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_sixteen_batched_sessions_equal_solo_and_generate(request, name):
    model = request.getfixturevalue(name)
    jobs = prompts(16)
    assert len({len(p) for p in jobs}) > 8  # different lengths in one batch
    n = 20
    with start_server(model, LAYER, port=0, max_sessions=16) as handle:
        with DeviceClient(handle.address, model, LAYER, "identity") as client:
            solo = [client.generate(p, n, eos_token_id=None).token_ids for p in jobs]
        together = generate_together(handle.address, model, jobs, n, LAYER)
        info = handle.service.status()
    assert together == solo
    assert solo == [reference(model, p, n) for p in jobs]
    # the steps really were batched: decode forwards carried several sessions at once
    assert info.mean_decode_batch > 2, info.mean_decode_batch


def test_smollm2_batched_sessions_equal_generate(smollm2):
    model = smollm2[0]
    jobs = prompts(16, 3, 30, seed=1)
    n = 12
    with start_server(model, 1, port=0, max_sessions=16, max_seq_len=64) as handle:
        together = generate_together(handle.address, model, jobs, n, 1)
    assert together == [reference(model, p, n) for p in jobs]


def test_long_prefill_is_chunked_between_decode_steps(tiny_llama):
    """A 300-row prefill in chunks of 32 while another session decodes: both exact."""
    short, long = prompts(1, 4, 5)[0], torch.randint(1, 200, (300,),
                                                     generator=torch.Generator().manual_seed(4))
    with start_server(tiny_llama, LAYER, port=0, prefill_chunk=32, max_seq_len=400) as handle:
        engine = handle.service.engine
        prefill_rows: list[int] = []
        metrics = engine.on_iteration
        engine.on_iteration = lambda d, p, s: (prefill_rows.append(p), metrics(d, p, s))
        got = generate_together(handle.address, tiny_llama, [short, long], 16, LAYER)
    assert got == [reference(tiny_llama, short, 16), reference(tiny_llama, long, 16)]
    # every prompt row went through the engine, never more than a chunk of them per iteration
    assert sum(prefill_rows) >= 300 + len(short) - 1 and max(prefill_rows) <= 32


def open_frame(fingerprint: str, codec: str = "identity", config: str = "{}",
               max_seq_len: int = 64) -> pb2.ClientFrame:
    return pb2.ClientFrame(open=pb2.Open(
        protocol_version=PROTOCOL_VERSION, model_fingerprint=fingerprint, split_layer=LAYER,
        codec=pb2.CodecSpec(name=codec, config_json=config), max_seq_len=max_seq_len,
        max_new_tokens=8))


def silent_stream(stub, gate: threading.Event, first: pb2.ClientFrame | None = None,
                  metadata=()):
    def frames():
        if first is not None:
            yield first
        gate.wait(60)

    return stub.Generate(frames(), timeout=60, metadata=metadata)


def test_silent_streams_hold_nothing(tiny_llama):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # one loopback address for all: the per-address cap is set out of the way (it has its own
    # test, with distinct addresses)
    with start_server(tiny_llama, LAYER, port=0, max_sessions=4, max_streams=65,
                      max_streams_per_peer=100, token="tk") as handle:
        md = (("authorization", "Bearer tk"),)
        channel = grpc.insecure_channel(handle.address)
        stub = pb2_grpc.SplitInferenceStub(channel)
        gate = threading.Event()
        try:
            calls = [silent_stream(stub, gate, metadata=md) for _ in range(64)]
            deadline = time.monotonic() + 20
            while handle.service.status().open_streams < 64 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert handle.service.status().open_streams == 64
            # with 64 silent streams open: Info and health answer inside a 1 s deadline ...
            info = stub.Info(pb2.InfoRequest(), metadata=md, timeout=1.0)
            assert info.active_sessions == 0
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0)  # no token needed
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # ... a new session is served ...
            with DeviceClient(handle.address, tiny_llama, LAYER, "identity", token="tk") as c:
                assert len(c.generate(torch.arange(1, 6), 4, eos_token_id=None).token_ids) == 4
            # ... and past the stream cap one is refused at once, never left hanging
            extra = silent_stream(stub, gate, open_frame(handle.fingerprint), md)
            blocker = silent_stream(stub, gate, open_frame(handle.fingerprint), md)
            codes = []
            for call in (extra, blocker):
                try:
                    next(call)
                    codes.append("ready")
                except grpc.RpcError as e:
                    codes.append(e.code())
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
            assert len(calls) == 64
        finally:
            gate.set()
            channel.close()


def test_a_stream_without_open_is_closed_after_the_open_timeout(tiny_llama):
    with start_server(tiny_llama, LAYER, port=0, open_timeout_s=0.3,
                      idle_timeout_s=60) as handle:
        stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(handle.address))
        gate = threading.Event()
        call = silent_stream(stub, gate)
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        gate.set()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no Open frame within 0.3 s" in info.value.details()
        assert handle.service.status().open_streams == 0


def identity_payload(x: torch.Tensor) -> bytes:
    """An identity payload of float32 values built without the codec (which may refuse NaN)."""
    return wire.pack(Encoded("identity", {"value_dtype": 1}, tuple(x.shape), torch.float32,
                             {"x": x.float()}))


def session_with(handle, frames: list[pb2.ClientFrame]) -> grpc.RpcError:
    stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(handle.address))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(iter(frames), timeout=30))
    return info.value


def test_non_finite_activation_is_invalid_argument(tiny_llama, caplog):
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    with start_server(tiny_llama, LAYER, port=0) as handle:
        with caplog.at_level(logging.INFO, logger="fc_edge.server"):
            err = session_with(handle, [
                open_frame(handle.fingerprint),
                pb2.ClientFrame(activation=pb2.Activation(step=0, payload=identity_payload(x)))])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "finite" in err.details() or "NaN" in err.details()
    text = caplog.text
    assert "opened: peer=" in text and "codec=identity" in text
    assert "aborted: INVALID_ARGUMENT" in text and "closed:" in text and "bytes_in=" in text


def test_payload_of_another_configuration_is_refused(tiny_llama):
    """The session opened rotated at 4 bits; a rotated payload at 8 bits is another codec."""
    from fc_edge.codecs import get_codec
    from fc_edge.models.split import bind_codec

    eight = bind_codec(get_codec("rotated", bits=8), tiny_llama, LAYER)
    payload = wire.pack(eight.encode(torch.randn(4, 64)))
    with start_server(tiny_llama, LAYER, port=0) as handle:
        err = session_with(handle, [
            open_frame(handle.fingerprint, "rotated", '{"bits": 4}'),
            pb2.ClientFrame(activation=pb2.Activation(step=0, payload=payload))])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "configuration" in err.details()


def test_default_payload_limit_follows_max_seq_len(tiny_llama):
    with start_server(tiny_llama, LAYER, port=0, max_seq_len=100) as handle:
        assert handle.service.max_payload_bytes == 100 * 64 * 4 + 4096
        client = DeviceClient(handle.address, tiny_llama, LAYER, "identity")
        assert client.info().max_payload_bytes == 100 * 64 * 4 + 4096


def test_drain_on_stop(tiny_llama):
    """stop(drain_s): health NOT_SERVING and new sessions refused at once; an open session
    keeps stepping during the drain and is ended with UNAVAILABLE after it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    handle = start_server(tiny_llama, LAYER, port=0)
    channel = grpc.insecure_channel(handle.address)
    stub = pb2_grpc.SplitInferenceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    outbox: list[pb2.ClientFrame] = [open_frame(handle.fingerprint, max_seq_len=64)]
    ready = threading.Semaphore(0)

    def frames():
        step = 0
        while True:
            ready.acquire()
            if not outbox:
                return
            yield outbox.pop(0)
            step += 1

    row = identity_payload(torch.randn(1, 64))
    call = stub.Generate(frames(), timeout=60)
    ready.release()
    assert next(call).WhichOneof("kind") == "ready"
    outbox.append(pb2.ClientFrame(activation=pb2.Activation(step=0, payload=row)))
    ready.release()
    assert next(call).token.step == 0
    stopper = threading.Thread(target=handle.stop, kwargs={"drain_s": 1.5})
    stopper.start()
    deadline = time.monotonic() + 5
    while handle.service.draining is False and time.monotonic() < deadline:
        time.sleep(0.01)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    refused = session_with(handle, [open_frame(handle.fingerprint)])
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    # the open session still steps during the drain ...
    outbox.append(pb2.ClientFrame(activation=pb2.Activation(step=1, payload=row)))
    ready.release()
    assert next(call).token.step == 1
    # ... and is ended with UNAVAILABLE once the drain is over
    with pytest.raises(grpc.RpcError) as ended:
        next(call)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in ended.value.details()
    stopper.join(30)
    channel.close()


def test_two_models_in_one_process_keep_their_own_channel_weights(tiny_llama, tiny_qwen2):
    """Each server decodes shaped `rotated` payloads with its own model's vector; a payload
    shaped for the other model is refused, not decoded with the wrong weights."""
    from fc_edge.codecs import get_codec
    from fc_edge.models.split import channel_weights

    with start_server(tiny_llama, LAYER, port=0) as a, start_server(tiny_qwen2, LAYER,
                                                                    port=0) as b:
        for handle, model in ((a, tiny_llama), (b, tiny_qwen2)):
            with DeviceClient(handle.address, model, LAYER, "rotated") as client:
                got = client.generate(torch.arange(1, 9), 6, eos_token_id=None)
            assert len(got.token_ids) == 6 and got.steps[0].codec == "rotated"  # prefill
        codec = get_codec("rotated").bind(channel_weights(tiny_llama, LAYER))  # a llama device
        payload = wire.pack(codec.encode(torch.randn(4, 64)))
        err = session_with(b, [
            open_frame(b.fingerprint, "rotated", json.dumps(get_codec("rotated").config())),
            pb2.ClientFrame(activation=pb2.Activation(step=0, payload=payload))])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shaping" in err.details() or "channel weights" in err.details()
