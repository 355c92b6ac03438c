"""How much of the prompt an honest-but-curious server recovers from the activation it receives.

A split keeps the prompt's text on the device, but the server receives, for every prompt token,
the (decoded) activation after the device's layers. :func:`privacy_analysis` measures how many
of those tokens a server that has the model's weights and some text of its own can name back
from that activation alone, per split layer and codec:

* the **linear inverter** fits, by least squares, a map (with bias) from activation rows to the
  token's input embedding, then names the vocabulary entry whose embedding is nearest by cosine
  (the whole vocabulary is a candidate);
* the **MLP inverter** (:class:`MLPInverter`) classifies the token directly: standardised
  activation -> one hidden layer (GELU) beside a linear path -> a vector of the embedding's
  width, whose dot product with each row of the (fixed) input embedding matrix is that token's
  logit; trained with cross-entropy by Adam for a fixed number of epochs from a fixed seed. The
  softmax it trains with runs over the distinct tokens of the calibration rows (the full
  49,152-way softmax would cost ~10x the CPU); it predicts over the whole vocabulary, so it can
  name a token it never saw, but ``mlp_seen`` reports the share of evaluation rows whose token
  it did see when fitted.

Both are fitted on the calibration documents and scored on the evaluation documents of
``texts/dev.txt`` (:func:`fc_edge.paths.split_documents`): never on what they were fitted on.
Each document contributes its first ``max_tokens`` tokens; position 0 is left out of fitting and
scoring (the first token is the easiest and, with a BOS, known). What the server receives is the
codec's round trip through the wire format, bound to the model at that split as the runtime binds
it (:meth:`fc_edge.eval.settings.CodecSetting.send`), the whole document's (S, D) block at once.

Top-1 recovery is a proportion over tokens, but the tokens of one document are not independent,
so its 95% interval resamples documents (:func:`fc_edge.eval.stats.clustered_proportion_ci`).
The chance baseline is what a server learns without the activation: always naming the most
frequent calibration token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fc_edge.errors import ConfigError

DEFAULT_CODECS = "none,int8,rotated,fourier[ratio=8],topk[ratio=8]"
DEFAULT_LAYERS = (1, 2, 4, 8)
MAX_TOKENS = 64
MIN_DOCUMENTS = 2  # a clustered interval needs at least two documents on each side
INVERTERS = ("linear", "mlp")


@dataclass
class Rows:
    """Activation rows of one (layer, setting) and what they are: token id and document index."""

    x: Tensor  # (N, D) float32, what the server receives
    tokens: Tensor  # (N,) long
    docs: Tensor  # (N,) long, index of the document each row comes from
    nbytes: int = 0  # wire bytes of the documents' activations (all positions)
    elements: int = 0  # elements of those activations
    fallbacks: int = 0  # documents sent as float16 because the codec refused the shape


def token_windows(tokenizer: Any, docs: Sequence[str], max_tokens: int = MAX_TOKENS
                  ) -> list[list[int]]:
    """The first ``max_tokens`` token ids of each document (no special tokens added); documents
    with fewer than 2 tokens (nothing to score after position 0) are dropped."""
    out = []
    for d in docs:
        ids = list(tokenizer(d, add_special_tokens=False)["input_ids"])[:max_tokens]
        if len(ids) >= 2:
            out.append(ids)
    return out


def layer_activations(model: Any, token_ids: Sequence[Sequence[int]], layers: Sequence[int],
                      progress: bool = False) -> dict[int, list[Tensor]]:
    """(S, D) float32 activation after each layer in ``layers``, per document. Layer 0 is the
    input embedding (nothing run on the device: the reference of what a split adds)."""
    from fc_edge.eval.forward import LayerStack
    from fc_edge.eval.progress import progress_bar

    stack = LayerStack(model)
    layers = sorted(set(int(L) for L in layers))
    for L in layers:
        if L != 0:
            stack.check_split(L)
    out: dict[int, list[Tensor]] = {L: [] for L in layers}
    it = progress_bar(token_ids, "activations", len(token_ids), progress, unit="doc")
    with torch.inference_mode():
        for ids in it:
            h, ctx = stack.start(torch.tensor([list(ids)]))
            prev = 0
            for L in layers:
                h = stack.run(h, ctx, prev, L)
                out[L].append(h[0].float().clone())
                prev = L
    return out


def received_rows(setting: Any, acts: Sequence[Tensor], token_ids: Sequence[Sequence[int]]
                  ) -> Rows:
    """Each document's activation through ``setting`` (``send`` -> (x_hat, bytes, fell_back)),
    rows 1.. kept (position 0 left out)."""
    xs, toks, docs = [], [], []
    nbytes = elements = fallbacks = 0
    with torch.inference_mode():
        for i, (a, ids) in enumerate(zip(acts, token_ids, strict=True)):
            x_hat, n, fell = setting.send(a)
            nbytes += int(n)
            elements += a.numel()
            fallbacks += int(bool(fell))
            xs.append(x_hat[1:].float())
            toks.append(torch.as_tensor(list(ids)[1:], dtype=torch.long))
            docs.append(torch.full((len(ids) - 1,), i, dtype=torch.long))
    return Rows(torch.cat(xs), torch.cat(toks), torch.cat(docs), nbytes, elements, fallbacks)


# ---------------------------------------------------------------- inverters


class LinearInverter:
    """Least squares (float64, with a bias column) from activation rows to the rows of
    ``embedding`` of their tokens; a prediction is the vocabulary entry of highest cosine
    similarity to the mapped row."""

    def __init__(self, embedding: Tensor) -> None:
        self.embedding = embedding.detach().float()
        self.unit = torch.nn.functional.normalize(self.embedding, dim=1)
        self.weight: Tensor | None = None

    def fit(self, x: Tensor, tokens: Tensor) -> LinearInverter:
        a = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        y = self.embedding[tokens].double()
        # gelsd: minimum-norm solution, so a rank-deficient input (a codec that zeroes
        # everything) gives the bias alone rather than a failure
        self.weight = torch.linalg.lstsq(a, y, driver="gelsd").solution.float()
        return self

    def predict(self, x: Tensor, chunk: int = 2048) -> Tensor:
        if self.weight is None:
            raise RuntimeError("fit first")
        w, b = self.weight[:-1], self.weight[-1]
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), chunk):
                y = torch.nn.functional.normalize(x[i:i + chunk].float() @ w + b, dim=1)
                out.append((y @ self.unit.T).argmax(dim=1))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


class _OneHidden(torch.nn.Module):
    """``Linear(GELU(Linear(x))) + Linear(x)``: one hidden layer beside a linear path (the skip
    lets it start from what the linear inverter finds and learn the nonlinear rest)."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(d_in, hidden)
        self.down = torch.nn.Linear(hidden, d_out)
        self.skip = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x))) + self.skip(x)


