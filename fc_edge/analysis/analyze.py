"""Layer-aware compressibility: per split layer, spectra and every codec's error and bytes.

:func:`analyze` runs the model over a few documents, keeps the (S, D) activation after each
requested layer (what the device would send when split there) and measures, through the real
wire format, the relative reconstruction error ``||A - Â|| / ||A||`` and the byte ratio of

* the ratio-budget codecs (fourier, topk, svd, qr) at each ratio in ``ratios``;
* the fixed-rate codecs (``int8``, ``int4``, ``rotated`` defaults, ...), once each.

:func:`recommend` picks (layer, codec, parameters) under an error budget (most compression
whose mean error is within it) or a byte budget (least error at or above a byte ratio).
Reconstruction error is a proxy: the accuracy it costs is what ``fc-edge eval`` measures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fc_edge.analysis.spectra import low_frequency_share, spectrum_image
from fc_edge.errors import BudgetError, ConfigError

RATIO_CODECS = ("fourier", "topk", "svd", "qr")
FIXED_CODECS = ("int8", "int4", "rotated")
DEFAULT_RATIOS = (2.0, 4.0, 8.0, 16.0)


def _settings(ratio_codecs: Sequence[str], ratios: Sequence[float],
              fixed_codecs: Sequence[str]) -> list[tuple[str, str, dict[str, Any], float | None]]:
    """(label, codec name, kwargs, target ratio) for every measured setting."""
    out = []
    for name in ratio_codecs:
        for r in ratios:
            out.append((f"{name}[ratio={r:g}]", name, {"ratio": float(r)}, float(r)))
    for name in fixed_codecs:
        out.append((name, name, {}, None))
    return out


def collect_activations(model: Any, token_ids: Sequence[Sequence[int]], layers: Sequence[int]
                        ) -> dict[int, list[Tensor]]:
    """(S, D) float32 activation after each layer in ``layers``, per document."""
    from fc_edge.eval.forward import LayerStack

    stack = LayerStack(model)
    for L in layers:
        stack.check_split(L)
    out: dict[int, list[Tensor]] = {L: [] for L in layers}
    with torch.inference_mode():
        for ids in token_ids:
            h, ctx = stack.start(torch.tensor([list(ids)]))
            prev = 0
            for L in sorted(layers):
                h = stack.run(h, ctx, prev, L)
                out[L].append(h[0].float().clone())
                prev = L
    return out


def analyze(model: Any, token_ids: Sequence[Sequence[int]], layers: Sequence[int],
            ratios: Sequence[float] = DEFAULT_RATIOS,
            ratio_codecs: Sequence[str] = RATIO_CODECS,
            fixed_codecs: Sequence[str] = FIXED_CODECS, fraction: float = 0.125,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every number of the analysis, JSON-ready (see the module docstring)."""
    from fc_edge.codecs import get_codec, measure
    from fc_edge.models.split import bind_codec

    if not token_ids:
        raise ConfigError("analyze needs at least one document")
    layers = sorted(set(int(L) for L in layers))
    acts = collect_activations(model, token_ids, layers)
    settings = _settings(ratio_codecs, ratios, fixed_codecs)
    codecs = {label: (name, get_codec(name, **kw), r) for label, name, kw, r in settings}
    per_layer: dict[str, Any] = {}
    for L in layers:
        xs = acts[L]
        tok = [low_frequency_share(x, 0, fraction) for x in xs]
        hid = [low_frequency_share(x, 1, fraction) for x in xs]
        entry: dict[str, Any] = {
            "token_low_share": sum(tok) / len(tok), "hidden_low_share": sum(hid) / len(hid),
            "rms": float(torch.cat([x.reshape(-1) for x in xs]).pow(2).mean().sqrt()),
            "codecs": {}}
        for label, (name, codec, target) in codecs.items():
            # bound to the model's channel weights at this split, as the runtime binds it
            # (noise shaping for `rotated`; a no-op for the others)
            bind_codec(codec, model, L)
            errs, sent, raw, failed = [], 0, 0, 0
            for x in xs:
                try:
                    m = measure(codec, x)
                except BudgetError:
                    failed += 1
                    continue
                errs.append(m.rel_error)
                sent += m.nbytes
                raw += m.raw_bytes
            entry["codecs"][label] = {
                "codec": name, "target_ratio": target, "row_wise": bool(codec.row_wise),
                "config": dict(codec.config()),
                "rel_error": sum(errs) / len(errs) if errs else None,
                "byte_ratio": raw / sent if sent else None, "failed": failed}
        per_layer[str(L)] = entry
        if progress is not None:
            progress(f"layer {L}: low-frequency share (lowest {fraction:g} of frequencies) "
                     f"tokens {entry['token_low_share']:.3f}, "
                     f"hidden {entry['hidden_low_share']:.3f}")
    return {"layers": layers, "fraction": fraction, "ratios": list(ratios),
            "documents": len(token_ids), "tokens": sum(len(t) for t in token_ids),
            "settings": [s[0] for s in settings], "per_layer": per_layer,
            "_activations": {L: acts[L][0] for L in layers}}


