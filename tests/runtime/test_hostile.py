"""Issue 19 on loopback servers: what one client sends or asks for ends that client's session
alone, and no client can hold capacity the others need (tokens of honest sessions are held to
their solo runs and to Hugging Face's ``generate``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from loopback import FromAddress  # tests/runtime is on sys.path (pytest rootdir mode)
from test_server import wait_for
from together import run_together

from fc_edge.codecs import get_codec, wire
from fc_edge.codecs.base import Encoded
from fc_edge.runtime.client import DeviceClient, SessionError
from fc_edge.runtime.proto import pb2, pb2_grpc
from fc_edge.runtime.protocol import activation_frame, open_frame
from fc_edge.runtime.sampling import SamplingConfig
from fc_edge.runtime.server import start_server

pytestmark = pytest.mark.slow

LAYER = 2
REPO = Path(__file__).resolve().parents[2]


def prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 200, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def row_payload(x: torch.Tensor) -> bytes:
    """An identity payload of float32 values built without the codec (which refuses NaN)."""
    return wire.pack(Encoded("identity", {"value_dtype": 1}, tuple(x.shape), torch.float32,
                             {"x": x.float()}))


class Held:
    """A stream that sends ``first`` frames and then nothing until released."""

    def __init__(self, address: str, frames: list, metadata=(), options=()) -> None:
        self.gate = threading.Event()
        self.channel = grpc.insecure_channel(address, list(options))
        stub = pb2_grpc.SplitInferenceStub(self.channel)

        def gen():
            yield from frames
            self.gate.wait(120)

        self.call = stub.Generate(gen(), metadata=metadata, timeout=120)

    def first(self):
        """The first server frame, or the status code that ended the stream."""
        try:
            return next(self.call).WhichOneof("kind")
        except grpc.RpcError as e:
            return e.code()

    def ended(self) -> grpc.RpcError:
        """Read on until the server ends the stream; the error it ended with."""
        with pytest.raises(grpc.RpcError) as ended:
            for _ in self.call:
                pass
        return ended.value

    def close(self) -> None:
        self.gate.set()
        self.call.cancel()
        self.channel.close()


def test_hostile_sampling_beside_honest_sessions(tiny_llama):
    """Issue 19's first two failures: temperature 1e-38 (finite, accepted) beside ordinary
    sampled sessions and greedy ones. Nobody's session fails; the honest tokens equal their
    solo runs; the 1e-38 session decodes greedily; the engine lives on."""
    jobs = prompts(4, seed=1)
    hostile = [SamplingConfig(temperature=1e-38, seed=1), SamplingConfig(temperature=1.0, seed=2),
               SamplingConfig(temperature=1.0, seed=3), SamplingConfig(temperature=1e-30),
               SamplingConfig(temperature=3e38, top_k=1, seed=4)]
    with start_server(tiny_llama, LAYER, port=0) as handle:
        with DeviceClient(handle.address, tiny_llama, LAYER, "identity") as c:
            solo = [c.generate(p, 16, eos_token_id=None).token_ids for p in jobs]
            greedy_of_first = c.generate(jobs[0], 16, eos_token_id=None).token_ids

        def run(i: int) -> list[int]:
            with DeviceClient(handle.address, tiny_llama, LAYER, "identity") as client:
                if i < len(jobs):
                    return client.generate(jobs[i], 16, eos_token_id=None).token_ids
                return client.generate(jobs[0], 16, sampling=hostile[i - len(jobs)],
                                       eos_token_id=None).token_ids

        got = run_together(len(jobs) + len(hostile), run)
        assert handle.service.engine.alive()
    assert got[: len(jobs)] == solo
    assert got[len(jobs)] == greedy_of_first and got[len(jobs) + 3] == greedy_of_first
    assert all(len(t) == 16 for t in got)


def test_silent_max_length_sessions_hold_no_capacity(tiny_llama):
    """16 sessions opened at max_seq_len 4096 from one address, then silent: they hold no KV
    block, Info answers inside a 1 s deadline, and a client from another address is served."""
    with start_server(tiny_llama, LAYER, port=0, max_seq_len=4096) as handle:
        silent = [Held(handle.address, [open_frame(handle.fingerprint, LAYER, "identity",
                                                   max_seq_len=4096)]) for _ in range(16)]
        try:
            assert [s.first() for s in silent] == ["ready"] * 16
            stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(handle.address))
            info = stub.Info(pb2.InfoRequest(), timeout=1.0)
            assert info.active_sessions == 16 and info.free_kv_blocks == info.total_kv_blocks
            assert info.max_sessions > 16  # the cap follows the pool, not a flat 16
            with FromAddress(handle.address, "127.0.0.2") as other, \
                    DeviceClient(other.address, tiny_llama, LAYER, "identity") as client:
                assert len(client.generate(torch.arange(1, 9), 8, eos_token_id=None)
                           .token_ids) == 8
        finally:
            for s in silent:
                s.close()
        assert wait_for(lambda: handle.active_sessions() == 0)


def test_sessions_that_went_silent_holding_blocks_give_them_up(tiny_llama):
    """Eight sessions each send a 120-row prefill into a pool of 64 blocks of 16 (all of it)
    and go silent; a newcomer gets blocks (the idle ones are preempted) and its tokens equal
    its solo run; a silent one that comes back is recomputed and gets its solo tokens too."""
    g = torch.Generator().manual_seed(2)
    prefill = torch.randn(120, 64, generator=g)
    row = torch.randn(1, 64, generator=g)
    job = prompts(1, seed=7)[0]
    with start_server(tiny_llama, LAYER, port=0, kv_cache_tokens=64 * 16,
                      max_seq_len=256) as handle:
        with DeviceClient(handle.address, tiny_llama, LAYER, "identity") as c:
            solo = c.generate(job, 12, eos_token_id=None).token_ids
        held = []
        outboxes = []
        for _ in range(8):
            out: list = [open_frame(handle.fingerprint, LAYER, "identity", max_seq_len=256),
                         activation_frame(0, row_payload(prefill))]
            gate = threading.Semaphore(0)
            outboxes.append((out, gate))
            stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(handle.address))

            def gen(out=out, gate=gate):
                yield out.pop(0)
                yield out.pop(0)
                while True:
                    gate.acquire()
                    if not out:
                        return
                    yield out.pop(0)

            call = stub.Generate(gen(), timeout=120)
            assert next(call).WhichOneof("kind") == "ready"
            held.append((call, next(call).token.id))
        assert handle.service.engine.stats().free_blocks <= 8
        with DeviceClient(handle.address, tiny_llama, LAYER, "identity", timeout_s=60) as c:
            assert c.generate(job, 12, eos_token_id=None).token_ids == solo
        assert handle.service.engine.stats().preemptions > 0
        # the first silent session comes back: its next token is that of an uninterrupted run
        call, first = held[0]
        out, gate = outboxes[0]
        out.append(activation_frame(1, row_payload(row)))
        gate.release()
        back = next(call).token.id
        for call, _ in held:
            call.cancel()
    tail = __import__("fc_edge.models.tail", fromlist=["Tail"]).Tail.from_hf(tiny_llama, LAYER)
    ts = tail.start(256)
    assert int(ts.step(prefill, last_only=True).argmax()) == first
    assert int(ts.step(row, last_only=True).argmax()) == back


def test_per_address_caps(tiny_llama):
    """With 2 sessions and 3 streams per address: 127.0.0.1's third session and fourth stream
    are refused at once (RESOURCE_EXHAUSTED), while a client from 127.0.0.2 is served."""
    with start_server(tiny_llama, LAYER, port=0, max_sessions_per_peer=2,
                      max_streams_per_peer=3) as handle:
        opening = [open_frame(handle.fingerprint, LAYER, "identity", max_seq_len=64)]
        two = [Held(handle.address, opening) for _ in range(2)]
        streams = []
        try:
            assert [s.first() for s in two] == ["ready", "ready"]
            third = Held(handle.address, opening)
            streams.append(third)
            assert third.first() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "per address" in third.call.details()
            silent = Held(handle.address, [])  # a third stream (no Open yet)
            streams.append(silent)
            assert wait_for(lambda: handle.service.open_streams() == 3)
            fourth = Held(handle.address, opening)
            streams.append(fourth)
            assert fourth.first() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with FromAddress(handle.address, "127.0.0.2") as other, \
                    DeviceClient(other.address, tiny_llama, LAYER, "identity") as client:
                assert len(client.generate(torch.arange(1, 6), 5, eos_token_id=None)
                           .token_ids) == 5
            refusals = handle.service.metrics.refusals
            assert refusals.labels("max_sessions_per_peer")._value.get() == 1
            assert refusals.labels("max_streams_per_peer")._value.get() == 1
        finally:
            for s in two + streams:
                s.close()


def test_a_client_that_stops_reading_is_ended_at_the_idle_timeout(tiny_llama):
    """A client that sends steps but reads none of its Token frames (a 1 KiB HTTP/2 window):
    the server's writes block, and the session ends at the idle timeout (1 s here) and frees
    its blocks, while another session goes on."""
    row = wire.pack(get_codec("identity").encode(torch.randn(1, 64)))
    with start_server(tiny_llama, LAYER, port=0, idle_timeout_s=1.0,
                      max_seq_len=4096) as handle:
        frames = [open_frame(handle.fingerprint, LAYER, "identity", max_seq_len=4096)] + [
            activation_frame(i, row) for i in range(3000)]
        deaf = Held(handle.address, frames,
                    options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)])
        try:
            assert wait_for(lambda: handle.active_sessions() == 1)
            with DeviceClient(handle.address, tiny_llama, LAYER, "identity") as client:
                assert len(client.generate(torch.arange(1, 6), 6, eos_token_id=None)
                           .token_ids) == 6
            assert wait_for(lambda: handle.active_sessions() == 0)
            stats = handle.service.engine.stats()
            assert stats.free_blocks == stats.total_blocks
            ended = deaf.ended()
            assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "read nothing" in ended.details()
        finally:
            deaf.close()


def test_max_session_lifetime(tiny_llama):
    with start_server(tiny_llama, LAYER, port=0, max_session_s=0.5) as handle:
        s = Held(handle.address, [open_frame(handle.fingerprint, LAYER, "identity")])
        try:
            assert s.first() == "ready"
            ended = s.ended()
            assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "limit of 0.5 s" in ended.details()
        finally:
            s.close()


def test_codec_config_json_must_be_small_and_flat(tiny_llama):
    with start_server(tiny_llama, LAYER, port=0) as handle:
        cases = {
            "nested": "[" * 100_000 + "]" * 100_000,  # the JSON parser's recursion limit
            "deep": json.dumps({"a": {"b": {"c": {"d": {"e": 1}}}}}),
            "huge": json.dumps({"bits": 4, "pad": "x" * 20_000}),
            "list": "[1, 2]",
        }
        for name, text in cases.items():
            s = Held(handle.address, [open_frame(handle.fingerprint, LAYER, "rotated", text)])
            try:
                assert s.first() == grpc.StatusCode.INVALID_ARGUMENT, name
            finally:
                s.close()
        ok = Held(handle.address, [open_frame(handle.fingerprint, LAYER, "rotated",
                                              json.dumps({"bits": 4}))])
        try:
            assert ok.first() == "ready"
        finally:
            ok.close()


def test_bearer_scheme_as_rfc_6750_says(tiny_llama):
    with start_server(tiny_llama, LAYER, port=0, token="s3cret") as handle:
        stub = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(handle.address))
        accepted = ["Bearer s3cret", "bearer s3cret", "BEARER   s3cret"]
        refused = ["s3cret", "Bearer", "Bearer ", "Basic s3cret", "Bearer s3cret2", "Bearers3cret"]
        for value in accepted:
            assert stub.Info(pb2.InfoRequest(), metadata=(("authorization", value),),
                             timeout=10).token_required
        for value in refused:
            with pytest.raises(grpc.RpcError) as info:
                stub.Info(pb2.InfoRequest(), metadata=(("authorization", value),), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, value


def test_health_watch_streams_count_toward_the_stream_cap(tiny_llama):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with start_server(tiny_llama, LAYER, port=0, max_streams=2) as handle:
        channel = grpc.insecure_channel(handle.address)
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
                   for _ in range(2)]
        try:
            for w in watches:
                assert next(w).status == health_pb2.HealthCheckResponse.SERVING
            assert handle.service.open_streams() == 2
            s = Held(handle.address, [open_frame(handle.fingerprint, LAYER, "identity")])
            assert s.first() == grpc.StatusCode.RESOURCE_EXHAUSTED
            s.close()
            third = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            with pytest.raises(grpc.RpcError) as refused:
                next(third)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            for w in watches:
                w.cancel()
            channel.close()
        assert wait_for(lambda: handle.service.open_streams() == 0)


def test_bfloat16_overflow_is_invalid_argument(tiny_llama):
    """A float32 3.4e38 passes as a float32 payload but is infinite in the bfloat16 tail."""
    x = torch.randn(3, 64)
    x[2, 9] = 3.4e38
    with start_server(tiny_llama, LAYER, port=0, dtype="bfloat16") as handle:
        s = Held(handle.address, [open_frame(handle.fingerprint, LAYER, "identity"),
                                  activation_frame(0, row_payload(x))])
        try:
            assert s.first() == "ready"
            ended = s.ended()
            assert ended.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "bfloat16" in ended.details()
        finally:
            s.close()
        assert handle.service.engine.alive()


def test_metrics_over_http(tiny_llama):
    from prometheus_client.parser import text_string_to_metric_families

    with start_server(tiny_llama, LAYER, port=0, token="tk", metrics_port=0) as handle:
        with DeviceClient(handle.address, tiny_llama, LAYER, "identity", token="tk") as client:
            result = client.generate(torch.arange(1, 12), 9, eos_token_id=None)
        with pytest.raises(SessionError):
            DeviceClient(handle.address, tiny_llama, LAYER, "identity").generate(
                torch.arange(1, 4), 2)
        assert wait_for(lambda: handle.active_sessions() == 0)
        url = f"http://127.0.0.1:{handle.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name: str, **labels) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("fc_edge_tokens_total") == len(result.token_ids) == 9
    assert value("fc_edge_received_bytes_total", codec="identity") == result.bytes_up
    assert value("fc_edge_refusals_total", reason="unauthenticated") == 1
    assert value("fc_edge_refusals_total", reason="max_sessions") == 0
    assert value("fc_edge_engine_alive") == 1 and value("fc_edge_sessions") == 0
    assert value("fc_edge_kv_blocks_used") == 0 and value("fc_edge_kv_blocks_total") > 0
    assert value("fc_edge_step_seconds_count", phase="prefill") == 1
    assert value("fc_edge_step_seconds_count", phase="decode") == 8
    assert value("fc_edge_decode_batch_rows_count") == 8
    assert value("fc_edge_preemptions_total") == 0 and value("fc_edge_streams") == 0


def test_a_stream_opened_before_the_drain_gets_no_session(tiny_llama):
    handle = start_server(tiny_llama, LAYER, port=0)
    frames: list = []
    more = threading.Semaphore(0)
    channel = grpc.insecure_channel(handle.address)

    def gen():
        while True:
            more.acquire()
            if not frames:
                return
            yield frames.pop(0)

    call = pb2_grpc.SplitInferenceStub(channel).Generate(gen(), timeout=60)
    busy = Held(handle.address, [open_frame(handle.fingerprint, LAYER, "identity")])
    try:
        assert busy.first() == "ready"  # an open session: the drain lasts its 3 s
        assert wait_for(lambda: handle.service.open_streams() == 2)
        stopper = threading.Thread(target=handle.stop, kwargs={"drain_s": 3.0})
        stopper.start()
        assert wait_for(lambda: handle.service.draining)
        frames.append(open_frame(handle.fingerprint, LAYER, "identity"))
        more.release()
        with pytest.raises(grpc.RpcError) as refused:
            next(call)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "open the session elsewhere" in refused.value.details()
        stopper.join(30)
    finally:
        more.release()
        busy.close()
        channel.close()


def test_a_client_that_stops_reading_does_not_extend_the_drain(tiny_llama):
    """Idle timeout 120 s, drain 0.5 s: a session blocked writing to a client that reads nothing
    is ended with the drain (the stop returns long before the idle timeout)."""
    row = wire.pack(get_codec("identity").encode(torch.randn(1, 64)))
    handle = start_server(tiny_llama, LAYER, port=0, idle_timeout_s=120, max_seq_len=4096)
    frames = [open_frame(handle.fingerprint, LAYER, "identity", max_seq_len=4096)] + [
        activation_frame(i, row) for i in range(3000)]
    deaf = Held(handle.address, frames,
                options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)])
    try:
        assert wait_for(lambda: handle.service.engine.stats().tokens > 10)
        stopper = threading.Thread(target=handle.stop, kwargs={"drain_s": 0.5})
        stopper.start()
        stopper.join(30)
        assert not stopper.is_alive()  # well under the 120 s idle timeout
        assert handle.active_sessions() == 0
    finally:
        deaf.close()


def serve_process(*extra: str, code: str | None = None) -> tuple[subprocess.Popen, str]:
    """`fc-edge serve` of synthetic:tiny-llama in a child process (``code`` runs first, e.g.
    to inject a fault); (process, address)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = ["serve", "--model", "synthetic:tiny-llama", "--split-layer", str(LAYER),
            "--port", "0", *extra]
    script = (code or "") + f"\nimport sys\nfrom fc_edge.cli import main\nsys.exit(main({argv!r}))"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if " on 127.0.0.1:" not in line:
        proc.kill()
        raise AssertionError(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" on ")[1].split()[0]


