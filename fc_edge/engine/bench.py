"""Head latency: the onnxruntime engine vs the torch head, side by side in one process.

Both run the same prompt (prefill) and the same decode tokens, alternating rounds so that load
changes hit both; the table gives median milliseconds and the ratio engine / torch (below 1:
the engine is faster).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def head_latency(
    engine: Any, head: Any, prompt_len: int = 64, decode_steps: int = 16, rounds: int = 5
) -> dict[str, dict[str, float]]:
    """Median seconds of one prefill (``prompt_len`` tokens) and of one decode step, for each
    head: ``{"prefill": {"torch": s, "engine": s, "ratio": engine / torch}, "decode": ...}``.
    One warm-up round is not counted."""
    vocab = engine.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (prompt_len + decode_steps,), generator=gen)
    times: dict[str, dict[str, list[float]]] = {
        phase: {"torch": [], "engine": []} for phase in ("prefill", "decode")
    }
    for r in range(rounds + 1):
        for name, runner in (("torch", head), ("engine", engine)):
            session = runner.start(prompt_len + decode_steps)
            t0 = time.perf_counter()
            session.step(ids[:prompt_len])
            t1 = time.perf_counter()
            steps = []
            for j in range(decode_steps):
                ts = time.perf_counter()
                session.step(ids[prompt_len + j : prompt_len + j + 1])
                steps.append(time.perf_counter() - ts)
            if r:
                times["prefill"][name].append(t1 - t0)
                times["decode"][name].extend(steps)
    out: dict[str, dict[str, float]] = {}
    for phase, by in times.items():
        t, e = statistics.median(by["torch"]), statistics.median(by["engine"])
        out[phase] = {"torch": t, "engine": e, "ratio": e / t}
    return out


def format_latency(result: dict[str, dict[str, float]], prompt_len: int) -> str:
    lines = [f"{'phase':<22}{'torch ms':>10}{'engine ms':>11}{'engine/torch':>14}"]
    for phase, r in result.items():
        label = f"prefill ({prompt_len} tok)" if phase == "prefill" else "decode (1 tok)"
        lines.append(
            f"{label:<22}{r['torch'] * 1e3:>10.2f}{r['engine'] * 1e3:>11.2f}{r['ratio']:>14.2f}"
        )
    return "\n".join(lines)
