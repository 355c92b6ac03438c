"""Per-layer codec measurements and the recommendation (analysis/analyze.py)."""

from __future__ import annotations

import pytest

from fc_edge.analysis.analyze import analyze, markdown_table, plot_all, recommend
from fc_edge.errors import ConfigError


@pytest.fixture(scope="module")
def result(tiny_llama):
    ids = [[(7 * i + j) % 250 + 1 for j in range(24)] for i in range(2)]
    return analyze(tiny_llama, ids, [1, 3], ratios=[2, 8], ratio_codecs=["fourier", "svd"],
                   fixed_codecs=["int8", "rotated"])


def test_measurements(result):
    assert result["layers"] == [1, 3]
    for L in ("1", "3"):
        e = result["per_layer"][L]
        assert 0 < e["token_low_share"] <= 1 and 0 < e["hidden_low_share"] <= 1
        c = e["codecs"]
        assert set(c) == {"fourier[ratio=2]", "fourier[ratio=8]", "svd[ratio=2]",
                          "svd[ratio=8]", "int8", "rotated"}
        # a tighter budget never gives a smaller error for the same codec
        assert c["fourier[ratio=8]"]["rel_error"] >= c["fourier[ratio=2]"]["rel_error"]
        assert c["fourier[ratio=8]"]["byte_ratio"] >= 8 * 0.99
        assert c["int8"]["rel_error"] < 0.02 and c["int8"]["row_wise"]
    assert "fourier[ratio=8]" in markdown_table(result)


def test_recommend(result):
    rec = recommend(result, min_ratio=6)
    assert rec["byte_ratio"] >= 6
    allowed = [c["rel_error"] for e in result["per_layer"].values() for c in e["codecs"].values()
               if c["byte_ratio"] >= 6]
    assert rec["rel_error"] == min(allowed)
    loose = recommend(result, max_error=10.0)
    assert loose["byte_ratio"] == max(c["byte_ratio"] for e in result["per_layer"].values()
                                      for c in e["codecs"].values())
    assert recommend(result, max_error=1e-9) is None
    assert recommend(result, min_ratio=6, row_wise_only=True)["row_wise"]
    with pytest.raises(ConfigError):
        recommend(result)


def test_plots(result, tmp_path):
    import matplotlib.image
    import numpy as np

    paths = plot_all(result, tmp_path)
    assert [p.name for p in paths] == ["spectra.png", "error_vs_ratio.png", "error_vs_layer.png"]
    for p in paths:  # decodes as an image with content (not one flat colour)
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and min(img.shape[:2]) > 100
        assert len(np.unique(img.reshape(-1, img.shape[2]), axis=0)) > 20


def test_rotated_is_measured_bound_like_the_runtime(tiny_llama, result):
    """Oracle: the activations from Hugging Face's own forward (hidden_states[L]) coded by a
    `rotated` codec bound the way DeviceClient binds it (channel_weights of the split)."""
    import torch

    from fc_edge.codecs import get_codec, measure
    from fc_edge.models.split import channel_weights

    ids = [[(7 * i + j) % 250 + 1 for j in range(24)] for i in range(2)]
    for L in (1, 3):
        codec = get_codec("rotated")
        codec.bind(channel_weights(tiny_llama, L))
        errs = []
        for seq in ids:
            with torch.inference_mode():
                x = tiny_llama(torch.tensor([seq]), output_hidden_states=True).hidden_states[L][0]
            errs.append(measure(codec, x).rel_error)
        got = result["per_layer"][str(L)]["codecs"]["rotated"]["rel_error"]
        assert got == pytest.approx(sum(errs) / len(errs), rel=1e-4)
