"""A real rate-limited link: two network namespaces joined by a veth pair, shaped by ``tc tbf``.

Needs root and iproute2 (``ip``, ``tc``). Each direction of the veth pair gets a token-bucket
filter at the link's rate with a burst of three full frames: small enough that a transfer is paced
from its first bytes (a large burst lets them through at memory speed and flatters the rate),
large enough that a late timer wake-up does not lose tokens (a one-frame burst did, and made
50 Mbit/s transfers 9% slower than the rate; measured here up to 500 Mbit/s). The
kernel here has no ``netem``, so the shaped link adds no latency of its own; its base latency is
measured with small messages and handed to the analytic model.

Only the addresses of the namespaces this module creates (``10.200.<n>.1`` / ``.2``) carry
traffic, and the namespaces are always deleted, whatever happens (``try/finally``).

Measurement (``measure_transfers``): a receiver in the server namespace and a sender in the
client namespace (each a ``python -m fc_edge.profile.shaped`` child under ``ip netns exec``)
keep one TCP connection; per payload the sender writes an 8-byte length and the payload and
waits for a 1-byte acknowledgement, so the measured time is ``up(8 + n) + down(1)``, which is
what the analytic model is compared against (the fastest of a few rounds: see
:func:`compare_with_model`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from fc_edge.errors import ConfigError, FcEdgeError
from fc_edge.profile.link import LinkModel

PORT = 47_211
MTU = 1500
TBF_BURST_BYTES = 3 * (MTU + 14)
# tbf's queue must hold a whole transfer's worth of in-flight data: a drop would add a TCP
# retransmission timeout that has nothing to do with the link's rate.
TBF_LIMIT_BYTES = 16 * 1024 * 1024


class ShapedLinkUnavailable(FcEdgeError):
    """This host cannot build the shaped link (not root, no iproute2, no netns or tbf)."""


def unavailable_reason() -> str | None:
    """Why the shaped link cannot be built here, or ``None`` when it can."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the shaped link needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: install iproute2 (apt-get install iproute2)"
    probe = f"fcp{os.getpid() % 100000}p"
    try:
        _run(["ip", "netns", "add", probe])
    except ShapedLinkUnavailable as e:
        return f"cannot create a network namespace: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(cmd: Sequence[str]) -> str:
    p = subprocess.run(list(cmd), capture_output=True, text=True)
    if p.returncode != 0:
        raise ShapedLinkUnavailable(f"`{' '.join(cmd)}` failed: {p.stderr.strip()}")
    return p.stdout


@dataclass(frozen=True)
class ShapedLink:
    """A live shaped link: client namespace ``client_ns`` reaches ``server_addr`` in
    ``server_ns``; ``rate_bps`` is the tbf rate each way (``None``: unshaped)."""

    client_ns: str
    server_ns: str
    client_addr: str
    server_addr: str
    rate_bps: float | None

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