class MLPInverter:
    """A one-hidden-layer classifier from a (standardised) activation row to its token.

    With ``embedding`` (V, E) the output head is the embedding matrix itself, fixed: the network
    maps a row to a vector ``z`` of the embedding's width and the logit of token v is
    ``z . embedding[v]``. It trains with the softmax over the distinct tokens of the fitting
    rows (the full 49,152-way softmax would cost ~10x) and predicts over the whole vocabulary,
    so it can name a token it never saw an example of. Without ``embedding`` the head is a free
    Linear over the fitted tokens only (a token never seen cannot be named)."""

    def __init__(self, hidden: int = 1024, epochs: int = 4, batch_size: int = 256,
                 lr: float = 2e-3, seed: int = 0, embedding: Tensor | None = None) -> None:
        if hidden < 1 or epochs < 1 or batch_size < 1 or not lr > 0:
            raise ConfigError("the MLP inverter needs hidden, epochs, batch size >= 1 and lr > 0")
        self.hidden, self.epochs, self.batch_size, self.lr, self.seed = (
            hidden, epochs, batch_size, lr, seed)
        self.embedding = None if embedding is None else embedding.detach().float()
        self.net: torch.nn.Module | None = None
        self.classes: Tensor | None = None

    def _standardise(self, x: Tensor) -> Tensor:
        return (x.float() - self.mean) / self.std

    def fit(self, x: Tensor, tokens: Tensor) -> MLPInverter:
        self.classes, target = torch.unique(tokens, return_inverse=True)
        self.mean = x.float().mean(dim=0)
        self.std = x.float().std(dim=0).clamp_min(1e-6)
        z = self._standardise(x)
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        out = len(self.classes) if self.embedding is None else self.embedding.shape[1]
        self.net = _OneHidden(x.shape[1], self.hidden, out)
        head = None if self.embedding is None else self.embedding[self.classes].T.contiguous()
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        self.net.train()
        for _ in range(self.epochs):
            order = torch.randperm(len(z), generator=gen)
            for i in range(0, len(z), self.batch_size):
                idx = order[i:i + self.batch_size]
                logits = self.net(z[idx])
                if head is not None:
                    logits = logits @ head
                loss = torch.nn.functional.cross_entropy(logits, target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.net.eval()
        return self

    def predict(self, x: Tensor, chunk: int = 1024) -> Tensor:
        if self.net is None or self.classes is None:
            raise RuntimeError("fit first")
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), chunk):
                y = self.net(self._standardise(x[i:i + chunk]))
                out.append(self.classes[y.argmax(1)] if self.embedding is None
                           else (y @ self.embedding.T).argmax(1))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


