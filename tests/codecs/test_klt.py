"""The calibrated ``klt`` codec and its calibration: the quantizer's error bound in the KLT
domain, rates, the codec context's refusals, prediction, the least-squares and KLT fits against
numpy, the artifact's integrity, and (with the real model) the activations it is fitted on."""

from __future__ import annotations

import importlib.util
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fc_edge.codecs import CodecContext, decode, get_codec, wire
from fc_edge.codecs.calibration import Calibration, fit_rows, gains, load
from fc_edge.errors import BudgetError, ConfigError, WireError


def _module(name: str):
    path = Path(__file__).parent / name
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wire_reference = _module("wire_reference.py")
D, V = 64, 10


def random_calibration(seed: int = 0, D: int = D) -> Calibration:
    """A calibration with random orthonormal bases (QR of a float64 Gaussian), weights and
    decreasing deviations; its digest from its own bytes, as a saved artifact's."""
    import hashlib

    from safetensors.torch import save

    g = torch.Generator().manual_seed(seed)

    def orth():
        return torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0].T.float()

    def log_std():
        return torch.sort(torch.randint(-120, 30, (D,), generator=g), descending=True
                          ).values.to(torch.int32)

    t = {"mean": torch.randn(D, generator=g), "weights": torch.rand(D, generator=g) + 0.5,
         "prefill_basis": orth(), "prefill_log_std": log_std(), "decode_basis": orth(),
         "decode_log_std": log_std(), "predictor_features": torch.randn(D, D, generator=g) / 5,
         "predictor_embedding": torch.randn(D, D, generator=g) / 5,
         "predictor_bias": torch.randn(D, generator=g)}
    digest = hashlib.sha256(save(t, metadata={"format": "fc-edge-klt-1"})).hexdigest()
    return Calibration(**t, digest=digest)


FEATURES = torch.randn(V, D, generator=torch.Generator().manual_seed(7))
EMBEDDING = torch.randn(V, D, generator=torch.Generator().manual_seed(8))


def context(cal: Calibration, tokens=None) -> CodecContext:
    ctx = CodecContext(calibration=cal, features=lambda t: FEATURES[t], embedding=EMBEDDING)
    return ctx if tokens is None else ctx.with_tokens(tokens)


def arrays(cal: Calibration, tokens=None) -> dict:
    out = {k: v.double().numpy() if v.is_floating_point() else v.numpy()
           for k, v in cal.tensors().items()}
    out.update(features=FEATURES.double().numpy(), embedding=EMBEDDING.double().numpy(),
               tokens=tokens)
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 5), st.sampled_from([None, "token"]), st.sampled_from([4.0, 6.0, 10.0]),
       st.integers(0, 10**6))
def test_decoded_coefficients_are_within_half_a_step(rows, mode, bits, seed):
    """In the KLT domain (computed here in float64 from the calibration's tensors) every coded
    component of the reconstruction is within alpha/2 of the input's (or clamped at 10 sd), the
    others are exactly the base's; the second reader decodes the same values."""
    cal = random_calibration(seed % 3)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (rows,), generator=g).tolist() if mode else None
    ctx = context(cal, tokens)
    x = torch.randn(rows, D, generator=g) * 3
    data = wire.pack(get_codec("klt", bits=bits).encode(x, ctx))
    assert len(data) <= math.floor(x.numel() * bits / 8)
    enc = wire.unpack(data, ctx=ctx)
    x_hat = decode(enc, ctx).double()
    _, ref = wire_reference.decode(data, arrays(cal, tokens))
    assert np.allclose(ref, x_hat.numpy(), rtol=0, atol=1e-5 * float(x.abs().max()))
    p = enc.params
    a = arrays(cal, tokens)
    kind = "decode" if p["predict"] else "prefill"
    assert p["predict"] == (1 if tokens else 0)
    P, e = a[f"{kind}_basis"], a[f"{kind}_log_std"]
    if tokens:
        base = (a["features"][tokens] @ a["predictor_features"].T
                + a["embedding"][tokens] @ a["predictor_embedding"].T + a["predictor_bias"])
    else:
        base = a["mean"][None]
    gain = gains(enc.tensors["gains"]).double().numpy()[:, None]
    y = ((x.double().numpy() - base) * a["weights"]) @ P.T / gain
    y_hat = ((x_hat.numpy() - base) * a["weights"]) @ P.T / gain
    alpha = 2 ** ((64 - p["step"]) / 16)
    j = e + p["step"] - 64
    coded = j >= -64
    sd_steps = 2.0 ** (j / 16)
    clamped = np.abs(y) > (np.ceil(10 * sd_steps) + 0.5) * alpha
    ok = np.abs(y_hat - y) <= alpha / 2 * (1 + 1e-4) + 1e-5
    assert (ok | clamped)[:, coded].all()
    assert np.abs(y_hat[:, ~coded]).max(initial=0) < 1e-4 * (1 + np.abs(y).max())


