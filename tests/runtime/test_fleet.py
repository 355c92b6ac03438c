"""fc-edge on Ray Serve (a local Ray on 2 CPUs, 2 replicas of a tiny model behind Ray's gRPC
proxy): sessions spread over the replicas and each equals Hugging Face's greedy ``generate``
(the independent oracle); a replica whose actor is killed mid-generation loses its sessions to
the other replica with identical tokens; statuses pass through the proxy; nothing leaks."""

from __future__ import annotations

import socket
import threading

import grpc
import pytest
import torch

pytest.importorskip("ray.serve", reason="the fleet needs ray[serve] (make install)")

from test_client import hf_greedy  # noqa: E402 - tests/runtime is on sys.path
from test_server import wait_for  # noqa: E402
from together import run_together  # noqa: E402

from fc_edge.runtime.client import DeviceClient, SessionError  # noqa: E402
from fc_edge.runtime.fleet import APP_NAME, start_fleet  # noqa: E402

pytestmark = pytest.mark.slow

LAYER = 2
TOKEN = "fleet-test-token"
N = 16



def prompts(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (int(torch.randint(3, 16, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



@pytest.fixture(scope="module")
def fleet():
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    handle = start_fleet("synthetic:tiny-llama", LAYER, replicas=2, port=free_port(),
                         num_cpus=2, replica_cpus=1, token=TOKEN, max_sessions=8,
                         max_seq_len=64, drain_s=1)
    yield handle
    handle.stop()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def cases(tiny_llama) -> list[tuple[torch.Tensor, list[int]]]:
    return [(p, hf_greedy(tiny_llama, p, N)) for p in prompts(8)]


def run_concurrently(fleet, model, jobs, on_token=None) -> list:
    """One client and thread per prompt, started together; results in order."""

    def run(i: int):
        with DeviceClient(fleet.address, model, LAYER, "identity", token=TOKEN) as client:
            hook = (lambda k, t, s: on_token(i, k, t, s)) if on_token else None
            return client.generate(jobs[i], N, eos_token_id=None, on_token=hook)

    return run_together(len(jobs), run, timeout=120)


def replica_of(session_id: str) -> str:
    return session_id.split("/")[0]


def test_concurrent_sessions_spread_and_each_equals_solo(fleet, tiny_llama, cases):
    results = run_concurrently(fleet, tiny_llama, [p for p, _ in cases])
    assert [r.token_ids for r in results] == [want for _, want in cases]
    assert all(r.recoveries == 0 for r in results)
    # each session stayed on one replica (one session id, no recovery); both replicas served
    assert {replica_of(r.session_id) for r in results} == set(fleet.replicas())
    assert wait_for(lambda: sum(fleet.open_sessions().values()) == 0, 30)


def test_killed_replica_sessions_recover_with_same_tokens(fleet, tiny_llama, cases):
    jobs = [p for p, _ in cases[:4]]
    at_kill: dict[int, str] = {}
    killed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(jobs))

    def on_token(job: int, i: int, token: int, session: str) -> None:
        if i != 5:
            return
        with lock:
            at_kill[job] = session
        if barrier.wait(60) == 0:  # every session is at its 6th token: kill job 0's replica
            killed.append(replica_of(at_kill[0]))
            fleet.kill_replica(killed[0])
        barrier.wait(60)

    results = run_concurrently(fleet, tiny_llama, jobs, on_token)
    assert [r.token_ids for r in results] == [want for _, want in cases[:4]]
    for job, r in enumerate(results):
        on_killed = replica_of(at_kill[job]) == killed[0]
        assert r.recoveries == (1 if on_killed else 0), (job, at_kill, r.session_id)
        assert replica_of(r.session_id) != killed[0]
        if on_killed:  # the replay: prompt + the 6 tokens generated before the kill
            assert r.steps[6].phase == "recovered" and r.steps[6].rows == jobs[job].numel() + 6
    assert killed[0] not in fleet.replicas()
    assert wait_for(lambda: sum(fleet.open_sessions().values()) == 0, 30)
    # Ray Serve has already created the replacement actor (it may still be starting)
    assert wait_for(lambda: len(fleet.replicas()) == 2, 30)


def test_statuses_pass_through_the_proxy(fleet, tiny_llama):
    ids = torch.tensor([1, 2, 3])
    with DeviceClient(fleet.address, tiny_llama, LAYER, "identity") as client:
        with pytest.raises(SessionError) as info:
            client.generate(ids, 4, eos_token_id=None)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED  # refused, not "recovered"
    with DeviceClient(fleet.address, tiny_llama, LAYER + 1, "identity", token=TOKEN) as client:
        with pytest.raises(SessionError, match="split mismatch") as info:
            client.generate(ids, 4, eos_token_id=None)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with DeviceClient(fleet.address, tiny_llama, LAYER, "identity", token=TOKEN) as client:
        assert client.info().split_layer == LAYER
    # the standard health check passes the proxy too, without a token (for load balancers)
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(fleet.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_abandoned_stream_frees_its_session(fleet, tiny_llama):
    """A device that vanishes mid-session (its call cancelled) leaves no session behind."""
    import queue

    from fc_edge.models.pretrained import model_fingerprint
    from fc_edge.runtime.proto import pb2, pb2_grpc
    from fc_edge.runtime.protocol import PROTOCOL_VERSION

    fingerprint = model_fingerprint(tiny_llama)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    outbox.put(pb2.ClientFrame(open=pb2.Open(
        protocol_version=PROTOCOL_VERSION, model_fingerprint=fingerprint, split_layer=LAYER,
        codec=pb2.CodecSpec(name="identity", config_json="{}"), max_seq_len=32,
        max_new_tokens=8)))
    with grpc.insecure_channel(fleet.address) as channel:
        call = pb2_grpc.SplitInferenceStub(channel).Generate(
            iter(outbox.get, None), metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert next(call).ready.session_id
        assert wait_for(lambda: sum(fleet.open_sessions().values()) == 1, 30)
        call.cancel()
    outbox.put(None)
    assert wait_for(lambda: sum(fleet.open_sessions().values()) == 0, 30)


def test_no_leaked_actors(fleet):
    """Two replica actors (one of them the replacement of the killed one), no session open."""
    import ray

    assert sum(fleet.open_sessions().values()) == 0
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    replicas = [n for n in names if n.startswith(f"SERVE_REPLICA::{APP_NAME}#")]
    assert sorted(n.rsplit("#", 1)[1] for n in replicas) == sorted(fleet.replicas())
    assert len(replicas) == 2


def test_sample_rayservice_is_valid_for_ray_serve(monkeypatch):
    """docs/rayservice.yaml: its serveConfigV2 passes Ray 2.60's own Serve schema, and its
    application builds (without a cluster)."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from fc_edge.errors import ConfigError
    from fc_edge.runtime.fleet import SERVICER_FUNCTION, app_builder

    manifest = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "docs" / "rayservice.yaml").read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    assert config.grpc_options.grpc_servicer_functions == [SERVICER_FUNCTION]
    (app,) = config.applications
    assert app.import_path == "fc_edge.runtime.fleet:app_builder"
    monkeypatch.setenv("FC_EDGE_TOKEN", "from-a-secret")
    assert app_builder(dict(app.args)) is not None
    with pytest.raises(ConfigError, match="FC_EDGE_TOKEN"):
        app_builder({**app.args, "token": "in-the-file"})
    with pytest.raises(ConfigError, match="MIN:MAX"):
        app_builder({**app.args, "autoscale": "4"})