# ---------------------------------------------------------------- scoring


def recovery(pred: Tensor, tokens: Tensor, docs: Tensor, level: float = 0.95) -> dict[str, Any]:
    """Top-1 recovery over rows with its document-clustered interval, n rows and n documents."""
    from fc_edge.eval.stats import clustered_proportion_ci

    hit = (pred == tokens).numpy().astype(np.float64)
    d = docs.numpy()
    lo, hi = clustered_proportion_ci(hit, d, level)
    return {"top1": float(hit.mean()) if hit.size else float("nan"), "ci95": [lo, hi],
            "rows": int(hit.size), "documents": int(len(np.unique(d)))}


def privacy_analysis(model: Any, calibration: Sequence[Sequence[int]],
                     evaluation: Sequence[Sequence[int]], layers: Sequence[int],
                     settings: Sequence[Any], hidden: int = 1024, epochs: int = 4,
                     seed: int = 0, inverters: Sequence[str] = INVERTERS,
                     log: Callable[[str], None] | None = None, progress: bool = False
                     ) -> dict[str, Any]:
    """Every number of the privacy analysis, JSON-ready.

    ``calibration`` / ``evaluation``: token ids per document (fit on the first, score on the
    second). ``settings``: codec settings with ``label``, ``bind(model, layer)`` and
    ``send(x) -> (x_hat, bytes, fell_back)`` (:class:`fc_edge.eval.settings.CodecSetting`).
    ``layers``: split layers (0 = the input embedding itself)."""
    if len(calibration) < MIN_DOCUMENTS or len(evaluation) < MIN_DOCUMENTS:
        raise ConfigError(f"privacy needs at least {MIN_DOCUMENTS} calibration and "
                          f"{MIN_DOCUMENTS} evaluation documents with 2+ tokens, got "
                          f"{len(calibration)} and {len(evaluation)}")
    unknown = sorted(set(inverters) - set(INVERTERS))
    if unknown or not inverters:
        raise ConfigError(f"unknown inverter {', '.join(unknown) or '(none)'}; "
                          f"known: {', '.join(INVERTERS)}")
    say = log or (lambda _m: None)
    layers = sorted(set(int(L) for L in layers))
    embedding = model.get_input_embeddings().weight.detach().float()
    say(f"activations of {len(calibration)} calibration documents")
    cal_acts = layer_activations(model, calibration, layers, progress)
    say(f"activations of {len(evaluation)} evaluation documents")
    ev_acts = layer_activations(model, evaluation, layers, progress)

    cal_tokens = torch.cat([torch.as_tensor(list(t)[1:]) for t in calibration])
    ev_tokens = torch.cat([torch.as_tensor(list(t)[1:]) for t in evaluation])
    ev_docs = torch.cat([torch.full((len(t) - 1,), i) for i, t in enumerate(evaluation)])
    counts = torch.bincount(cal_tokens)
    mode = int(counts.argmax())
    chance = recovery(torch.full_like(ev_tokens, mode), ev_tokens, ev_docs)
    seen = torch.zeros(max(int(ev_tokens.max()), int(cal_tokens.max())) + 1, dtype=torch.bool)
    seen[cal_tokens] = True
    ceiling = float(seen[ev_tokens].float().mean())

    results: dict[str, Any] = {}
    total = len(layers) * len(settings)
    k = 0
    for L in layers:
        results[str(L)] = {}
        for s in settings:
            k += 1
            t0 = time.perf_counter()
            if L != 0:
                s.bind(model, L)
            cal = received_rows(s, cal_acts[L], calibration)
            ev = received_rows(s, ev_acts[L], evaluation)
            entry: dict[str, Any] = {
                "bytes_per_element": ev.nbytes / ev.elements,
                "budget_fallbacks": cal.fallbacks + ev.fallbacks}
            if "linear" in inverters:
                lin = LinearInverter(embedding).fit(cal.x, cal.tokens)
                entry["linear"] = recovery(lin.predict(ev.x), ev.tokens, ev.docs)
            if "mlp" in inverters:
                mlp = MLPInverter(hidden=hidden, epochs=epochs, seed=seed,
                                  embedding=embedding).fit(cal.x, cal.tokens)
                entry["mlp"] = recovery(mlp.predict(ev.x), ev.tokens, ev.docs)
            results[str(L)][s.label] = entry
            say(f"[{k}/{total}] layer {L} {s.label}: "
                + ", ".join(f"{inv} {100 * entry[inv]['top1']:.1f}% "
                            f"[{100 * entry[inv]['ci95'][0]:.1f}, "
                            f"{100 * entry[inv]['ci95'][1]:.1f}]"
                            for inv in INVERTERS if inv in entry)
                + f" ({time.perf_counter() - t0:.0f} s)")
    return {
        "layers": layers, "settings": [s.label for s in settings],
        "inverters": [i for i in INVERTERS if i in inverters],
        "calibration": {"documents": len(calibration), "rows": int(len(cal_tokens)),
                        "distinct_tokens": int((counts > 0).sum())},
        "evaluation": {"documents": len(evaluation), "rows": int(len(ev_tokens))},
        "chance": {"token": mode, **chance},
        "mlp_seen": ceiling,
        "mlp": {**{k: getattr(MLPInverter(hidden, epochs, seed=seed), k)
                   for k in ("hidden", "epochs", "batch_size", "lr", "seed")},
                "head": "the input embedding matrix (fixed); trained over the distinct "
                        "calibration tokens, predicts over the whole vocabulary"},
        "results": results,
    }


