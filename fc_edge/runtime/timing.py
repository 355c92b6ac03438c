"""Per-step stage timings of a split generation, and the stage timer that measures them.

Every arrow of the data path is timed (docs/protocol.md, "Timings"): device compute, encode,
pack, the network round trip, and on the server unpack, decode and tail compute (+ sampling).
All times are seconds; byte counts are exact sizes on the link.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


class StageTimer:
    """Times one stage: wall clock on the CPU, CUDA events on a CUDA device, with an NVTX range.

    ``with StageTimer("encode", device) as t: ...`` then ``t.seconds``. On CUDA the range is
    pushed with ``torch.cuda.nvtx`` (visible in Nsight Systems) and the elapsed time comes from a
    pair of events, read (synchronising on the end event) only when ``seconds`` is asked for.
    """

    __slots__ = ("name", "cuda", "_start", "_end", "_t0", "_seconds")

    def __init__(self, name: str, device: torch.device | str | None = None) -> None:
        self.name = name
        dev = torch.device(device) if device is not None else None
        self.cuda = dev is not None and dev.type == "cuda" and torch.cuda.is_available()
        self._start: Any = None
        self._end: Any = None
        self._t0 = 0.0
        self._seconds: float | None = None

    def __enter__(self) -> StageTimer:
        if self.cuda:
            torch.cuda.nvtx.range_push(self.name)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end.record()
            torch.cuda.nvtx.range_pop()
        else:
            self._seconds = time.perf_counter() - self._t0

    @property
    def seconds(self) -> float:
        """Elapsed seconds of the stage (waits for the GPU on CUDA)."""
        if self._seconds is None:
            if self._end is None:
                raise RuntimeError(f"stage {self.name!r} has not run")
            self._end.synchronize()
            self._seconds = self._start.elapsed_time(self._end) / 1000.0
        return self._seconds


def stage(name: str, device: torch.device | str | None = None) -> StageTimer:
    """A :class:`StageTimer` for ``name`` on ``device`` (``None``: CPU wall clock)."""
    return StageTimer(name, device)


@dataclass
class StepTiming:
    """One generation step: a prefill (S = prompt length) or a decode step (S = 1).

    ``network_s`` is the client's round trip (send -> token received) minus the server's own
    time for the step, i.e. transport, (de)serialisation and queueing. ``total_s`` is the client's
    wall time for the whole step, device compute included. ``codec`` is the codec actually used
    for the payload (the session codec, or the fallback for a shape it refuses).
    """

    phase: str  # "prefill" | "decode" | "recovered" (a replay on a new server, see client.py)
    rows: int  # S sent
    codec: str
    device_compute_s: float
    encode_s: float
    pack_s: float
    network_s: float
    server_unpack_s: float
    server_decode_s: float
    server_compute_s: float
    bytes_up: int
    bytes_down: int
    total_s: float
    token_id: int = -1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Stage fields, in data-path order, as (field, short label) for tables.
STAGES: tuple[tuple[str, str], ...] = (
    ("device_compute_s", "head"),
    ("encode_s", "encode"),
    ("pack_s", "pack"),
    ("network_s", "net"),
    ("server_unpack_s", "unpack"),
    ("server_decode_s", "decode"),
    ("server_compute_s", "tail"),
)


def _median(values: Iterable[float]) -> float:
    v = list(values)
    return statistics.median(v) if v else float("nan")


@dataclass
class GenerationResult:
    """Tokens generated after the prompt, their text (when a tokenizer is at hand), per-step
    timings (one per token: ``steps[0]`` is the prefill) and the server's session id."""

    token_ids: list[int]
    text: str | None
    steps: list[StepTiming] = field(default_factory=list)
    session_id: str = ""

    @property
    def prefill(self) -> StepTiming | None:
        return self.steps[0] if self.steps and self.steps[0].phase == "prefill" else None

    @property
    def decode_steps(self) -> list[StepTiming]:
        return [s for s in self.steps if s.phase == "decode"]

    @property
    def ttft_s(self) -> float:
        """Time to first token: the first step's wall time (seconds), a prefill or, when the
        first server was lost before its first token, the recovered replay."""
        return self.steps[0].total_s if self.steps else float("nan")

    @property
    def recoveries(self) -> int:
        """Sessions lost to a dead server and resumed on another (``recovered`` steps)."""
        return sum(s.phase == "recovered" for s in self.steps)

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first: median decode-step wall time (seconds)."""
        return _median(s.total_s for s in self.decode_steps)

    @property
    def total_s(self) -> float:
        return sum(s.total_s for s in self.steps)

    @property
    def bytes_up(self) -> int:
        return sum(s.bytes_up for s in self.steps)

    @property
    def bytes_down(self) -> int:
        return sum(s.bytes_down for s in self.steps)

    def median(self, name: str, phase: str = "decode") -> float:
        """Median of a :class:`StepTiming` field over the steps of ``phase``."""
        return _median(getattr(s, name) for s in self.steps if s.phase == phase)

    def codecs_used(self, phase: str) -> list[str]:
        return list(dict.fromkeys(s.codec for s in self.steps if s.phase == phase))

    def summary(self) -> dict[str, Any]:
        """Totals and medians (seconds, bytes) for reports."""
        out: dict[str, Any] = {
            "tokens": len(self.token_ids),
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "total_s": self.total_s,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "prefill_bytes": self.prefill.bytes_up if self.prefill else 0,
            "decode_bytes": self.median("bytes_up"),
        }
        for name, _ in STAGES:
            out[f"prefill_{name}"] = self.median(name, "prefill")
            out[f"decode_{name}"] = self.median(name, "decode")
        return out


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain text table, columns right-aligned but the first."""
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        line = "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        lines.append(line.rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1e3:.2f}"


def stage_table(result: GenerationResult) -> str:
    """Per-stage latency (ms, medians) and bytes for the prefill and the decode steps."""
    rows = []
    for phase in ("prefill", "decode", "recovered"):
        steps = [s for s in result.steps if s.phase == phase]
        if not steps:
            continue
        rows.append([
            f"{phase} (x{len(steps)})", ",".join(result.codecs_used(phase)),
            str(int(_median(s.rows for s in steps))), str(int(_median(s.bytes_up for s in steps))),
            *[ms(result.median(name, phase)) for name, _ in STAGES],
            ms(result.median("total_s", phase)),
        ])
    headers = ["step", "codec", "rows", "bytes up", *[f"{label} ms" for _, label in STAGES],
               "total ms"]
    return format_table(headers, rows)