@contextmanager
def shaped_link(rate_bps: float | None, subnet: int | None = None) -> Iterator[ShapedLink]:
    """Build the namespace pair, shape both directions at ``rate_bps``, yield it, tear it down."""
    reason = unavailable_reason()
    if reason:
        raise ShapedLinkUnavailable(reason)
    tag = f"{os.getpid() % 100000}"
    subnet = (os.getpid() % 200) + 20 if subnet is None else subnet
    cns, sns = f"fcp{tag}c", f"fcp{tag}s"
    cdev, sdev = f"fcp{tag}c0", f"fcp{tag}s0"
    caddr, saddr = f"10.200.{subnet}.1", f"10.200.{subnet}.2"
    try:
        _run(["ip", "netns", "add", cns])
        _run(["ip", "netns", "add", sns])
        _run(["ip", "link", "add", cdev, "type", "veth", "peer", "name", sdev])
        _run(["ip", "link", "set", cdev, "netns", cns])
        _run(["ip", "link", "set", sdev, "netns", sns])
        for ns, dev, addr in ((cns, cdev, caddr), (sns, sdev, saddr)):
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "mtu", str(MTU), "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # a warmed-up connection keeps its window between payloads, as a gRPC stream does
            _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                  "net.ipv4.tcp_slow_start_after_idle=0"])
            if rate_bps:
                _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                      "rate", f"{int(rate_bps)}bit", "burst", str(TBF_BURST_BYTES),
                      "limit", str(TBF_LIMIT_BYTES)])
        yield ShapedLink(cns, sns, caddr, saddr, rate_bps)
    finally:
        for ns in (cns, sns):  # deleting a namespace deletes its end of the veth pair too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def measure_transfers(
    link: ShapedLink, sizes: Sequence[int], repeats: int = 5, warmup: int = 3,
    timeout_s: float = 120.0,
) -> dict[int, list[float]]:
    """Measured round times (s) of ``up(8 + n) + down(1)`` for each payload size ``n``."""
    server = subprocess.Popen(
        link.exec_prefix(link.server_ns)
        + [sys.executable, "-m", "fc_edge.profile.shaped", "receive", link.server_addr],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ready = server.stdout.readline().strip()
        if ready != "ready":
            raise ShapedLinkUnavailable(f"receiver did not start: {server.stderr.read().strip()}")
        cmd = link.exec_prefix(link.client_ns) + [
            sys.executable, "-m", "fc_edge.profile.shaped", "send", link.server_addr,
            "--sizes", ",".join(map(str, sizes)), "--repeats", str(repeats),
            "--warmup", str(warmup)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if p.returncode != 0:
            raise ShapedLinkUnavailable(f"sender failed: {p.stderr.strip()}")
        return {int(k): v for k, v in json.loads(p.stdout).items()}
    finally:
        server.kill()
        server.wait()


def compare_with_model(
    rate_bps: float, sizes: Sequence[int] = (65_536, 262_144, 1_048_576), repeats: int = 5,
) -> dict:
    """Build a link at ``rate_bps``, measure, and compare with the analytic :class:`LinkModel`.

    The host only ever adds delay to a transfer (a late timer, a preempted sender), so the
    link's own time is the fastest of ``repeats`` rounds; the median is kept to show the noise.
    The base one-way latency of the veth pair is measured with 1-byte rounds (half the fastest
    round minus their serialization) and given to the model. Returns per size the measured
    minimum and median, the model's prediction and the relative error of the model against the
    minimum.
    """
    with shaped_link(rate_bps) as live:
        times = measure_transfers(live, [1, *sizes], repeats=repeats)
    base_round = min(times[1])
    # a 1-byte round is up(9) + down(1): two latencies and two one-segment serializations
    probe = LinkModel("probe", rate_bps)
    latency = max(0.0, (base_round - probe.serialization_s(9) - probe.serialization_s(1)) / 2)
    model = LinkModel(f"tbf@{rate_bps:g}", rate_bps, latency)
    rows = []
    for n in sizes:
        measured = min(times[n])
        predicted = model.transfer_s(8 + n) + model.transfer_s(1)
        rows.append({"bytes": n, "measured_s": measured, "measured_median_s": _median(times[n]),
                     "model_s": predicted, "rel_error": (predicted - measured) / measured,
                     "samples": times[n]})
    return {"rate_bps": rate_bps, "base_latency_s": latency, "rows": rows}


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _recv_exact(conn: socket.socket, n: int, buf: bytearray) -> None:
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:n])
        if k == 0:
            raise ConnectionError("peer closed")
        got += k


def _receive(addr: str) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, PORT))
    srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(64 * 1024 * 1024)
    hdr = bytearray(8)
    while True:
        try:
            _recv_exact(conn, 8, hdr)
        except ConnectionError:
            return
        (n,) = struct.unpack("<Q", hdr)
        _recv_exact(conn, n, buf)
        conn.sendall(b"\x01")


def _send(addr: str, sizes: list[int], repeats: int, warmup: int) -> None:
    conn = None
    for _ in range(100):  # the receiver is listening already; allow for a slow start anyway
        try:
            conn = socket.create_connection((addr, PORT), timeout=60)
            break
        except OSError:
            time.sleep(0.05)
    if conn is None:
        raise ConfigError(f"cannot reach the receiver at {addr}:{PORT}")
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ack = bytearray(1)
    out: dict[int, list[float]] = {}
    big = max(sizes)
    payload = os.urandom(big)

    def one(n: int) -> float:
        t0 = time.perf_counter()
        conn.sendall(struct.pack("<Q", n) + payload[:n])
        _recv_exact(conn, 1, ack)
        return time.perf_counter() - t0

    for _ in range(warmup):  # open the congestion window before timing anything
        one(big)
    for n in sizes:
        out[n] = [one(n) for _ in range(repeats)]
    conn.close()
    print(json.dumps(out))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="shaped-link measurement endpoints (internal)")
    p.add_argument("role", choices=["receive", "send"])
    p.add_argument("addr")
    p.add_argument("--sizes", default="65536")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    if a.role == "receive":
        _receive(a.addr)
    else:
        _send(a.addr, [int(s) for s in a.sizes.split(",")], a.repeats, a.warmup)


if __name__ == "__main__":
    main()