def test_second_sigterm_stops_at_once(tiny_llama):
    """SIGTERM drains (60 s here, a session stays open); a second SIGTERM ends it at once with
    exit status 130 and no abort (issue 19: 'terminate called without an active exception')."""
    proc, address = serve_process("--drain-s", "60")
    try:
        fingerprint = pb2_grpc.SplitInferenceStub(grpc.insecure_channel(address)).Info(
            pb2.InfoRequest(), timeout=30).model_fingerprint
        s = Held(address, [open_frame(fingerprint, LAYER, "identity")])
        assert s.first() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert "stopping" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 130
        with pytest.raises(grpc.RpcError) as ended:
            next(s.call)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        s.close()
        err = proc.stderr.read()
        assert "terminate called" not in err and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


ENGINE_FAULT = """
import fc_edge.runtime.engine as engine
plan = engine.BatchEngine._plan
def faulty(self):
    if any(s.step is not None and s.step.x.shape[0] == 7 for s in self._waiting):
        raise RuntimeError("injected planning fault")
    return plan(self)
engine.BatchEngine._plan = faulty
"""


def test_engine_death_fails_steps_turns_health_and_exits_nonzero(tiny_llama):
    """The engine loop dies (a fault injected into its planning): the waiting step fails at once
    with UNAVAILABLE (the client's recovery takes it elsewhere), health turns NOT_SERVING and
    `fc-edge serve` exits with 70."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    proc, address = serve_process("--drain-s", "30", code=ENGINE_FAULT)
    try:
        channel = grpc.insecure_channel(address)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with DeviceClient(address, tiny_llama, LAYER, "identity", max_recoveries=0) as client:
            assert len(client.generate(torch.arange(1, 5), 3, eos_token_id=None)
                       .token_ids) == 3
            with pytest.raises(SessionError) as lost:
                client.generate(torch.arange(1, 8), 3)  # a 7-row prefill triggers the fault
            assert lost.value.code == grpc.StatusCode.UNAVAILABLE
            assert "engine" in lost.value.details
        statuses = []
        try:
            for r in watch:
                statuses.append(r.status)
        except grpc.RpcError:
            pass
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        assert proc.wait(30) == 70
        assert "engine loop died" in proc.stderr.read()
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_info_verb(tiny_llama, capsys):
    from fc_edge.cli import main

    with start_server(tiny_llama, LAYER, port=0, token="tk", max_sessions_per_peer=5) as handle:
        assert main(["info", handle.address, "--token", "tk"]) == 0
        out = capsys.readouterr().out
        lines = dict(line.split(None, 1) for line in out.splitlines())
        assert lines["model_fingerprint"] == handle.fingerprint
        assert lines["split_layer"] == str(LAYER) and lines["max_sessions_per_peer"] == "5"
        assert lines["engine_alive"] == "yes"
        assert main(["info", handle.address, "--token", "tk", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["hidden_size"] == 64 and data["draining"] is False
        assert main(["info", handle.address]) == 1  # no token: one line, exit 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err


EXIT_MID_GENERATION = """
import sys, threading, time
try:
    import ray  # noqa: F401 - its terminate handler is how the abort showed in `make test`