def test_rate_control_and_fixed_step():
    cal = random_calibration(1)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(2)) * 2
    ctx = context(cal)
    sizes = []
    for bits in (1.5, 3.0, 6.0, 12.0):
        data = wire.pack(get_codec("klt", bits=bits).encode(x, ctx))
        assert len(data) <= math.floor(x.numel() * bits / 8)
        sizes.append(len(data))
    assert sizes == sorted(sizes)
    enc = get_codec("klt", bits=32, step=70).encode(x, ctx)
    assert enc.params["step"] == 70  # fits: kept as asked
    capped = get_codec("klt", bits=1.5, step=200).encode(x, ctx)
    assert capped.params["step"] < 200  # past the cap: the finest step that fits
    with pytest.raises(BudgetError):
        get_codec("klt", bits=0.1).encode(x, ctx)
    with pytest.raises(ConfigError):
        get_codec("klt", step=300)


def test_the_context_decides_what_a_receiver_accepts():
    cal, other = random_calibration(0), random_calibration(1)
    x = torch.randn(2, D)
    codec = get_codec("klt", bits=4)
    with pytest.raises(ConfigError, match="calibration"):
        codec.encode(x)  # nothing bound: no artifact
    data = wire.pack(codec.encode(x, context(cal)))
    for ctx, what in ((None, "calibration"), (CodecContext(), "calibration"),
                      (context(other), "calibration")):
        with pytest.raises(WireError, match=what):
            wire.unpack(data, ctx=ctx)
    token = wire.pack(codec.encode(x, context(cal, [1, 2])))
    with pytest.raises(WireError, match="tokens"):
        wire.unpack(token, ctx=context(cal))  # a prefill's receiver has no tokens
    with pytest.raises(WireError, match="2 rows"):
        wire.unpack(token, ctx=context(cal, [1, 2, 3]))
    with pytest.raises(WireError, match="out of range"):
        wire.unpack(token, ctx=context(cal, [1, V]))
    with pytest.raises(ConfigError, match="tokens"):
        get_codec("klt", predict="token").encode(x, context(cal))
    # a codec bound to a context encodes with it; rows of the wrong width are refused
    assert get_codec("klt").bind(context(cal)).encode(x).params["calibration"] == cal.wire_id
    with pytest.raises(ConfigError, match="rows of"):
        get_codec("klt").encode(torch.randn(2, D + 1), context(cal))


