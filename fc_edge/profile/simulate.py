"""Discrete-event simulation (SimPy) of N device clients sharing one edge server over one link.

The model of one generation, step by step (one prefill step, then one decode step per further
token), for each of ``N`` closed-loop clients (a client starts its next generation as soon as
the last one ends, after an optional think time):

    device stages (head compute, encode, pack)      own device, or a shared CPU pool when colocated
    uplink: FIFO link of rate R, then latency       shared by all clients
    server: one of G workers (unpack, decode, tail) shared
    downlink: FIFO link of rate R, then latency     shared

Service times and byte counts are drawn from :class:`Empirical` distributions of the profiler's
measurements, so the simulation inherits their spread. Two options model a loopback test where
clients and server share one host: ``device_slots`` makes the clients' device stages share that
many slots (client threads in one Python process take turns: the interpreter lock), and
``cpu_cores`` makes every compute stage, device or server, also hold one of that many cores.

:func:`simulate_open_queue` is the textbook open queue (Poisson arrivals, G workers) that the
tests check against M/M/1's closed form, mean response 1/(mu - lambda).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import simpy

from fc_edge.errors import ConfigError
from fc_edge.profile.link import LinkModel


class Empirical:
    """The empirical distribution of measured values: sampling draws one of them uniformly."""

    def __init__(self, samples: Iterable[float]):
        self.samples = [float(s) for s in samples]
        if not self.samples:
            raise ConfigError("an empirical distribution needs at least one measured value")

    @classmethod
    def constant(cls, value: float) -> Empirical:
        return cls([value])

    def sample(self, rng: random.Random) -> float:
        return self.samples[0] if len(self.samples) == 1 else rng.choice(self.samples)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)

    def __repr__(self) -> str:
        return f"Empirical(n={len(self.samples)}, mean={self.mean:.6g})"


@dataclass
class StepDemand:
    """What one step asks of each resource: seconds of device and server work, payload bytes."""

    device_s: Empirical
    server_s: Empirical
    bytes_up: Empirical
    bytes_down: Empirical


@dataclass
class Workload:
    """One generation: a prefill step, then ``decode_steps`` decode steps; ``think_s`` between
    generations. ``setup_s``: time a generation spends outside its steps (opening and closing
    the session), a delay that holds no shared resource and counts in its response time."""

    prefill: StepDemand
    decode: StepDemand
    decode_steps: int
    think_s: float = 0.0
    setup_s: Empirical | None = None

    def steps(self) -> list[StepDemand]:
        return [self.prefill] + [self.decode] * self.decode_steps


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), ``q`` in [0, 1]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class ClientSimResult:
    """Outcome of :func:`simulate_clients`: response times (s) of whole generations and steps."""

    n_clients: int
    workers: int
    link: str
    generation_s: list[float] = field(repr=False)
    first_token_s: list[float] = field(repr=False)
    decode_step_s: list[float] = field(repr=False)
    makespan_s: float = 0.0

    @property
    def mean_s(self) -> float:
        return sum(self.generation_s) / len(self.generation_s)

    @property
    def p90_s(self) -> float:
        return quantile(self.generation_s, 0.9)

    @property
    def throughput_per_s(self) -> float:
        """Completed generations per second."""
        return len(self.generation_s) / self.makespan_s if self.makespan_s else float("nan")

    def summary(self) -> dict:
        return {
            "n_clients": self.n_clients,
            "workers": self.workers,
            "link": self.link,
            "mean_response_s": self.mean_s,
            "p90_response_s": self.p90_s,
            "mean_ttft_s": sum(self.first_token_s) / len(self.first_token_s),
            "mean_tpot_s": (sum(self.decode_step_s) / len(self.decode_step_s)
                            if self.decode_step_s else float("nan")),
            "throughput_gen_per_s": self.throughput_per_s,
            "generations": len(self.generation_s),
        }


def simulate_clients(
    workload: Workload,
    n_clients: int,
    link: LinkModel,
    workers: int = 1,
    generations_per_client: int = 20,
    cpu_cores: int | None = None,
    seed: int = 0,
    device_slots: int | None = None,
) -> ClientSimResult:
    """Simulate ``n_clients`` closed-loop clients, each running ``generations_per_client``
    generations of ``workload`` against a server with ``workers`` workers over ``link``."""
    if n_clients < 1 or workers < 1 or generations_per_client < 1:
        raise ConfigError("n_clients, workers and generations_per_client must be >= 1")
    if (cpu_cores is not None and cpu_cores < 1) or (device_slots is not None and device_slots < 1):
        raise ConfigError("cpu_cores and device_slots must be >= 1 (or None: not shared)")
    rng = random.Random(seed)
    env = simpy.Environment()
    uplink = simpy.Resource(env, capacity=1)
    downlink = simpy.Resource(env, capacity=1)
    server = simpy.Resource(env, capacity=workers)
    cpu = simpy.Resource(env, capacity=cpu_cores) if cpu_cores else None
    device_pool = simpy.Resource(env, capacity=device_slots) if device_slots else None
    gen_s: list[float] = []
    ttft_s: list[float] = []
    tpot_s: list[float] = []

    def compute(seconds: float):
        if cpu is None:
            yield env.timeout(seconds)
        else:
            with cpu.request() as core:
                yield core
                yield env.timeout(seconds)

    def transfer(channel: simpy.Resource, nbytes: float):
        with channel.request() as turn:
            yield turn
            yield env.timeout(link.serialization_s(int(nbytes)))
        yield env.timeout(link.sample_latency_s(rng) + link.sample_loss_s(int(nbytes), rng))

    def device_compute(seconds: float):
        if device_pool is None:
            yield from compute(seconds)
        else:
            with device_pool.request() as slot:
                yield slot
                yield from compute(seconds)

    def step(demand: StepDemand):
        yield from device_compute(demand.device_s.sample(rng))
        yield from transfer(uplink, demand.bytes_up.sample(rng))
        with server.request() as worker:
            yield worker
            yield from compute(demand.server_s.sample(rng))
        yield from transfer(downlink, demand.bytes_down.sample(rng))

    def client(index: int):
        # stagger the starts by a fraction of a step so that clients do not move in lockstep
        yield env.timeout(rng.random() * workload.prefill.device_s.mean)
        for _ in range(generations_per_client):
            start = env.now
            if workload.setup_s is not None:
                yield env.timeout(workload.setup_s.sample(rng))
            for i, demand in enumerate(workload.steps()):
                t0 = env.now
                yield from step(demand)
                (ttft_s if i == 0 else tpot_s).append(env.now - t0)
            gen_s.append(env.now - start)
            if workload.think_s:
                yield env.timeout(workload.think_s)

    for i in range(n_clients):
        env.process(client(i))
    env.run()
    return ClientSimResult(n_clients, workers, link.name, gen_s, ttft_s, tpot_s, env.now)


def sweep_clients(
    workload: Workload,
    link: LinkModel,
    clients: Sequence[int] = (1, 2, 4, 8, 16, 32),
    workers: int = 1,
    generations_per_client: int = 10,
    cpu_cores: int | None = None,
    seed: int = 0,
    device_slots: int | None = None,
) -> list[ClientSimResult]:
    """:func:`simulate_clients` for each N in ``clients``."""
    return [
        simulate_clients(workload, n, link, workers, generations_per_client, cpu_cores, seed,
                         device_slots)
        for n in clients
    ]


def saturation_clients(workload: Workload, link: LinkModel, workers: int = 1,
                       cpu_cores: int | None = None) -> dict:
    """Where the closed system saturates, from mean demands (asymptotic bound analysis).

    ``R1`` is a generation's response time alone (plus think time) and ``D_max`` the demand per
    generation on the busiest resource divided by its capacity; throughput cannot exceed
    ``1 / D_max``, so beyond ``N* = R1 / D_max`` clients mostly queue. Returns N*, the bottleneck
    resource and the demands (s per generation).
    """
    steps = workload.steps()
    device = sum(s.device_s.mean for s in steps)
    serve = sum(s.server_s.mean for s in steps)
    up = sum(link.serialization_s(int(s.bytes_up.mean)) for s in steps)
    down = sum(link.serialization_s(int(s.bytes_down.mean)) for s in steps)
    setup = workload.setup_s.mean if workload.setup_s is not None else 0.0
    r1 = device + serve + up + down + 2 * len(steps) * link.latency_s + workload.think_s + setup
    demands = {"server": serve / workers, "uplink": up, "downlink": down}
    if cpu_cores:
        demands["cpu"] = (device + serve) / cpu_cores
    bottleneck = max(demands, key=demands.get)
    d_max = demands[bottleneck]
    return {
        "n_star": r1 / d_max if d_max > 0 else float("inf"),
        "bottleneck": bottleneck,
        "response_alone_s": r1,
        "demand_s": demands,
        "max_throughput_gen_per_s": 1.0 / d_max if d_max > 0 else float("inf"),
    }


def simulate_open_queue(
    arrival_rate: float,
    service: Callable[[random.Random], float],
    workers: int = 1,
    jobs: int = 100_000,
    warmup_jobs: int = 1_000,
    seed: int = 0,
) -> list[float]:
    """Response times (s) of ``jobs`` jobs arriving as a Poisson process of ``arrival_rate``
    (per s) at ``workers`` FIFO workers with service times drawn by ``service(rng)``; the first
    ``warmup_jobs`` are dropped (the queue starts empty)."""
    if arrival_rate <= 0 or workers < 1 or jobs <= warmup_jobs:
        raise ConfigError("need arrival_rate > 0, workers >= 1 and jobs > warmup_jobs")
    rng = random.Random(seed)
    env = simpy.Environment()
    server = simpy.Resource(env, capacity=workers)
    out: list[float] = []

    def job(index: int, service_s: float):
        t0 = env.now
        with server.request() as worker:
            yield worker
            yield env.timeout(service_s)
        if index >= warmup_jobs:
            out.append(env.now - t0)

    def source():
        for i in range(jobs):
            env.process(job(i, service(rng)))
            yield env.timeout(rng.expovariate(arrival_rate))

    env.process(source())
    env.run()
    return out