# ---------------------------------------------------------------- accuracy, report, plot


def accuracy_deltas(path: Path) -> dict[str, dict[str, Any]]:
    """``{layer: {label: {"delta": points, "delta_ci95": [lo, hi]}}}`` from an accuracy result of
    ``fc-edge eval --json`` or a file of several (e.g. docs/results/full.json); the first run
    that has a (layer, label) gives it."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--accuracy {str(path)!r}: cannot read a JSON file ({e})") from None
    runs = [data] if isinstance(data, dict) and "results" in data else (
        list(data.values()) if isinstance(data, dict) else [])
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        if not isinstance(run, dict) or run.get("kind") != "accuracy":
            continue
        for L, per in run.get("results", {}).items():
            for label, r in per.items():
                if label == "none":
                    d = {"delta": 0.0, "delta_ci95": [0.0, 0.0]}
                elif "delta" in r:
                    d = {"delta": r["delta"], "delta_ci95": r.get("delta_ci95")}
                else:
                    continue
                out.setdefault(str(L), {}).setdefault(label, d)
    if not out:
        raise ConfigError(f"--accuracy {str(path)!r}: no accuracy results of `fc-edge eval` in it")
    return out


def _pct(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['top1']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def summary_paragraph(res: dict[str, Any]) -> str:
    """Plain words with the figures, for docs/results.md "## 1. Privacy"."""
    layers, labels = res["layers"], res["settings"]
    R = res["results"]
    first, last = str(layers[0]), str(layers[-1])
    ev, ch = res["evaluation"], res["chance"]
    parts = [
        "A split keeps the prompt's *text* on the device, not its *content*: the server receives "
        "one activation per prompt token, and a server that holds the model's weights and some "
        "text of its own can learn to map activations back to tokens. Measured on "
        f"{ev['rows']:,} held-out tokens of {ev['documents']} documents (inverters fitted on "
        f"{res['calibration']['documents']} other documents; top-1 recovery, %, 95% interval "
        "clustered by document):"]
    if "none" in labels:
        n0, nl = R[first]["none"], R[last]["none"]
        parts.append(
            f"from the uncompressed activation after layer {first}, a least-squares map back "
            f"to the embedding names {_pct(n0['linear'])} of the tokens"
            + (f" and a small MLP {_pct(n0['mlp'])}" if "mlp" in n0 else "")
            + ("" if last == first else
               f"; after layer {last}, still {_pct(nl['linear'])} (linear)"
               + (f" and {_pct(nl['mlp'])} (MLP)" if "mlp" in nl else "")) + ".")
    lossy = [lab for lab in labels if lab != "none"]
    if lossy:
        inv = "mlp" if "mlp" in res["inverters"] else "linear"
        worst = min(lossy, key=lambda lab: R[first][lab][inv]["top1"])
        parts.append(
            f"Of the codecs measured, {worst} "
            f"({R[first][worst]['bytes_per_element']:.2f} bytes per element) leaves the least: "
            f"the {'MLP' if inv == 'mlp' else 'linear map'} still recovers "
            f"{_pct(R[first][worst][inv])} after layer {first}.")
    parts.append(f"Chance (always naming the most frequent token) is {_pct(ch)}.")
    best = max(max(R[str(L)][lab][i]["top1"] for lab in labels for i in res["inverters"])
               for L in layers)
    if best >= 0.5:
        parts.append(
            "So a split does not hide the prompt from the server it talks to: the raw text "
            "never leaves the device, but a curious server reads most of the prompt's tokens "
            "back from the activations, compressed or not. Treat the server as seeing the "
            "prompt; what a split saves is bandwidth and server compute, not confidentiality.")
    return " ".join(parts)


def markdown_report(res: dict[str, Any], accuracy: dict[str, Any] | None = None,
                    accuracy_note: str = "") -> str:
    """privacy.md: the summary paragraph, then one row per (layer, codec)."""
    inv = res["inverters"]
    prov = res.get("provenance", {})
    head = ["split layer", "codec", "bytes/element"] + [
        f"{i} top-1 % [95% CI]" for i in inv] + (["Δacc pts [95% CI]†"] if accuracy else [])
    lines = ["# Prompt recovery by an honest-but-curious server", "",
             summary_paragraph(res), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for L in res["layers"]:
        for lab in res["settings"]:
            e = res["results"][str(L)][lab]
            cells = [str(L), f"`{lab}`", f"{e['bytes_per_element']:.3f}"]
            cells += [_pct(e[i]) for i in inv]
            if accuracy:
                a = accuracy.get(str(L), {}).get(lab)
                if a is None:
                    cells.append("—")
                else:
                    ci = a.get("delta_ci95")
                    cells.append(f"{a['delta']:+.2f}" + (
                        f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""))
            lines.append("| " + " | ".join(cells) + " |")
    ch, ev = res["chance"], res["evaluation"]
    lines += [
        "",
        f"n = {ev['rows']:,} scored tokens (positions 1..{res.get('max_tokens', MAX_TOKENS) - 1} "
        f"of each document) of {ev['documents']} evaluation documents; inverters fitted on "
        f"{res['calibration']['rows']:,} tokens of {res['calibration']['documents']} calibration "
        f"documents ({res['calibration']['distinct_tokens']:,} distinct tokens). Chance (the most "
        f"frequent calibration token, id {ch['token']}): {_pct(ch)}. The MLP predicts over the "
        f"whole vocabulary; {100 * res['mlp_seen']:.1f}% of evaluation tokens occur among those "
        "it was fitted on. Intervals: document bootstrap (10,000 resamples, percentile). "
        "bytes/element: wire bytes of the whole activation per element (float32 = 4).",
    ]
    if accuracy:
        lines.append(f"† {accuracy_note}")
    if prov:
        lines += ["", f"Command: `{prov.get('command', '')}` at commit `{prov.get('commit')}`"
                  + (" (with uncommitted changes)" if prov.get("dirty") else "")
                  + f", wire version {prov.get('wire_version')}."]
    return "\n".join(lines) + "\n"


def plot_recovery(res: dict[str, Any], path: Path) -> Path:
    """Top-1 recovery against split layer: one line per codec per inverter (solid linear, dashed
    MLP), 95% intervals as error bars, chance as a grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    layers = res["layers"]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"linear": ("-", "o"), "mlp": ("--", "s")}
    for ci, lab in enumerate(res["settings"]):
        for inv in res["inverters"]:
            rs = [res["results"][str(L)][lab][inv] for L in layers]
            y = np.array([100 * r["top1"] for r in rs])
            err = np.array([[100 * (r["top1"] - r["ci95"][0]) for r in rs],
                            [100 * (r["ci95"][1] - r["top1"]) for r in rs]])
            ls, mk = styles[inv]
            ax.errorbar(layers, y, yerr=np.clip(err, 0, None), ls=ls, marker=mk, ms=4,
                        capsize=2, color=colours[ci % len(colours)], label=f"{lab} · {inv}")
    ax.axhline(100 * res["chance"]["top1"], color="grey", lw=1, ls=":", label="chance")
    if all(L > 0 for L in layers):
        ax.set_xscale("log", base=2)
    ax.set_xticks(layers, [str(L) for L in layers])
    ax.set_ylim(0, 100)
    ax.set_xlabel("split after layer")
    ax.set_ylabel("top-1 token recovery, % (95% CI, clustered by document)")
    ev = res["evaluation"]
    ax.set_title(f"prompt tokens a server recovers from what it receives "
                 f"(n = {ev['rows']:,} tokens, {ev['documents']} documents)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    prov = res.get("provenance", {})
    if prov:
        fig.text(0.01, 0.005, f"{prov.get('command', '')} @ {str(prov.get('commit'))[:10]}",
                 fontsize=5, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
