"""Calibration: what the ``klt`` codec knows about a model's activation at a split, fitted once.

From the activations of calibration text after decoder layer ``L`` (the output of layer
``L-1``, read by running the model layer by layer, never ``output_hidden_states`` of a cut
model, whose last entry is the final norm's output), :func:`fit` estimates

* ``mean`` ``(D,)``: the channel means (prefill rows are coded as ``h - mean``);
* ``weights`` ``(D,)``: each channel's sensitivity (noise shaping): the downstream RMSNorm gains
  (``rmsnorm``, what ``rotated`` uses) or the square root of the diagonal Fisher information
  of the model's output with respect to the row, times the row's RMS (``fisher``);
* the decode-step predictor ``h ~ A f(t) + B e(t) + c``: ``e(t)`` the token's embedding,
  ``f(t)`` the head run on the token alone (what the row would be without context), a ridge
  least-squares fit; both ends compute it from the token the server sampled;
* for prefill rows (``h - mean``) and decode rows (``h - prediction``): the KLT basis of the
  weighted residual divided by the row's RMS, its components ordered by variance, and each
  component's standard deviation as ``round(16 log2 sigma)`` (an integer, so both ends build
  the same entropy-coding tables).

The artifact is a safetensors file of those tensors plus a JSON file of what made it; it is
named by the SHA-256 of the safetensors bytes (``klt-<first 16 hex>.safetensors``/``.json``),
and a ``klt`` payload names it by 14 bits of that digest.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fc_edge.codecs.context import ChannelWeights, CodecContext
from fc_edge.errors import ConfigError

SENSITIVITIES = ("rmsnorm", "fisher", "none")
#: Per-row gain codes: ``g = 2^((u - 128) / 16)``, u in 0..255.
GAIN_OFFSET, GAIN_STEPS = 128, 16
_TENSORS = ("mean", "weights", "prefill_basis", "prefill_log_std", "decode_basis",
            "decode_log_std", "predictor_features", "predictor_embedding", "predictor_bias")


@dataclass(frozen=True)
class Calibration:
    """A fitted artifact (module docstring). Tensors are float32 on the CPU but the two
    ``*_log_std`` ``(D,)`` int32; ``*_basis`` are ``(D, D)`` orthonormal, rows = components in
    order of decreasing variance; ``predictor_*``: ``h ~ f @ A.T + e @ B.T + c``."""

    mean: torch.Tensor
    weights: torch.Tensor
    prefill_basis: torch.Tensor
    prefill_log_std: torch.Tensor
    decode_basis: torch.Tensor
    decode_log_std: torch.Tensor
    predictor_features: torch.Tensor
    predictor_embedding: torch.Tensor
    predictor_bias: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    digest: str = ""

    @property
    def hidden_size(self) -> int:
        return int(self.mean.numel())

    @property
    def wire_id(self) -> int:
        """14 bits of the digest (1 if those are 0): what a payload names it by."""
        return (int(self.digest[:8], 16) & 0x3FFF) or 1

    @property
    def name(self) -> str:
        return f"klt-{self.digest[:16]}"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).contiguous() for k in _TENSORS}

    def save(self, out_dir: Path) -> Path:
        """Write ``<name>.safetensors`` and ``<name>.json`` into ``out_dir``; returns the first."""
        from safetensors.torch import save

        data = save(self.tensors(), metadata={"format": "fc-edge-klt-1"})
        digest = hashlib.sha256(data).hexdigest()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = f"klt-{digest[:16]}"
        path = out_dir / f"{name}.safetensors"
        path.write_bytes(data)
        (out_dir / f"{name}.json").write_text(
            json.dumps({**self.meta, "sha256": digest, "name": name}, indent=1) + "\n")
        return path


def load(path: Path | str) -> Calibration:
    """Read an artifact (the ``.safetensors`` path, or its ``.json``); checks its digest and
    every tensor's shape, so a damaged or foreign file is a ConfigError, never a wrong decode."""
    from safetensors.torch import load as st_load

    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise ConfigError(f"calibration {str(path)!r}: no such file")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("sha256", digest) != digest:
        raise ConfigError(f"calibration {path.name}: its bytes do not match the SHA-256 its "
                          "JSON names (damaged or edited)")
    try:
        t = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise ConfigError(f"calibration {path.name} is not a safetensors file: {e}") from None
    missing = [k for k in _TENSORS if k not in t]
    if missing:
        raise ConfigError(f"calibration {path.name} lacks {', '.join(missing)}")
    D = t["mean"].numel()
    want = {"mean": (D,), "weights": (D,), "prefill_basis": (D, D), "prefill_log_std": (D,),
            "decode_basis": (D, D), "decode_log_std": (D,), "predictor_features": (D, D),
            "predictor_embedding": (D, D), "predictor_bias": (D,)}
    for k, shape in want.items():
        if tuple(t[k].shape) != shape:
            raise ConfigError(f"calibration {path.name}: {k} has shape {tuple(t[k].shape)}, "
                              f"expected {shape}")
        if t[k].is_floating_point() and not bool(torch.isfinite(t[k]).all()):
            raise ConfigError(f"calibration {path.name}: {k} holds NaN or Inf")
    if bool((t["weights"] <= 0).any()):
        raise ConfigError(f"calibration {path.name}: weights must be positive")
    for k in ("prefill_log_std", "decode_log_std"):
        s = t[k]
        if s.is_floating_point() or bool((s[1:] > s[:-1]).any()):
            raise ConfigError(f"calibration {path.name}: {k} must be integers, non-increasing")
    return Calibration(**{k: (t[k].to(torch.int32) if k.endswith("log_std") else t[k].float())
                          for k in _TENSORS}, meta=meta, digest=digest)


