"""Prompt recovery from the received activation (analysis/privacy.py) and the clustered interval
(eval/stats.clustered_proportion_ci), against answers known without the code under test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fc_edge.analysis.privacy import (
    LinearInverter,
    MLPInverter,
    accuracy_deltas,
    markdown_report,
    plot_recovery,
    privacy_analysis,
)
from fc_edge.errors import ConfigError
from fc_edge.eval.stats import clustered_proportion_ci

# ---------------------------------------------------------------- the clustered interval


def _clustered_sample(groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 outcomes in clusters of 5..40 units whose own rates spread widely (strong
    intra-cluster correlation)."""
    rng = np.random.default_rng(seed)
    y, g = [], []
    for k in range(groups):
        size = int(rng.integers(5, 41))
        p = rng.beta(2, 2)
        y += list(rng.random(size) < p)
        g += [k] * size
    return np.asarray(y, dtype=float), np.asarray(g)


def test_clustered_ci_agrees_with_the_cluster_robust_normal_interval():
    """The mean is an OLS intercept; statsmodels' cluster-robust (sandwich) standard error of it
    gives a normal interval that a cluster bootstrap must approach with 200 clusters."""
    import statsmodels.api as sm

    y, g = _clustered_sample(200, 1)
    fit = sm.OLS(y, np.ones((len(y), 1))).fit(cov_type="cluster", cov_kwds={"groups": g})
    lo_ref, hi_ref = fit.conf_int(0.05)[0]
    lo, hi = clustered_proportion_ci(y, g)
    width = hi_ref - lo_ref
    assert abs(lo - lo_ref) < 0.1 * width and abs(hi - hi_ref) < 0.1 * width
    assert lo < y.mean() < hi
    # and it is clearly wider than the interval that treats every unit as independent
    from statsmodels.stats.proportion import proportion_confint

    lo_iid, hi_iid = proportion_confint(int(y.sum()), len(y), method="normal")
    assert hi - lo > 1.5 * (hi_iid - lo_iid)


def test_clustered_ci_of_singletons_is_the_ordinary_interval():
    """With one unit per cluster the bootstrap is the plain one: close to the Wald interval."""
    from statsmodels.stats.proportion import proportion_confint

    rng = np.random.default_rng(3)
    y = (rng.random(2000) < 0.3).astype(float)
    lo, hi = clustered_proportion_ci(y, np.arange(len(y)))
    lo_ref, hi_ref = proportion_confint(int(y.sum()), len(y), method="normal")
    assert lo == pytest.approx(lo_ref, abs=0.004) and hi == pytest.approx(hi_ref, abs=0.004)


def test_clustered_ci_edge_cases():
    assert clustered_proportion_ci([1, 1, 1, 1], ["a", "a", "b", "c"]) == (1.0, 1.0)
    assert clustered_proportion_ci([0, 0, 0], [1, 2, 2]) == (0.0, 0.0)
    assert all(np.isnan(clustered_proportion_ci([], [])))
    with pytest.raises(ValueError):
        clustered_proportion_ci([1, 0], [0])
    with pytest.raises(ValueError):
        clustered_proportion_ci([1, 0, 1], [0, 0, 0])


# ---------------------------------------------------------------- the inverters


class _Zeros:
    """A 'codec' that destroys everything: the server receives zeros."""

    label = "zeros"

    def bind(self, model, layer):
        pass

    def send(self, x):
        return torch.zeros_like(x), 0, False


def _docs(n: int, length: int, seed: int, vocab: range) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = vocab.start, vocab.stop
    return [torch.randint(lo, hi, (length,), generator=g).tolist() for _ in range(n)]


def test_linear_inverter_inverts_the_embedding_exactly(tiny_llama):
    """Layer 0 sends the input embedding itself: least squares finds the identity and the
    nearest embedding by cosine is the token's own (distinct random embeddings)."""
    emb = tiny_llama.get_input_embeddings().weight.detach()
    fit, held = _docs(20, 24, 0, range(1, 256)), _docs(10, 24, 1, range(1, 256))
    res = privacy_analysis(tiny_llama, fit, held, [0], [_Zeros()], inverters=["linear"])
    assert res["results"]["0"]["zeros"]["linear"]["top1"] <= res["chance"]["top1"] + 1e-12
    from fc_edge.eval.settings import build_settings

    res = privacy_analysis(tiny_llama, fit, held, [0], build_settings("none"),
                           inverters=["linear"])
    r = res["results"]["0"]["none"]["linear"]
    assert r["top1"] == 1.0 and r["rows"] == 10 * 23 and r["documents"] == 10
    # the same directly: rows that are embeddings plus a constant offset
    tok = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(2))
    inv = LinearInverter(emb).fit(emb[tok] * 3 + 1, tok)
    assert (inv.predict(emb[tok] * 3 + 1) == tok).all()