def recommend(res: dict[str, Any], max_error: float | None = None,
              min_ratio: float | None = None, row_wise_only: bool = False
              ) -> dict[str, Any] | None:
    """Best (layer, codec) under a budget: with ``max_error``, the highest byte ratio whose mean
    relative error is <= max_error; with ``min_ratio``, the lowest error at byte ratio >= it.
    Ties go to the earlier layer (less device compute). None when nothing fits."""
    if (max_error is None) == (min_ratio is None):
        raise ConfigError("give exactly one budget: --max-error or --min-ratio")
    cands = []
    for L, entry in res["per_layer"].items():
        for label, c in entry["codecs"].items():
            if c["rel_error"] is None or c["failed"] or (row_wise_only and not c["row_wise"]):
                continue
            cands.append({"layer": int(L), "setting": label, **c})
    if max_error is not None:
        ok = [c for c in cands if c["rel_error"] <= max_error]
        ok.sort(key=lambda c: (-c["byte_ratio"], c["layer"], c["rel_error"]))
    else:
        ok = [c for c in cands if c["byte_ratio"] >= min_ratio]
        ok.sort(key=lambda c: (c["rel_error"], c["layer"], -c["byte_ratio"]))
    return ok[0] if ok else None


def plot_all(res: dict[str, Any], out_dir: Path) -> list[Path]:
    """spectra.png (first, middle, last analysed layer), error_vs_ratio.png (one panel per layer),
    error_vs_layer.png (one line per setting at ratio 8 and the fixed-rate codecs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    layers = res["layers"]
    paths = []
    picks = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    fig, axes = plt.subplots(1, len(picks), figsize=(4.5 * len(picks), 3.6), squeeze=False)
    for ax, L in zip(axes[0], picks, strict=True):
        img = spectrum_image(res["_activations"][L]).numpy()
        im = ax.imshow(img, aspect="auto", cmap="viridis")
        e = res["per_layer"][str(L)]
        ax.set_title(f"after layer {L}: low-freq share tok {e['token_low_share']:.2f} "
                     f"hid {e['hidden_low_share']:.2f}", fontsize=8)
        ax.set_xlabel("hidden frequency (centred)")
        ax.set_ylabel("token frequency (centred)")
        fig.colorbar(im, ax=ax, label="log10 |FFT2|")
    fig.tight_layout()
    paths.append(out_dir / "spectra.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    cols = min(len(layers), 3)
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    names = sorted({c["codec"] for c in next(iter(res["per_layer"].values()))["codecs"].values()})
    for i, L in enumerate(layers):
        ax = axes[i // cols][i % cols]
        codecs = res["per_layer"][str(L)]["codecs"]
        for name in names:
            pts = [(c["byte_ratio"], c["rel_error"]) for c in codecs.values()
                   if c["codec"] == name and c["rel_error"] is not None]
            pts.sort()
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name,
                        ls="-" if len(pts) > 1 else "none")
        for label, c in codecs.items():
            if c["target_ratio"] is None and c["rel_error"] is not None:
                ax.annotate(label, (c["byte_ratio"], c["rel_error"]), fontsize=6)
        ax.set_title(f"split after layer {L}", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("byte ratio (float32 / sent)")
        ax.set_ylabel("relative error")
        ax.grid(alpha=0.3)
    for j in range(len(layers), rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "error_vs_ratio.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label in res["settings"]:
        c0 = res["per_layer"][str(layers[0])]["codecs"][label]
        if c0["target_ratio"] not in (None, 8.0):
            continue
        ys = [res["per_layer"][str(L)]["codecs"][label]["rel_error"] for L in layers]
        ax.plot(layers, [float("nan") if y is None else y for y in ys], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(layers, [str(L) for L in layers])
    ax.set_yscale("log")
    ax.set_xlabel("split after layer")
    ax.set_ylabel("relative error")
    ax.set_title("reconstruction error vs split layer (ratio-budget codecs at 8x)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "error_vs_layer.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def markdown_table(res: dict[str, Any]) -> str:
    """One row per layer: low-frequency shares and the error of each setting (byte ratio)."""
    labels = res["settings"]
    head = ["L", "tok low", "hid low"] + [f"`{x}`" for x in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for L in res["layers"]:
        e = res["per_layer"][str(L)]
        cells = [str(L), f"{e['token_low_share']:.3f}", f"{e['hidden_low_share']:.3f}"]
        for label in labels:
            c = e["codecs"][label]
            cells.append("n/a" if c["rel_error"] is None else
                         f"{c['rel_error']:.3f} ({c['byte_ratio']:.1f}×)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