def calibration_texts(path: Path | None = None, limit: int | None = None
                      ) -> tuple[list[str], str]:
    """(documents, where from): ``path`` (one per line), or the calibration documents of the
    shared ``texts/dev.txt`` (:func:`fc_edge.paths.split_documents`)."""
    from fc_edge.paths import read_texts, split_documents

    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"--texts {str(path)!r}: no such file (one document per line)")
        docs, source = read_texts(Path(path)), str(path)
    else:
        docs = read_texts()
        if not docs:
            raise ConfigError("no calibration text: ../shared/texts/dev.txt is absent; give "
                              "--texts FILE")
        docs = split_documents(docs)["calibration"]
        source = "texts/dev.txt calibration documents (the last 600 lines)"
    docs = docs[:limit] if limit else docs
    if not docs:
        raise ConfigError("no calibration documents")
    return docs, source


# --- the model side: token features, the context of a model and split ----------------------
def token_features(model: Any, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(N,) long -> (N, D) float32``: the head (embedding + layers[:layer]) run on each token
    alone at position 0. The head is built on first use (it copies the layers)."""

    def build() -> Any:
        from fc_edge.models.head import Head

        head = Head.from_hf(model, layer)
        head.embed_tokens.weight = model.model.embed_tokens.weight  # share, not copy
        return head

    return head_features(build)


def head_features(head: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`token_features` of a :class:`~fc_edge.models.head.Head` (what a device holds),
    or of a function that builds one on first use."""
    state: dict[str, Any] = {} if callable(head) and not hasattr(head, "empty_kv") \
        else {"head": head}

    @torch.inference_mode()
    def features(tokens: torch.Tensor) -> torch.Tensor:
        if "head" not in state:
            state["head"] = head()
        h = state["head"]
        ids = tokens.reshape(-1, 1).to(h.embed_tokens.weight.device)
        out = []
        for a in range(0, ids.shape[0], 1024):
            chunk = ids[a: a + 1024]
            pk, pv = h.empty_kv(chunk.shape[0], 0)
            x, _, _ = h(chunk, torch.zeros_like(chunk), pk, pv)
            out.append(x[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0, h.hidden_size)

    return features


def check_artifact(cal: Calibration, fingerprint: str, layer: int, hidden_size: int) -> None:
    """ConfigError unless ``cal`` was fitted for this model (its JSON's ``model_fingerprint``,
    when recorded), split ``layer`` (its ``layer``) and hidden size."""
    meta = cal.meta
    if cal.hidden_size != hidden_size:
        raise ConfigError(f"calibration {cal.name} is for hidden size {cal.hidden_size}, the "
                          f"model has {hidden_size}")
    if "layer" in meta and int(meta["layer"]) != layer:
        raise ConfigError(f"calibration {cal.name} was fitted after layer {meta['layer']}, the "
                          f"split is at layer {layer}")
    recorded = meta.get("model_fingerprint")
    if recorded and recorded != fingerprint:
        raise ConfigError(f"calibration {cal.name} was fitted on model {recorded}, this model is "
                          f"{fingerprint}")


def model_context(model: Any, layer: int, calibration: Calibration | None = None
                  ) -> CodecContext:
    """The codec context of ``model`` split after ``layer``: its channel weights, the token
    features and embedding the ``klt`` predictor reads, and ``calibration`` if given. Kept on
    the model object per (layer, calibration), so binding again is free and the token
    predictions cached in it are shared."""
    from fc_edge.models.split import channel_weights

    cache = model.__dict__.setdefault("_fc_edge_codec_contexts", {})
    key = (layer, calibration.digest if calibration is not None else None)
    if key not in cache:
        if calibration is not None and calibration.hidden_size != model.config.hidden_size:
            raise ConfigError(f"calibration {calibration.name} is for hidden size "
                              f"{calibration.hidden_size}, the model has "
                              f"{model.config.hidden_size}")
        cache[key] = CodecContext(
            weights=ChannelWeights.of(channel_weights(model, layer)), calibration=calibration,
            features=token_features(model, layer),
            embedding=model.model.embed_tokens.weight.detach())
    return cache[key]


# --- fitting ------------------------------------------------------------------------------
def gain_codes(rows: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` rows -> ``(N,)`` uint8 codes of their RMS: ``round(16 log2 rms) + 128``."""
    rms = rows.double().square().mean(-1).sqrt().clamp_min(1e-30)
    u = torch.round(GAIN_STEPS * torch.log2(rms)) + GAIN_OFFSET
    return u.clamp(0, 255).to(torch.uint8)


def gains(codes: torch.Tensor) -> torch.Tensor:
    """``(N,)`` uint8 gain codes -> ``(N,)`` float32 gains ``2^((u - 128) / 16)``."""
    return torch.exp2((codes.float() - GAIN_OFFSET) / GAIN_STEPS)


def _klt(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis (D, D) rows by decreasing variance, log-std codes (D,) int32) of rows y (N, D)
    float64, centred at zero (no mean is removed: the coder's symbols are centred at 0)."""
    cov = y.T @ y / y.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    basis = evecs[:, order].T.contiguous()
    sigma = evals[order].clamp_min(1e-30).sqrt()
    codes = torch.round(16 * torch.log2(sigma)).clamp(-4096, 4096).to(torch.int32)
    codes = torch.cummin(codes, 0).values  # non-increasing even where rounding ties
    return basis.float(), codes


def _ridge(X: torch.Tensor, Y: torch.Tensor, lam: float) -> torch.Tensor:
    """Least squares ``Y ~ [X, 1] @ W`` with a ridge of ``lam`` times the mean diagonal."""
    X1 = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    A = X1.T @ X1
    A += lam * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve(A, X1.T @ Y)


def collect(model: Any, tokenizer: Any, layer: int, texts: Sequence[str], max_tokens: int = 512,
            fisher: bool = False, progress: bool = True, seed: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Activations after ``layer`` of every text (first ``max_tokens`` tokens): rows ``(N, D)``
    float32, their tokens ``(N,)`` and, with ``fisher``, each row's squared gradient ``(N, D)``
    of the log-likelihood of tokens sampled from the model's own output (so its mean is the
    Fisher information's diagonal)."""
    from fc_edge.eval.forward import LayerStack

    stack = LayerStack(model)
    stack.check_split(layer)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    rows, toks, grads = [], [], []
    it: Any = texts
    if progress:
        from tqdm import tqdm

        it = tqdm(texts, desc="calibrate", unit="doc", leave=False, dynamic_ncols=True)
    for text in it:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) < 2:
            continue
        ids_t = torch.tensor([ids])
        with torch.no_grad():
            h0, ctx = stack.start(ids_t)
            h = stack.run(h0, ctx, 0, layer)
        rows.append(h[0].float().cpu())
        toks.append(ids_t[0])
        if fisher:
            with torch.enable_grad():
                hl = h.detach().clone().requires_grad_(True)
                logits = stack.logits(stack.run(hl, ctx, layer, stack.num_layers))[0]
                logp = torch.log_softmax(logits.float(), -1)
                sample = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen)
                logp.gather(1, sample.to(logp.device)).sum().backward()
            grads.append(hl.grad[0].float().cpu().square())
    if not rows:
        raise ConfigError("no calibration text has two or more tokens")
    return torch.cat(rows), torch.cat(toks), (torch.cat(grads) if fisher else None)


def fit(model: Any, tokenizer: Any, layer: int, texts: Sequence[str], max_tokens: int = 512,
        sensitivity: str = "rmsnorm", ridge: float = 1e-4, progress: bool = True,
        meta: dict[str, Any] | None = None) -> Calibration:
    """Fit a :class:`Calibration` of ``model`` split after ``layer`` on ``texts``."""
    from fc_edge.models.pretrained import model_fingerprint
    from fc_edge.models.split import channel_weights

    if sensitivity not in SENSITIVITIES:
        raise ConfigError(f"sensitivity must be one of {', '.join(SENSITIVITIES)}, "
                          f"got {sensitivity!r}")
    h, tokens, sq_grads = collect(model, tokenizer, layer, texts, max_tokens,
                                  fisher=sensitivity == "fisher", progress=progress)
    return fit_rows(h, tokens, token_features(model, layer)(tokens),
                    model.model.embed_tokens.weight.detach()[tokens].float(),
                    weights=_weights(sensitivity, h, sq_grads,
                                     lambda: channel_weights(model, layer)),
                    ridge=ridge,
                    meta={"layer": layer, "sensitivity": sensitivity, "rows": int(h.shape[0]),
                          "documents": len(texts), "max_tokens": max_tokens, "ridge": ridge,
                          "model_fingerprint": model_fingerprint(model), **(meta or {})})


def _weights(sensitivity: str, h: torch.Tensor, sq_grads: torch.Tensor | None,
             rmsnorm: Callable[[], torch.Tensor]) -> torch.Tensor:
    D = h.shape[1]
    if sensitivity == "none":
        return torch.ones(D)
    if sensitivity == "rmsnorm":
        w = rmsnorm().float()
    else:
        assert sq_grads is not None
        # the row is coded relative to its RMS, so weigh each row's Fisher by its RMS^2
        rms2 = h.double().square().mean(1, keepdim=True)
        w = (sq_grads.double() * rms2).mean(0).sqrt().float()
    w = w / w.square().mean().sqrt()  # mean square 1: shaping moves noise, not the scale
    return w.clamp_min(1e-3)


def fit_rows(h: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor,
             embeddings: torch.Tensor, weights: torch.Tensor, ridge: float = 1e-4,
             meta: dict[str, Any] | None = None) -> Calibration:
    """The fit itself, from rows ``h`` (N, D), their ``features`` and ``embeddings`` (N, D) and
    the channel ``weights`` (D,). Statistics in float64."""
    N, D = h.shape
    if N < 2 * D + 2:
        raise ConfigError(f"calibration needs at least {2 * D + 2} rows for hidden size {D} "
                          f"(the predictor has {2 * D + 1} inputs); got {N}: give more text")
    hd = h.double()
    w = weights.double()
    g = gains(gain_codes(h)).double()[:, None]
    mean = hd.mean(0)
    prefill_basis, prefill_log_std = _klt((hd - mean) * w / g)
    W = _ridge(torch.cat([features.double(), embeddings.double()], 1), hd, ridge)
    A, B, c = W[:D].T, W[D: 2 * D].T, W[2 * D]
    pred = features.double() @ A.T + embeddings.double() @ B.T + c
    decode_basis, decode_log_std = _klt((hd - pred) * w / g)
    energy = float(hd.square().sum())
    info = {"hidden_size": D,  # shares of the rows' energy left to code, on the fit rows
            "energy_after_mean": round(float((hd - mean).square().sum()) / energy, 6),
            "energy_after_prediction": round(float((hd - pred).square().sum()) / energy, 6),
            **(meta or {})}
    return Calibration(mean.float(), weights.float(), prefill_basis, prefill_log_std,
                       decode_basis, decode_log_std, A.float().contiguous(),
                       B.float().contiguous(), c.float(), meta=info)


def coding_gain_db(log_std: torch.Tensor) -> float:
    """Arithmetic-to-geometric mean ratio of the component variances, in dB (from the codes)."""
    var = torch.exp2(log_std.double() / 8)
    return 10 * math.log10(float(var.mean() / var.log().mean().exp()))