def test_inverters_after_a_layer_and_through_a_codec(tiny_llama):
    """After a (random) layer the activation still carries the token (the residual stream):
    both inverters beat chance (~1/40) by far; every number is in range and the report
    renders."""
    from fc_edge.eval.settings import build_settings

    fit, held = _docs(40, 32, 4, range(1, 41)), _docs(12, 32, 5, range(1, 41))
    res = privacy_analysis(tiny_llama, fit, held, [1, 3], build_settings("none,int8"),
                           hidden=128, epochs=30)
    assert res["evaluation"] == {"documents": 12, "rows": 12 * 31}
    assert res["mlp_seen"] == 1.0  # every one of the 40 tokens occurs in 1,240 fitting rows
    for L in ("1", "3"):
        for lab in ("none", "int8"):
            e = res["results"][L][lab]
            for inv in ("linear", "mlp"):
                lo, hi = e[inv]["ci95"]
                assert lo <= e[inv]["top1"] <= hi
                assert e[inv]["top1"] > 5 * res["chance"]["top1"]
            # int8 keeps the activation to ~1%: it hides next to nothing more than float32
            assert abs(e["linear"]["top1"] - res["results"][L]["none"]["linear"]["top1"]) < 0.05
            assert e["bytes_per_element"] == (4.0 if lab == "none" else
                                              pytest.approx(1.0, abs=0.2))
    md = markdown_report(res)
    assert "| 3 | `int8` |" in md and "Chance" in md


def test_mlp_inverter_on_zeros_is_chance():
    """With nothing in the input the cross-entropy optimum is the token frequencies, so the
    MLP names the most frequent fitted token for every row: exactly the chance baseline."""
    g = torch.Generator().manual_seed(0)
    tok = torch.where(torch.rand(2000, generator=g) < 0.4, 7,
                      torch.randint(0, 50, (2000,), generator=g))
    mlp = MLPInverter(hidden=32, epochs=5, seed=0).fit(torch.zeros(2000, 16), tok)
    assert (mlp.predict(torch.zeros(300, 16)) == 7).all()


def test_mlp_inverter_learns_separable_tokens():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(30, 16, generator=g)
    tok = torch.randint(0, 30, (3000,), generator=g)
    x = centres[tok] + 0.05 * torch.randn(3000, 16, generator=g)
    mlp = MLPInverter(hidden=64, epochs=10, seed=0).fit(x[:2000], tok[:2000])
    assert (mlp.predict(x[2000:]) == tok[2000:]).float().mean() > 0.98


def test_mlp_with_the_embedding_head_names_tokens_it_never_saw(tiny_llama):
    """Fitted on the embeddings of tokens 0..127 only: with the embedding matrix as its head it
    names most of tokens 128..255 (chance 1/256); a free head over the fitted tokens cannot
    name any of them."""
    emb = tiny_llama.get_input_embeddings().weight.detach()
    tok = torch.randint(0, 128, (3000,), generator=torch.Generator().manual_seed(0))
    unseen = torch.arange(128, 256)
    tied = MLPInverter(hidden=64, epochs=10, seed=0, embedding=emb).fit(emb[tok], tok)
    assert (tied.predict(emb[tok]) == tok).all()
    assert (tied.predict(emb[unseen]) == unseen).float().mean() > 0.5
    free = MLPInverter(hidden=64, epochs=10, seed=0).fit(emb[tok], tok)
    assert (free.predict(emb[unseen]) < 128).all()


def test_too_few_documents_and_unknown_inverter(tiny_llama):
    one, two = _docs(1, 8, 0, range(256)), _docs(2, 8, 1, range(256))
    with pytest.raises(ConfigError, match="at least 2"):
        privacy_analysis(tiny_llama, one, two, [1], [_Zeros()])
    with pytest.raises(ConfigError, match="unknown inverter"):
        privacy_analysis(tiny_llama, two, two, [1], [_Zeros()], inverters=["knn"])


# ---------------------------------------------------------------- outputs


