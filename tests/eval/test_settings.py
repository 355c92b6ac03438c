"""Codec specs of a sweep and sending one activation (fc_edge/eval/settings.py), table merging."""

from __future__ import annotations

import pytest
import torch

from fc_edge.errors import ConfigError
from fc_edge.eval.report import merge_accuracy
from fc_edge.eval.settings import build_settings, parse_spec, split_specs


def test_split_and_parse_specs():
    assert split_specs("none, fourier[k_s=3,k_d=64] ,int8") == ["none", "fourier[k_s=3,k_d=64]",
                                                                "int8"]
    assert parse_spec("rotated[group_size=32,transform=hadamard]") == (
        "rotated", {"group_size": 32, "transform": "hadamard"})
    with pytest.raises(ConfigError):
        parse_spec("fourier[ratio]")


def test_shared_ratio_goes_to_ratio_codecs_only():
    s = build_settings("none,fourier,svd,int8,rotated,fourier[k_s=2,k_d=8]", {"ratio": 8.0})
    assert [x.label for x in s] == ["none", "fourier[ratio=8]", "svd[ratio=8]", "int8",
                                    "rotated", "fourier[k_s=2,k_d=8]"]
    assert s[4].codec.ratio is None  # rotated keeps its bit-cap default
    sweep = build_settings("topk,int8", ratios=[4, 8])
    assert [x.label for x in sweep] == ["topk[ratio=4]", "topk[ratio=8]", "int8"]
    with pytest.raises(ConfigError, match="twice"):
        build_settings("int8,int8")


def test_send_counts_wire_bytes():
    x = torch.randn(1, 64)
    int8 = build_settings("int8")[0]
    x_hat, nbytes, fell_back = int8.send(x)
    assert not fell_back and nbytes < x.numel() * 4 and torch.allclose(x_hat, x, atol=0.05)


def test_merge_accuracy_recomputes_means():
    def part(task, acc):
        metrics = {"n": 2, "acc": acc, "acc_norm": acc, "agreement": 1.0, "agreement_norm": 1.0,
                   "kl": 0.0, "bytes": 10.0, "raw_bytes": 40.0, "byte_ratio": 4.0,
                   "rel_error": 0.0, "sequences": 4, "budget_fallbacks": 0}
        return {"tasks": [task], "timing": {"items": 2, "seconds": 1.0, "tasks": {}},
                "results": {"1": {"none": {"row_wise": True, "tasks": {task: metrics}}}}}

    m = merge_accuracy([part("a", 0.5), part("b", 1.0)])
    assert m["tasks"] == ["a", "b"]
    assert m["results"]["1"]["none"]["mean"]["acc"] == 0.75


def test_spec_values_named_none_reach_the_codec():
    """`shaping=none` must turn shaping off, not fall back to the default `auto`."""
    from fc_edge.eval.settings import build_settings

    (s,) = build_settings("rotated[shaping=none]")
    assert s.codec.shaping == "none"


def test_refused_shape_falls_back_to_fp16_like_the_runtime():
    from fc_edge.eval.settings import FALLBACK
    from fc_edge.runtime.protocol import FALLBACK_CODEC

    assert FALLBACK == FALLBACK_CODEC
    (s,) = build_settings("svd[ratio=8]")
    x = torch.randn(1, 64) * 3
    x_hat, nbytes, fell_back = s.send(x)  # rank 1 of one row costs 65 values > 64 / 8
    assert fell_back
    assert torch.equal(x_hat, x.half().float())  # float16 rounding, not the exact float32
    assert 128 <= nbytes < 64 * 4
