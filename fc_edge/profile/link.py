"""Analytic network links: rate, one-way latency and jitter, applied to measured byte counts.

A payload of ``n`` bytes crosses a link in

    transfer_s(n) = latency_s + wire_bytes(n) * 8 / rate_bps

where ``wire_bytes`` adds the per-segment framing of TCP/IPv4 over Ethernet (a 1448-byte
segment carries 66 bytes of headers with timestamps), because that is what a rate limiter counts.
Jitter is a zero-mean normal perturbation of the latency (truncated at zero latency). Loss is
the probability that a segment is lost; each lost segment costs one retransmission: a round
trip (2 x latency, the fast-retransmit path; a timeout would cost more) plus sending the segment
again. Jitter and loss are drawn when sampling (:meth:`LinkModel.sample_transfer_s`, used by the
multi-client simulation); :meth:`LinkModel.transfer_s` is the expectation.

Presets (``PRESETS``):

* ``5g``: a 5G uplink, 50 Mbit/s, 10 ms one way (a 20 ms round trip: field round trips are
  10-30 ms); ``5g-field``: the same with 4 ms jitter and 0.1% segment loss;
* ``wifi6``: 500 Mbit/s, 2 ms; ``wifi6-field``: 3 ms with 1.5 ms jitter and 0.05% loss;
* the paper's 1, 3, 5 and 10 Gbit/s links, which the paper gives by rate alone (latency 0).

The field jitter and loss figures are round assumptions for a what-if, not measurements. A
custom link is written ``RATE[:LATENCY[:JITTER[:LOSS]]]``, e.g. ``100mbit:5ms:1ms:0.5%``.

The same delays on a real interface need the kernel's netem qdisc; the shaped-link check
(:mod:`fc_edge.profile.shaped`) uses tbf only, because netem is not available on every host (on
the 2-core development host `tc qdisc add ... netem` answers "Specified qdisc kind is unknown").
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

from fc_edge.errors import ConfigError

# TCP/IPv4 over Ethernet: MSS with timestamps, and the bytes a frame adds to each segment
# (Ethernet 14 + IPv4 20 + TCP 20 + timestamp option 12).
TCP_MSS = 1448
FRAME_OVERHEAD = 66


@dataclass(frozen=True)
class LinkModel:
    """A point-to-point link: ``rate_bps`` bits/s, one-way ``latency_s`` and ``jitter_s`` (std, s),
    ``loss`` the probability that one segment is lost (0..1).

    ``mss`` / ``frame_overhead``: payload bytes per segment and header bytes added to each
    (``frame_overhead=0`` models a raw bit pipe).
    """

    name: str
    rate_bps: float
    latency_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    mss: int = TCP_MSS
    frame_overhead: int = FRAME_OVERHEAD

    def __post_init__(self) -> None:
        if not self.rate_bps > 0:
            raise ConfigError(f"link {self.name!r}: rate must be > 0 bit/s, got {self.rate_bps}")
        if self.latency_s < 0 or self.jitter_s < 0:
            raise ConfigError(f"link {self.name!r}: latency and jitter must be >= 0 s")
        if not 0.0 <= self.loss < 1.0:
            raise ConfigError(f"link {self.name!r}: loss must be in [0, 1), got {self.loss}")
        if self.mss <= 0 or self.frame_overhead < 0:
            raise ConfigError(f"link {self.name!r}: mss must be > 0 and frame overhead >= 0")

    def wire_bytes(self, nbytes: int) -> int:
        """Bytes on the wire for a payload of ``nbytes`` (framing included; 0 for 0)."""
        if nbytes < 0:
            raise ConfigError(f"payload size must be >= 0 bytes, got {nbytes}")
        return nbytes + math.ceil(nbytes / self.mss) * self.frame_overhead

    def serialization_s(self, nbytes: int) -> float:
        """Seconds the link is busy sending ``nbytes`` of payload (no latency)."""
        return self.wire_bytes(nbytes) * 8.0 / self.rate_bps

    def segments(self, nbytes: int) -> int:
        return math.ceil(nbytes / self.mss) if nbytes > 0 else 0

    def retransmit_s(self) -> float:
        """What one lost segment costs (s): a round trip, then the segment sent again."""
        return 2 * self.latency_s + (self.mss + self.frame_overhead) * 8.0 / self.rate_bps

    def transfer_s(self, nbytes: int) -> float:
        """Expected one-way transfer time of ``nbytes`` (s): latency + serialization + the
        expected retransmissions (segments x loss x :meth:`retransmit_s`)."""
        return (self.latency_s + self.serialization_s(nbytes)
                + self.segments(nbytes) * self.loss * self.retransmit_s())

    def sample_loss_s(self, nbytes: int, rng: random.Random) -> float:
        """One draw of the retransmission delay of ``nbytes`` (s): each segment lost with
        probability ``loss``, independently."""
        if self.loss == 0:
            return 0.0
        lost = sum(rng.random() < self.loss for _ in range(self.segments(nbytes)))
        return lost * self.retransmit_s()

    def sample_latency_s(self, rng: random.Random) -> float:
        """One draw of the one-way latency (s), jitter included, never below zero."""
        if self.jitter_s == 0:
            return self.latency_s
        return max(0.0, rng.gauss(self.latency_s, self.jitter_s))

    def sample_transfer_s(self, nbytes: int, rng: random.Random) -> float:
        """One draw of the transfer time of ``nbytes`` (s), jitter and loss included."""
        return (self.sample_latency_s(rng) + self.serialization_s(nbytes)
                + self.sample_loss_s(nbytes, rng))

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        s = f"{format_rate(self.rate_bps)}, {self.latency_s * 1e3:g} ms"
        if self.jitter_s:
            s += f" ± {self.jitter_s * 1e3:g} ms"
        if self.loss:
            s += f", {self.loss * 100:g}% loss"
        return s


PRESETS: dict[str, LinkModel] = {
    "5g": LinkModel("5g", 50e6, 10e-3),
    "5g-field": LinkModel("5g-field", 50e6, 10e-3, jitter_s=4e-3, loss=1e-3),
    "wifi6": LinkModel("wifi6", 500e6, 2e-3),
    "wifi6-field": LinkModel("wifi6-field", 500e6, 3e-3, jitter_s=1.5e-3, loss=5e-4),
    "1gbit": LinkModel("1gbit", 1e9),
    "3gbit": LinkModel("3gbit", 3e9),
    "5gbit": LinkModel("5gbit", 5e9),
    "10gbit": LinkModel("10gbit", 10e9),
}
DEFAULT_LINKS = ",".join(PRESETS)

_RATE_UNITS = {"": 1.0, "bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def _parse_number(text: str, units: dict[str, float], what: str, spec: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in units:
        raise ConfigError(
            f"link {spec!r}: cannot read {what} {text!r}; write e.g. "
            + ("100mbit, 1.5gbit" if what == "rate" else "4ms, 0.5ms, 0.002s")
        )
    return float(m.group(1)) * units[m.group(2)]


def parse_link(spec: str) -> LinkModel:
    """A preset name (``5g``, ``wifi6``, ``1gbit`` ...) or ``RATE[:LATENCY[:JITTER[:LOSS]]]``
    (loss as a fraction or a percentage: ``0.001`` or ``0.1%``)."""
    key = spec.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    parts = key.split(":")
    if not 1 <= len(parts) <= 4 or not parts[0]:
        raise ConfigError(
            f"unknown link {spec!r}: use a preset ({', '.join(PRESETS)}) or "
            "RATE[:LATENCY[:JITTER[:LOSS]]] such as 100mbit:5ms:1ms:0.5%"
        )
    rate = _parse_number(parts[0], _RATE_UNITS, "rate", spec)
    latency = _parse_number(parts[1], _TIME_UNITS, "latency", spec) if len(parts) > 1 else 0.0
    jitter = _parse_number(parts[2], _TIME_UNITS, "jitter", spec) if len(parts) > 2 else 0.0
    loss = 0.0
    if len(parts) > 3:
        text = parts[3].strip()
        scale = 0.01 if text.endswith("%") else 1.0
        try:
            loss = float(text.rstrip("%")) * scale
        except ValueError:
            raise ConfigError(f"link {spec!r}: cannot read loss {parts[3]!r}; write e.g. 0.5% "
                              "or 0.005") from None
    return LinkModel(key, rate, latency, jitter, loss)


def parse_links(specs: str | Iterable[str]) -> list[LinkModel]:
    """Comma-separated (or listed) link specs, in order, duplicates dropped."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    out: list[LinkModel] = []
    for item in items:
        if item.strip():
            link = parse_link(item)
            if link not in out:
                out.append(link)
    if not out:
        raise ConfigError("no link given: use e.g. --links 5g,wifi6,1gbit")
    return out


def format_rate(rate_bps: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if rate_bps >= scale:
            return f"{rate_bps / scale:g} {unit}"
    return f"{rate_bps:g} bit/s"


def with_rate(link: LinkModel, rate_bps: float) -> LinkModel:
    """The same link at another rate (for response-time-vs-rate sweeps)."""
    return replace(link, name=f"{link.name}@{format_rate(rate_bps)}", rate_bps=rate_bps)


def step_response_s(
    link: LinkModel, compute_s: float, bytes_up: int, bytes_down: int,
    rng: random.Random | None = None,
) -> float:
    """Response time of one round trip: compute (all non-network stages, s) + up + down."""
    if rng is None:
        return compute_s + link.transfer_s(bytes_up) + link.transfer_s(bytes_down)
    up = link.sample_transfer_s(bytes_up, rng)
    return compute_s + up + link.sample_transfer_s(bytes_down, rng)