def test_accuracy_deltas_and_plot(tmp_path):
    run = {"kind": "accuracy", "results": {"1": {
        "none": {"codec": "none"}, "int8": {"delta": -0.25, "delta_ci95": [-0.5, 0.0]}}}}
    (tmp_path / "one.json").write_text(json.dumps(run))
    (tmp_path / "many.json").write_text(json.dumps({"a": run, "b": {"kind": "perplexity"}}))
    for name in ("one.json", "many.json"):
        d = accuracy_deltas(tmp_path / name)
        assert d["1"]["int8"] == {"delta": -0.25, "delta_ci95": [-0.5, 0.0]}
        assert d["1"]["none"]["delta"] == 0.0
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError):
        accuracy_deltas(tmp_path / "bad.json")
    with pytest.raises(ConfigError):
        accuracy_deltas(tmp_path / "many.json".replace("many", "absent"))

    import matplotlib.image

    r = {"top1": 0.5, "ci95": [0.4, 0.6], "rows": 10, "documents": 2}
    res = {"layers": [1, 2], "settings": ["none"], "inverters": ["linear", "mlp"],
           "chance": {"token": 1, **r, "top1": 0.05},
           "evaluation": {"documents": 2, "rows": 10},
           "results": {L: {"none": {"linear": r, "mlp": r}} for L in ("1", "2")}}
    img = matplotlib.image.imread(plot_recovery(res, tmp_path / "p.png"))
    assert img.ndim == 3 and len(np.unique(img.reshape(-1, img.shape[2]), axis=0)) > 10


# ---------------------------------------------------------------- CLI errors


def _one_line_error(capsys, argv: list[str]) -> str:
    from fc_edge.cli import main

    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("Loading weights")]  # transformers' own loading bar
    assert len(err) == 1 and err[0].startswith("fc-edge analyze: error:"), err
    return err[0]


def test_cli_errors(capsys, tmp_path):
    base = ["analyze", "--privacy", "--out-dir", str(tmp_path)]
    assert "unknown codec 'nope'" in _one_line_error(capsys, [*base, "--codecs", "none,nope"])
    assert "--max-docs" in _one_line_error(capsys, [*base, "--max-docs", "1"])
    few = tmp_path / "few.txt"
    few.write_text("one document\nanother\n")
    assert "without overlap" in _one_line_error(capsys, [*base, "--texts", str(few)])
    assert "--accuracy" in _one_line_error(
        capsys, [*base, "--accuracy", str(tmp_path / "absent.json")])


def test_cli_layer_out_of_range(capsys, tmp_path, smollm2):
    msg = _one_line_error(capsys, ["analyze", "--privacy", "--layers", "1,30",
                                   "--out-dir", str(tmp_path)])
    assert "split layer must be in 1..29" in msg


def test_cli_from_json_adds_accuracy_without_a_model_run(capsys, tmp_path):
    """``--from-json`` re-renders an earlier run with a (newer) accuracy file: the recovery
    figures are the JSON's own, the Δacc column the accuracy file's, both as hand-written."""
    from fc_edge.cli import main

    r = {"top1": 0.5, "ci95": [0.4, 0.6], "rows": 10, "documents": 2}
    res = {"layers": [1], "settings": ["none", "int8"], "inverters": ["linear", "mlp"],
           "chance": {"token": 1, **r, "top1": 0.05},
           "evaluation": {"documents": 2, "rows": 10}, "mlp_seen": 0.75,
           "calibration": {"documents": 2, "rows": 9, "distinct_tokens": 4},
           "results": {"1": {s: {"bytes_per_element": 1.0,
                                 "linear": {**r, "top1": 0.875, "ci95": [0.8125, 0.9375]},
                                 "mlp": r} for s in ("none", "int8")}}}
    (tmp_path / "old.json").write_text(json.dumps(res))
    acc = {"kind": "accuracy", "results": {"1": {
        "none": {"codec": "none"}, "int8": {"delta": -0.25, "delta_ci95": [-0.5, 0.125]}}}}
    (tmp_path / "acc.json").write_text(json.dumps(acc))
    out = tmp_path / "out"
    assert main(["analyze", "--privacy", "--from-json", str(tmp_path / "old.json"),
                 "--accuracy", str(tmp_path / "acc.json"), "--out-dir", str(out)]) == 0
    md = (out / "privacy.md").read_text()
    row = next(line for line in md.splitlines() if "`int8`" in line)
    assert "87.5 [81.2, 93.8]" in row or "87.5 [81.3, 93.8]" in row
    assert "-0.25 [-0.50, +0.12]" in row or "-0.25 [-0.50, +0.13]" in row
    assert json.loads((out / "privacy.json").read_text())["accuracy"]["delta"]["1"]["int8"][
        "delta"] == -0.25
    capsys.readouterr()
    for bad in ("[1, 2]", json.dumps({"results": {}, "layers": [1]})):
        (tmp_path / "bad.json").write_text(bad)
        assert "--from-json" in _one_line_error(
            capsys, ["analyze", "--privacy", "--from-json", str(tmp_path / "bad.json"),
                     "--out-dir", str(out)])
