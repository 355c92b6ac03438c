"""Session recovery and several plain servers: a server that dies mid-generation (SIGKILL of a
real `fc-edge serve` process, or a stopped in-process server) is replaced by the next one, and
the greedy tokens equal Hugging Face's ``generate`` (the independent oracle) and an uninterrupted
run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from test_client import hf_greedy  # tests/runtime is on sys.path (pytest rootdir mode)
from test_server import wait_for

from fc_edge.runtime.client import DeviceClient, SessionError, split_servers
from fc_edge.runtime.server import start_server

pytestmark = pytest.mark.slow

LAYER = 2
PROMPT = torch.tensor([3, 141, 59, 26, 53, 58, 97, 93])
N = 24



@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[int]:
    return hf_greedy(tiny_llama, PROMPT, N)



def serve_subprocess() -> tuple[subprocess.Popen, str]:
    """`fc-edge serve` of synthetic:tiny-llama in its own process; (process, address)."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fc_edge.cli", "serve", "--model", "synthetic:tiny-llama",
         "--split-layer", str(LAYER), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:  # the banner names the address it listens on
        lines.append(line)
        m = re.match(r"fc-edge serve: .* on (127\.0\.0\.1:\d+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise AssertionError("the server did not start:\n" + "".join(lines))


def test_split_servers():
    assert split_servers("a:1, b:2,") == ["a:1", "b:2"]
    assert split_servers(["a:1", "b:2"]) == ["a:1", "b:2"]
    # a target with a scheme is one channel that resolves (and balances) itself
    assert split_servers("ipv4:10.0.0.1:5,10.0.0.2:5") == ["ipv4:10.0.0.1:5,10.0.0.2:5"]
    assert split_servers("dns:///edge.example:50051") == ["dns:///edge.example:50051"]
    with pytest.raises(Exception, match="no server address"):
        split_servers(" , ")


def test_sigkilled_server_recovers_with_same_tokens(tiny_llama, expected):
    proc, dead = serve_subprocess()
    try:
        with start_server(tiny_llama, LAYER, port=0) as alive, \
                DeviceClient(f"{dead},{alive.address}", tiny_llama, LAYER, "identity",
                             first_server=0) as client:
            seen: list[int] = []

            def kill_after_six(i: int, token: int, session: str) -> None:
                seen.append(token)
                if i == 5:
                    assert alive.active_sessions() == 0  # the session is on the doomed server
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)

            result = client.generate(PROMPT, N, eos_token_id=None, on_token=kill_after_six)
            assert proc.returncode == -signal.SIGKILL
            assert result.token_ids == expected == seen
            assert result.recoveries == 1
            phases = [s.phase for s in result.steps]
            assert phases == ["prefill"] + ["decode"] * 5 + ["recovered"] + ["decode"] * 17
            # the replay is one prefill of the prompt and the six tokens generated before
            assert result.steps[6].rows == PROMPT.numel() + 6
            assert wait_for(lambda: alive.active_sessions() == 0)
    finally:
        proc.kill()
        proc.wait(10)


def test_stopped_server_recovers_and_uninterrupted_run_agrees(tiny_llama, expected):
    a = start_server(tiny_llama, LAYER, port=0)
    with start_server(tiny_llama, LAYER, port=0) as b, \
            DeviceClient([a.address, b.address], tiny_llama, LAYER, "identity",
                         first_server=0) as client:
        def stop_a(i: int, token: int, session: str) -> None:
            if i == 10:
                a.stop(0)  # cancels the open stream at once

        interrupted = client.generate(PROMPT, N, eos_token_id=None, on_token=stop_a)
        # the list goes on from b (a is down): an uninterrupted run there
        whole = client.generate(PROMPT, N, eos_token_id=None)
        assert interrupted.recoveries == 1 and whole.recoveries == 0
        assert interrupted.token_ids == whole.token_ids == expected
        assert wait_for(lambda: b.active_sessions() == 0)


def test_sessions_go_round_the_list(tiny_llama, expected):
    with start_server(tiny_llama, LAYER, port=0) as a, \
            start_server(tiny_llama, LAYER, port=0) as b, \
            DeviceClient(f"{a.address},{b.address}", tiny_llama, LAYER, "identity",
                         first_server=1) as client:
        where: list[str] = []

        def note(i: int, token: int, session: str) -> None:
            if i == 0:
                where.append("a" if a.active_sessions() else "b")

        for _ in range(4):
            assert client.generate(PROMPT, 4, eos_token_id=None, on_token=note).token_ids \
                == expected[:4]
        assert where == ["b", "a", "b", "a"]


def test_round_robin_target_spreads_and_recovers(tiny_llama, expected):
    """One gRPC target naming two addresses, balanced by gRPC's round_robin policy."""
    a = start_server(tiny_llama, LAYER, port=0)
    with start_server(tiny_llama, LAYER, port=0) as b, \
            DeviceClient(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", tiny_llama, LAYER,
                         "identity", lb_policy="round_robin") as client:
        used: set[str] = set()

        def note(i: int, token: int, session: str) -> None:
            if i == 0:
                used.update(n for n, h in (("a", a), ("b", b)) if h.active_sessions())

        for _ in range(6):
            client.generate(PROMPT, 2, eos_token_id=None, on_token=note)
        assert used == {"a", "b"}

        def stop_serving_one(i: int, token: int, session: str) -> None:
            if i == 3:
                (a if a.active_sessions() else b).stop(0)

        result = client.generate(PROMPT, N, eos_token_id=None, on_token=stop_serving_one)
        assert result.token_ids == expected and result.recoveries == 1
    a.stop(0)


def test_recoveries_are_bounded(tiny_llama):
    # a server that refuses the first connection is not retried: one error at once, however many
    # recoveries are allowed (the whole list is tried once)
    proc, dead = serve_subprocess()
    proc.kill()
    proc.wait(10)
    for servers in (dead, f"{dead},{dead}"):
        with DeviceClient(servers, tiny_llama, LAYER, "identity", max_recoveries=3) as client:
            with pytest.raises(SessionError, match="cannot reach") as info:
                client.generate(PROMPT, 4, eos_token_id=None)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
    # sessions lost after they opened are resumed at most max_recoveries times
    for allowed in (0, 1):
        with start_server(tiny_llama, LAYER, port=0) as a, \
                DeviceClient(a.address, tiny_llama, LAYER, "identity",
                             max_recoveries=allowed) as client:
            def stop(i: int, token: int, session: str, a=a) -> None:
                if i == 2:
                    a.stop(0)

            with pytest.raises(SessionError, match=f"gave up after {allowed} recoveries") \
                    as info:
                client.generate(PROMPT, 8, eos_token_id=None, on_token=stop)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(Exception, match="max_recoveries must be"):
        DeviceClient(dead, tiny_llama, LAYER, "identity", max_recoveries=-1)


def test_non_server_errors_are_not_retried(tiny_llama):
    """A refusal (here: a wrong split layer) is the session's fault: no recovery, one error."""
    with start_server(tiny_llama, LAYER, port=0) as a, \
            start_server(tiny_llama, LAYER, port=0) as b, \
            DeviceClient(f"{a.address},{b.address}", tiny_llama, LAYER + 1, "identity",
                         first_server=0) as client:
        with pytest.raises(SessionError, match="split mismatch") as info:
            client.generate(PROMPT, 4, eos_token_id=None)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
