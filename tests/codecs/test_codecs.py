"""Properties every codec must have: budgets, dtype/shape/device, determinism, monotone error."""

from __future__ import annotations

import pytest
import torch

from fc_edge import wire
from fc_edge.codecs import available_codecs, get_codec, measure, roundtrip
from fc_edge.errors import BudgetError, ConfigError

RATIO_CODECS = ["fourier", "topk", "svd", "qr", "quant"]
ALL = [
    ("identity", {}),
    ("fourier", {"ratio": 4}),
    ("topk", {"ratio": 4}),
    ("svd", {"ratio": 2}),
    ("qr", {"ratio": 2}),
    ("fp16", {}),
    ("bf16", {}),
    ("int8", {}),
    ("int8-block", {"group_size": 16}),
    ("quant", {"bits": 3, "group_size": 8}),
    ("rotated", {}),
    ("rotated", {"transform": "hadamard", "keep": 40}),
    ("rotated", {"quantizer": "absmax", "entropy": "none", "bits": 5}),
    ("rotated", {"quantizer": "absmax", "group_size": 16}),
]
SHAPES = [(1, 64), (1, 65), (17, 64), (16, 63), (2, 9, 48)]


def smallest_payload(name: str, x: torch.Tensor) -> int:
    """Bytes of the smallest payload a codec can produce for x (its cheapest setting)."""
    from fc_edge.codecs import codec_class
    from fc_edge.codecs.base import header_bytes
    from fc_edge.codecs.quant import packed_nbytes

    B = x.shape[0] if x.dim() == 3 else 1
    S, D = x.shape[-2:]
    head = header_bytes(
        codec_class(name), tuple(x.shape), {n: 0 for n, _ in codec_class(name).wire_params}, 0
    )
    idx = 1 if S * D <= 256 else 2 if S * D <= 65536 else 4
    body = {
        "fourier": B * (2 * 2 + 4),  # one complex float16 coefficient + scale per item
        "topk": B * (2 + idx),
        "svd": B * 2 * (S + D),
        "qr": B * 2 * (S + D),
        "quant": packed_nbytes(x.numel(), 2) + 2 * (x.numel() // D),  # 2-bit, per-row scales
        "rotated": 0,
    }[name]
    if name == "rotated":  # coarsest uniform step: the Huffman-coded rows + RMS scales
        from fc_edge.codecs import entropy

        rows = x.float().reshape(-1, D)
        sym, _ = entropy.quantize(rows, 0)
        n = rows.shape[0]
        body = int(entropy.row_bytes(sym, 0).sum()) + 2 * n + 2 * (n - 1)
    return head + body


def smooth(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).cumsum(-2) + 0.3 * torch.randn(shape, generator=g)


@pytest.mark.parametrize("ratio", [1.5, 2, 4, 8, 16])
@pytest.mark.parametrize("shape", SHAPES + [(1, 2048), (128, 2048), (3, 5)])
@pytest.mark.parametrize("name", RATIO_CODECS + ["rotated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ratio_is_a_bound_on_packed_bytes(name, shape, ratio, dtype):
    x = smooth(shape).to(dtype)
    raw = x.numel() * x.element_size()
    try:
        codec = get_codec(name, ratio=ratio)
        _, nbytes = roundtrip(codec, x)
    except BudgetError:
        # a refusal is only allowed when even the cheapest setting cannot fit
        assert smallest_payload(name, x) > raw / ratio
        return
    assert nbytes <= raw / ratio


@pytest.mark.parametrize("name,kw", ALL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shape_dtype_device_and_determinism(name, kw, shape, dtype):
    x = smooth(shape).to(dtype)
    codec = get_codec(name, **kw)
    try:
        first = wire.pack(codec.encode(x))
    except BudgetError:
        # low rank cannot code one row; a 64-value 16-bit row at 4x leaves 32 bytes, less
        # than a header
        assert (name in ("svd", "qr") and shape[-2] == 1) or x.numel() * x.element_size() < 300
        return
    assert wire.pack(codec.encode(x.clone())) == first  # deterministic
    x_hat, _ = roundtrip(codec, x)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype and x_hat.device == x.device
    assert torch.isfinite(x_hat.float()).all()


@pytest.mark.parametrize(
    "name,param,values",
    [
        ("topk", "k", [50, 100, 200, 400, 800]),
        ("svd", "rank", [1, 2, 4, 8, 16]),
        ("qr", "rank", [1, 2, 4, 8, 16]),
        ("quant", "bits", [2, 3, 4, 5, 6, 7, 8]),
        ("rotated", "bits", [2, 3, 4, 5, 6, 7, 8]),
    ],
)
def test_error_falls_as_budget_grows(name, param, values):
    x = smooth((32, 96), seed=3)
    extra = {}
    errs = [measure(get_codec(name, **{param: v}, **extra), x).rel_error for v in values]
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]


def test_fourier_error_falls_with_nested_blocks_and_ratio():
    x = smooth((40, 96), seed=4)
    errs = [measure(get_codec("fourier", k_s=k, k_d=4 * k), x).rel_error for k in (1, 2, 4, 8, 16)]
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), errs
    by_ratio = [
        measure(get_codec("fourier", ratio=r, geometry="energy"), x).rel_error
        for r in (2, 4, 8, 16)
    ]
    assert all(b >= a - 1e-6 for a, b in zip(by_ratio, by_ratio[1:])), by_ratio


def test_svd_is_optimal_low_rank():
    """Eckart-Young: the rank-r error equals the energy of the discarded singular values."""
    x = smooth((20, 30), seed=5)
    s = torch.linalg.svdvals(x.double())
    for r in (1, 3, 7):
        err = measure(get_codec("svd", rank=r, value_dtype="float32"), x).rel_error
        assert err == pytest.approx(
            float(s[r:].square().sum().sqrt() / s.square().sum().sqrt()), rel=1e-4
        )


def test_qr_reconstruction_is_projection_onto_pivot_columns():
    x = smooth((12, 40), seed=6)
    x_hat, _ = roundtrip(get_codec("qr", rank=12, value_dtype="float32"), x)
    assert torch.allclose(x_hat, x, atol=1e-4)  # full rank: exact
    x_hat, _ = roundtrip(get_codec("qr", rank=3, value_dtype="float32"), x)
    resid = x - x_hat
    assert float((resid * x_hat).sum().abs()) <= 1e-3 * float(x.square().sum())


def test_topk_keeps_largest_values_exactly():
    x = torch.randn(8, 16)
    x_hat, _ = roundtrip(get_codec("topk", k=10, value_dtype="float32"), x)
    kept = x_hat != 0
    assert int(kept.sum()) == 10
    assert x[kept].abs().min() >= x[~kept].abs().max()
    assert torch.equal(x_hat[kept], x[kept])


def test_quant_error_bound():
    """Symmetric absmax: each error is at most half a step, plus float16 scale rounding."""
    x = torch.randn(10, 64)
    for bits in (2, 4, 8):
        x_hat, _ = roundtrip(get_codec("quant", bits=bits, group_size=16), x)
        step = x.view(10, 4, 16).abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        err = (x_hat - x).view(10, 4, 16).abs()
        assert (err <= step * 0.5 * 1.01 + 1e-6).all()


def test_rotated_transforms_are_orthonormal():
    from fc_edge.codecs.transform import TRANSFORMS, rotate, unrotate

    x = torch.randn(5, 576)
    for t in TRANSFORMS.values():
        y = rotate(x, t, seed=7)
        assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)
        assert torch.allclose(unrotate(y, t, seed=7), x, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_rotated_default_meets_its_bit_budget(bits):
    for shape in [(1, 576), (64, 576), (1, 2048), (3, 7, 100)]:
        x = smooth(shape)
        _, nbytes = roundtrip(get_codec("rotated", bits=bits), x)
        assert nbytes * 8 <= bits * x.numel()
        assert nbytes * 8 > (bits - 1) * x.numel()  # and uses most of it


def test_rotated_uniform_error_matches_entropy_coded_quantization_theory():
    """Gaussian rows at 4 bits/value (1 row: ~0.4 bit of header): error near 2^-R * 1.2."""
    x = torch.randn(256, 576, generator=torch.Generator().manual_seed(1))
    err = measure(get_codec("rotated"), x).rel_error
    # entropy-coded uniform quantization: SNR ~ 6.02 R - 1.53 dB at rate R ~ 3.95 bits
    assert 0.06 < err < 0.09


def test_rotated_hadamard_signs_come_from_seed():
    x = torch.randn(4, 64)
    a = wire.pack(get_codec("rotated", transform="hadamard", seed=1, bits=5).encode(x))
    b = wire.pack(get_codec("rotated", transform="hadamard", seed=2, bits=5).encode(x))
    assert a != b
    from fc_edge.codecs import decode

    for data in (a, b):  # each decodes with the seed its own header carries
        err = (decode(wire.unpack(data)) - x).norm() / x.norm()
        assert err < 0.2
    wrong = wire.unpack(a)
    wrong.params["seed"] = 2  # decoding with the other seed's signs must not reconstruct
    assert (decode(wrong) - x).norm() / x.norm() > 0.5


def test_registry_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown codec"):
        get_codec("zip")
    with pytest.raises(ConfigError, match="does not take"):
        get_codec("topk", bits=4)
    with pytest.raises(ConfigError):
        get_codec("quant", bits=9)
    with pytest.raises(ConfigError):
        get_codec("identity").encode(torch.zeros(2, 3, 4, 5))
    with pytest.raises(ConfigError):
        get_codec("identity").encode(torch.zeros(3, 4, dtype=torch.int32))
    assert {"fourier", "topk", "svd", "qr", "quant", "rotated", "identity", "int8"} <= set(
        available_codecs()
    )


def test_none_kwargs_fall_back_to_defaults():
    assert get_codec("rotated", bits=None).bits == 4
    assert get_codec("rotated").quantizer == "uniform"
    assert get_codec("int8", group_size=32).group_size == 32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,kw", ALL)
def test_cuda_device_preserved_and_equal_to_cpu(name, kw):
    x = smooth((17, 64))
    codec = get_codec(name, **kw)
    y_cpu, _ = roundtrip(codec, x)
    y_gpu, _ = roundtrip(codec, x.cuda())
    assert y_gpu.device.type == "cuda"
    assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-3 * float(x.abs().max()))


def test_hadamard_signs_follow_splitmix64():
    """The signs a non-Python receiver must derive: splitmix64's published first output for
    seed 0 is 0xE220A8397B1DCDAF (odd, so sign -1)."""
    from fc_edge.codecs.transform import hadamard_signs

    mask = (1 << 64) - 1

    def splitmix64(seed: int, i: int) -> int:
        z = (seed + i * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    assert splitmix64(0, 1) == 0xE220A8397B1DCDAF
    for seed in (0, 1, 12345):
        want = [1 - 2 * (splitmix64(seed, i) & 1) for i in range(1, 65)]
        assert hadamard_signs(64, seed).tolist() == want


def test_rotated_shaping_moves_noise_to_low_weight_channels():
    from fc_edge.codecs.transform import register_channel_weights  # noqa: F401

    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    w = torch.ones(128)
    w[:64] = 4.0  # the first half matters 4x more
    plain, _ = roundtrip(get_codec("rotated", bits=4), x)
    shaped, _ = roundtrip(get_codec("rotated", bits=4).bind(w), x)
    err_p, err_s = (plain - x).square(), (shaped - x).square()
    # the noise is moved from the important half to the other half
    # theory: (16 + 1) / 2 / 16 = 0.53 of the unshaped error at the same rate
    assert err_s[:, :64].mean() < 0.6 * err_p[:, :64].mean()
    assert err_s[:, 64:].mean() > err_p[:, 64:].mean()
    # (the weighted error stays about the same: at a fixed rate both scale with mean(w^2);
    # shaping redistributes the noise, its benefit is measured in docs/results.md)


def test_rotated_shaped_payload_needs_the_same_weights():
    from fc_edge.codecs import decode
    from fc_edge.codecs.transform import _CHANNEL_WEIGHTS
    from fc_edge.errors import WireError

    x = torch.randn(4, 96)
    w = torch.linspace(0.5, 2.0, 96)
    data = wire.pack(get_codec("rotated").bind(w).encode(x))
    assert (decode(wire.unpack(data)) - x).norm() / x.norm() < 0.3  # 96-value rows, ~3.3 bits
    key = wire.unpack(data).params["shaping"]
    saved = _CHANNEL_WEIGHTS.pop(key)
    try:
        with pytest.raises(WireError, match="channel weights"):
            wire.unpack(data)
    finally:
        _CHANNEL_WEIGHTS[key] = saved
    with pytest.raises(ConfigError):
        get_codec("rotated").bind(torch.zeros(96))
    assert get_codec("rotated", shaping="none").bind(w).weights_id == 0


def test_element_ratio_counts_signal_values_only():
    """The paper's ratio: elements / values sent, with indices, scales and headers free."""
    from fc_edge.codecs import element_ratio

    x = smooth((16, 64))
    n = x.numel()
    assert element_ratio(get_codec("identity").encode(x)) == 1
    assert element_ratio(get_codec("topk", k=32).encode(x)) == n / 32
    assert element_ratio(get_codec("svd", rank=2).encode(x)) == n / (2 * (16 + 64))
    # k_s=2 keeps rows 0, 1, 15 (R = 3); k_d=5 columns; real and imaginary parts
    assert element_ratio(get_codec("fourier", k_s=2, k_d=5).encode(x)) == n / (3 * 5 * 2)
    assert element_ratio(get_codec("int8").encode(x)) == 1
    assert element_ratio(get_codec("fp16").encode(x)) == 1
    assert element_ratio(get_codec("rotated", keep=16, bits=8).encode(x)) == 64 / 16