def test_prediction_codes_only_what_the_token_does_not_say():
    """Rows that are their token's prediction plus small noise: at the same bits, coding
    against the prediction is far more accurate than coding against the means."""
    cal = random_calibration(2)
    tokens = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(3))
    pred = (FEATURES[tokens] @ cal.predictor_features.T
            + EMBEDDING[tokens] @ cal.predictor_embedding.T + cal.predictor_bias)
    x = pred + 0.01 * torch.randn(40, D, generator=torch.Generator().manual_seed(4))
    errs = {}
    for toks in (None, tokens):
        ctx = context(cal, toks)
        data = wire.pack(get_codec("klt", bits=2).encode(x, ctx))
        errs[toks is None] = float((decode(wire.unpack(data, ctx=ctx), ctx) - x).norm())
    assert errs[False] < 0.1 * errs[True]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mutated_payloads_are_refused_or_decode_to_finite_rows(data):
    cal = random_calibration(0)
    ctx = context(cal, [3, 1, 4])
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    raw = bytearray(wire.pack(get_codec("klt", bits=3).encode(x, ctx))[:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        out = decode(wire.unpack(bytes(raw) + struct.pack("<I", zlib.crc32(raw)), ctx=ctx), ctx)
    except WireError:
        return
    assert bool(torch.isfinite(out).all())


# --- calibration --------------------------------------------------------------------------
def test_fit_recovers_the_predictor_and_the_residual_klt():
    """Rows built as A f + B e + c + noise of a known covariance: the fit finds A, B and c
    (least squares; compared with the true ones), and the decode basis diagonalises the
    weighted, gain-normalised residual's covariance with the eigenvalues numpy finds."""
    g = torch.Generator().manual_seed(5)
    N, D_ = 6000, 8
    f, e = torch.randn(N, D_, generator=g), torch.randn(N, D_, generator=g)
    A, B = torch.randn(D_, D_, generator=g), torch.randn(D_, D_, generator=g)
    c = torch.randn(D_, generator=g) * 3
    mix = torch.randn(D_, D_, generator=g) * torch.logspace(0, -2, D_)
    noise = torch.randn(N, D_, generator=g) @ mix.T
    h = f @ A.T + e @ B.T + c + noise
    w = torch.rand(D_, generator=g) + 0.5
    cal = fit_rows(h, torch.zeros(N, dtype=torch.long), f, e, w, ridge=1e-9)
    X = np.concatenate([f.double().numpy(), e.double().numpy(), np.ones((N, 1))], 1)
    W = np.linalg.lstsq(X, h.double().numpy(), rcond=None)[0]  # numpy's least squares
    assert np.allclose(cal.predictor_features.numpy(), W[:D_].T, atol=1e-4)
    assert np.allclose(cal.predictor_embedding.numpy(), W[D_: 2 * D_].T, atol=1e-4)
    assert np.allclose(cal.predictor_bias.numpy(), W[2 * D_], atol=1e-4)
    assert torch.allclose(cal.predictor_features, A, atol=0.2)  # and near the truth
    assert torch.allclose(cal.predictor_bias, c, atol=0.2)
    assert torch.allclose(cal.mean, h.mean(0), atol=1e-5)
    # independent: numpy's eigh of the residual's weighted, normalised covariance
    pred = f @ cal.predictor_features.T + e @ cal.predictor_embedding.T + cal.predictor_bias
    gain = gains(torch.round(16 * torch.log2(h.square().mean(1).sqrt())).add(128).clamp(0, 255)
                 .to(torch.uint8))
    r = ((h - pred) * cal.weights / gain[:, None]).double().numpy()
    evals = np.sort(np.linalg.eigvalsh(r.T @ r / N))[::-1]
    sd = 2.0 ** (cal.decode_log_std.numpy() / 16)
    assert np.allclose(sd, np.sqrt(evals), rtol=0.05)  # codes round to 1/16 octave (4.4%)
    y = r @ cal.decode_basis.double().numpy().T
    cov = y.T @ y / N
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-6 * cov.max()
    assert torch.allclose(cal.decode_basis @ cal.decode_basis.T, torch.eye(D_), atol=1e-5)


def test_artifact_is_named_by_its_hash_and_refused_when_damaged(tmp_path):
    import hashlib

    cal = random_calibration(4)
    path = cal.save(tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.name == f"klt-{digest[:16]}.safetensors"
    back = load(path)
    assert back.digest == digest and back.wire_id == (int(digest[:8], 16) & 0x3FFF or 1)
    for k, t in cal.tensors().items():
        assert torch.equal(getattr(back, k), t)
    assert load(path.with_suffix(".json")).digest == digest
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="SHA-256"):
        load(path)
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "missing.safetensors")
    bad = Calibration(**{**cal.tensors(), "prefill_log_std": cal.prefill_log_std.flip(0)})
    p2 = bad.save(tmp_path / "bad")
    with pytest.raises(ConfigError, match="non-increasing"):
        load(p2)


@pytest.fixture(scope="module")
def smollm2():
    from fc_edge.errors import FcEdgeError
    from fc_edge.models.pretrained import load_model

    try:
        return load_model()
    except (ImportError, FcEdgeError) as e:
        pytest.skip(f"SmolLM2 not available: {e}")


def test_calibration_rows_are_the_full_models_hidden_states(smollm2):
    """What calibration fits on is the activation after layer L: Hugging Face's hidden_states[L]
    of the *whole* model (never of a model cut to L layers); the token features are the head
    on one token alone: Hugging Face's forward of that single token."""
    from fc_edge.codecs.calibration import collect, token_features

    model, tok = smollm2
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    for L in (1, 3):
        rows, tokens, _ = collect(model, tok, L, [text], progress=False)
        with torch.inference_mode():
            hs = model(tokens[None], output_hidden_states=True).hidden_states[L][0]
            assert torch.allclose(rows, hs, atol=1e-4)
            f = token_features(model, L)(tokens[:4])
            for i in range(4):
                one = model(tokens[i: i + 1][None], output_hidden_states=True)
                assert torch.allclose(f[i], one.hidden_states[L][0, 0], atol=1e-4)


def test_calibrate_verb_writes_a_loadable_artifact(smollm2, tmp_path, capsys):
    from fc_edge.cli import main
    from fc_edge.paths import read_texts

    docs = read_texts(limit=40)
    if not docs:
        pytest.skip("../shared/texts/dev.txt absent")
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(docs) + "\n")
    assert main(["calibrate", "--texts", str(texts), "--max-tokens", "96", "--out",
                 str(tmp_path / "out"), "--no-progress", "--threads", "1"]) == 0
    (path,) = (tmp_path / "out").glob("klt-*.safetensors")
    cal = load(path)
    assert cal.hidden_size == 576 and cal.meta["layer"] == 1
    assert cal.meta["energy_after_prediction"] < 0.5 * cal.meta["energy_after_mean"]
    assert path.name in capsys.readouterr().out
    assert main(["calibrate", "--texts", str(tmp_path / "nope.txt"), "--out",
                 str(tmp_path)]) != 0  # one line, no traceback