except ImportError:
    pass
import torch
from fc_edge.models.pretrained import load_model
from fc_edge.runtime.client import DeviceClient
from fc_edge.runtime.server import start_server
model = load_model("synthetic:tiny-llama")[0]
handle = start_server(model, 2, port=0)
def work():
    with DeviceClient(handle.address, model, 2, "identity") as client:
        while True:
            client.generate(torch.arange(1, 30), 50, eos_token_id=None)
for _ in range(4):
    threading.Thread(target=work, daemon=True).start()
time.sleep(1.5)
sys.exit(0)  # servers still running, generations in flight
"""


def test_exit_with_live_generations_is_clean():
    """A process that exits while its server streams: exit status 0, nothing on stderr but the
    sessions' log lines (issue 19's abort at interpreter exit: before the atexit hook, 4 of 12
    runs of this script died with SIGABRT)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", EXIT_MID_GENERATION], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr and "Traceback" not in proc.stderr


def test_the_exit_hook_stops_servers_and_the_loop(tiny_llama):
    """What the exit hook does, checked directly: every live server stops (its port closes, its
    engine stops) and the shared loop's thread ends; the next server gets a new loop."""
    from fc_edge.runtime import server as server_module

    handle = start_server(tiny_llama, LAYER, port=0)
    s = Held(handle.address, [open_frame(handle.fingerprint, LAYER, "identity")])
    assert s.first() == "ready"
    thread = server_module._LOOP_THREAD
    assert thread is not None and thread.is_alive()
    server_module._shutdown()
    assert not thread.is_alive() and server_module._LOOP is None
    assert handle.wait(0) and not handle.service.engine.alive()
    with pytest.raises(grpc.RpcError):
        next(s.call)
    s.close()
    with start_server(tiny_llama, LAYER, port=0) as again:
        assert again.service.engine.alive()
