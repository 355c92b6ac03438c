"""The accuracy path against the Hugging Face model itself (fc_edge/eval/accuracy.py,
multiple_choice.py, summary.py).

Oracles: the full model's logits (uncompressed scores) and a forward hook that applies the codec
to the output of layer L-1 (the definition of "codec at the split").
"""

from __future__ import annotations

import json

import pytest
import torch

from fc_edge.eval.accuracy import evaluate
from fc_edge.eval.perplexity import perplexity
from fc_edge.eval.settings import build_settings
from fc_edge.eval.tasks import encode_item, load_task


def reference_logliks(model, item, tok, hook=None):
    """Summed continuation log-probs from the full Hugging Face forward, one sequence at a time."""
    enc = encode_item(item, lambda s: tok(s)["input_ids"], prefix_id=0)
    out = []
    for seq, start in zip(enc.sequences, enc.starts, strict=True):
        ids = torch.tensor([seq])
        with torch.inference_mode():
            logits = model(ids).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        out.append(float(sum(lp[t - 1, seq[t]] for t in range(start, len(seq)))))
    return out


def test_uncompressed_scores_equal_full_model(char_tok, tiny_llama, data_dir):
    tok = char_tok
    res = evaluate(tiny_llama, tok, ["toy", "wino"], build_settings("none"), [1],
                   data_dir=data_dir, progress=False)
    for task in ("toy", "wino"):
        items = load_task(task, data_dir)
        want_acc = []
        for item in items:
            ll = reference_logliks(tiny_llama, item, tok)
            want_acc.append(float(max(range(len(ll)), key=lambda i: (ll[i], -i)) == item.label))
        got = res["results"]["1"]["none"]["tasks"][task]
        assert got["acc"] == pytest.approx(sum(want_acc) / len(want_acc))
        assert got["agreement"] == 1.0 and got["kl"] == 0.0


def test_codec_at_split_equals_forward_hook(char_tok, tiny_llama, data_dir):
    """Layer-stack path with int8 at L=2 == full forward with the codec hooked on layers[1]."""
    tok = char_tok
    settings = build_settings("none,int8,identity")
    res = evaluate(tiny_llama, tok, ["toy"], settings, [2], data_dir=data_dir, progress=False)
    int8 = settings[1]

    def hook(_module, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        x_hat, _, _ = int8.send(h[0])
        h2 = x_hat[None]
        return (h2, *out[1:]) if isinstance(out, tuple) else h2

    handle = tiny_llama.model.layers[1].register_forward_hook(hook)
    try:
        items = load_task("toy", data_dir)
        ref = [reference_logliks(tiny_llama, it, tok) for it in items]
    finally:
        handle.remove()
    preds = [max(range(len(ll)), key=lambda i: (ll[i], -i)) for ll in ref]
    acc = sum(float(p == it.label) for p, it in zip(preds, items, strict=True)) / len(items)
    r = res["results"]["2"]
    assert r["int8"]["tasks"]["toy"]["acc"] == pytest.approx(acc)
    assert r["int8"]["tasks"]["toy"]["byte_ratio"] > 3.5   # int8 + per-row scales + header
    assert r["identity"]["tasks"]["toy"]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert r["identity"]["tasks"]["toy"]["agreement"] == 1.0


@pytest.mark.parametrize("name,batch_items,batch_tokens",
                         [("tiny_llama", 32, 256), ("tiny_llama", 3, 4), ("sliding_qwen2", 32, 64)])
def test_batched_trees_equal_per_choice_path(char_tok, request, data_dir, name, batch_items,
                                             batch_tokens):
    """Items scored together as packed trees (each shared context once, choices as branches)
    give the per-choice path's log-likelihoods and bytes for row-wise codecs (int8, rotated with
    its per-message rate control, shaped as the runtime binds it), whole-block ones (fourier,
    topk) and a codec that refuses short blocks (svd: the fp16 fallback), at two split layers,
    whatever the batching, also with sliding-window layers."""
    model = request.getfixturevalue(name)
    tok = char_tok
    specs = "none,int8,rotated,fourier[ratio=4],topk[ratio=4],svd[ratio=64]"
    kw = dict(data_dir=data_dir, progress=False, record_items=True)
    fast = evaluate(model, tok, ["toy", "wino"], build_settings(specs), [1, 3],
                    batch_items=batch_items, batch_tokens=batch_tokens, **kw)
    slow = evaluate(model, tok, ["toy", "wino"], build_settings(specs), [1, 3],
                    shared_context=False, **kw)
    assert fast["shared_context"] and not slow["shared_context"]
    for task in ("toy", "wino"):
        for a, b in zip(fast["records"][task], slow["records"][task], strict=True):
            assert a["ref"] == pytest.approx(b["ref"], rel=1e-5, abs=1e-4)
            for key, st in a["s"].items():
                assert st["ll"] == pytest.approx(b["s"][key]["ll"], rel=1e-5, abs=1e-4), key
                assert (st["bytes"], st["fb"]) == (b["s"][key]["bytes"], b["s"][key]["fb"]), key
    assert sum(r["s"]["1:svd[ratio=64]"]["fb"] for r in fast["records"]["toy"]) > 0


def test_records_resume_and_intervals_in_results(char_tok, tiny_llama, data_dir, tmp_path):
    from fc_edge.errors import ConfigError
    from fc_edge.eval import report

    tok = char_tok
    rec = tmp_path / "run" / "items.jsonl"
    first = evaluate(tiny_llama, tok, ["toy"], build_settings("none,int4"), [1],
                     data_dir=data_dir, progress=False, records=rec)
    assert first["timing"]["scored"] == 4
    lines = rec.read_text().splitlines()
    rec.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])  # an interrupted last line
    again = evaluate(tiny_llama, tok, ["toy", "wino"], build_settings("none,int4"), [1],
                     data_dir=data_dir, progress=False, records=rec)
    assert again["timing"]["scored"] == 1 + 1  # the cut toy item and the wino item
    assert all(json.loads(line) for line in rec.read_text().splitlines())  # nothing glued on
    third = evaluate(tiny_llama, tok, ["toy", "wino"], build_settings("none,int4"), [1],
                     data_dir=data_dir, progress=False, records=rec)
    assert third["timing"]["scored"] == 0
    assert again["results"]["1"]["int4"]["tasks"]["toy"] == first["results"]["1"]["int4"][
        "tasks"]["toy"]
    with pytest.raises(ConfigError, match="another run"):
        evaluate(tiny_llama, tok, ["toy"], build_settings("none,int8"), [1], data_dir=data_dir,
                 progress=False, records=rec)
    r = again["results"]["1"]["int4"]
    lo, hi = r["delta_ci95"]
    assert lo <= r["delta"] <= hi and 0.0 <= r["mcnemar_p"] <= 1.0
    assert r["stats"]["acc"]["n"] == 5
    table = report.accuracy_markdown(again)
    assert f"{r['delta']:+.1f} [{lo:+.1f}, {hi:+.1f}]" in table
    a_lo, a_hi = r["agreement_ci95"]  # the agreement shown is the one its interval is about
    assert f"{100 * r['stats']['acc']['agreement']:.1f} [{a_lo:.1f}, {a_hi:.1f}]" in table
    report.plot_delta(report.delta_points(again), tmp_path / "delta.png", "Δ", goal=-0.5)
    assert (tmp_path / "delta.png").is_file()


@pytest.mark.cuda  # tools/gpu_check.sh runs `pytest -m "cuda or cupy"`
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_scores_equal_cpu_scores(char_tok, tiny_llama, data_dir, tmp_path):
    """`fc-edge eval --device cuda`: the same scores and bytes as on the CPU (float32 on both),
    for the batched trees, the per-choice path and per-token perplexity."""
    import copy

    tok = char_tok
    gpu = copy.deepcopy(tiny_llama).to("cuda")
    specs = "none,int8,rotated,fourier[ratio=4]"
    for kw in ({}, {"shared_context": False}):
        a = evaluate(tiny_llama, tok, ["toy", "wino"], build_settings(specs), [1],
                     data_dir=data_dir, progress=False, **kw)
        b = evaluate(gpu, tok, ["toy", "wino"], build_settings(specs), [1],
                     data_dir=data_dir, progress=False, **kw)
        for task, recs in a["records"].items():
            for ra, rb in zip(recs, b["records"][task], strict=True):
                assert ra["ref"] == pytest.approx(rb["ref"], abs=1e-3)
                for key, st in ra["s"].items():
                    assert st["ll"] == pytest.approx(rb["s"][key]["ll"], abs=1e-2), key
    path = tmp_path / "docs.txt"
    path.write_text("hello world, hello split\n")
    a = perplexity(tiny_llama, tok, path, build_settings("none,int8"), [1], progress=False,
                   per_token=True)
    b = perplexity(gpu, tok, path, build_settings("none,int8"), [1], progress=False,
                   per_token=True)
    assert a["reference_ppl"] == pytest.approx(b["reference_ppl"], rel=1e-4)
    assert a["results"]["1"]["int8"]["bytes"] == b["results"]["1"]["int8"]["bytes"]


def test_reused_settings_equal_a_fresh_run(char_tok, tiny_llama, data_dir, tmp_path):
    """--reuse: the reused settings (and the uncompressed reference with `none`) come from the
    earlier records as they are, the others are scored now; the result equals a run that
    scores everything. The results say what made them (provenance, sessions)."""
    from fc_edge.codecs import wire
    from fc_edge.errors import ConfigError

    specs = "none,int8,int4"
    kw = dict(data_dir=data_dir, progress=False)
    full = evaluate(tiny_llama, char_tok, ["toy", "wino"], build_settings(specs), [1],
                    records=tmp_path / "a.jsonl", **kw)
    part = evaluate(tiny_llama, char_tok, ["toy", "wino"], build_settings(specs), [1],
                    records=tmp_path / "b.jsonl", reuse=tmp_path / "a.jsonl",
                    reuse_settings=["none", "int4"], **kw)
    assert part["results"] == full["results"]
    prov = part["provenance"]
    assert prov["wire_version"] == wire.VERSION and set(prov["data"]) == {"toy/dev.jsonl",
                                                                         "wino/dev.jsonl"}
    assert prov["reused"]["settings"] == ["none", "int4"]
    assert [s["items"] for s in part["sessions"]] == [5]
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()[2:]]
    b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()[2:]]
    assert [r["s"]["1:int4"] for r in a] == [r["s"]["1:int4"] for r in b]
    with pytest.raises(ConfigError, match="no record of toy item 4"):
        evaluate(tiny_llama, char_tok, ["toy"], build_settings(specs), [1],
                 reuse=tmp_path / "a.jsonl", reuse_settings=["none"],
                 data_dir=_with_more_items(data_dir), progress=False)
    with pytest.raises(ConfigError, match="not among --codecs"):
        evaluate(tiny_llama, char_tok, ["toy"], build_settings("none,int8"), [1],
                 reuse=tmp_path / "a.jsonl", reuse_settings=["rotated"], **kw)


def _with_more_items(data_dir):
    recs = [{"id": str(i), "question": f"what is {i}?", "choices": ["one", "two words", "x"],
             "label": i % 3} for i in range(5)]
    (data_dir / "toy" / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    return data_dir


def test_acc_norm_table_agreement_is_acc_norms():
    """The acc_norm table's agreement column compares the acc_norm choices (it used to show
    acc's). By hand: choice lengths 1 and 10 characters; the reference's log-likelihoods
    (-1, -2) pick choice 0 by acc and 1 by acc_norm (-1 < -0.2); the codec's (-1, -20) pick 0
    by both (-1 > -2): acc agrees, acc_norm does not."""
    from fc_edge.eval import report
    from fc_edge.eval.summary import summarize

    raw = {"bytes": 8, "raw": 8, "err": 0.0, "seqs": 2, "fb": 0}
    rec = {"chars": [1, 10], "label": 0, "ref": [-1.0, -2.0],
           "s": {"1:none": {"ll": [-1.0, -2.0], **raw}, "1:int8": {"ll": [-1.0, -20.0], **raw}}}
    settings = build_settings("none,int8")
    res = {"tasks": ["t"], "results": summarize({"t": [rec, rec]}, [1], settings)}
    acc = [r for r in report.accuracy_rows(res, "acc") if r["codec"] == "int8"][0]
    norm = [r for r in report.accuracy_rows(res, "acc_norm") if r["codec"] == "int8"][0]
    assert acc["agreement"] == 100.0 and norm["agreement"] == 0.0
    assert norm["mean"] == 100.0 and norm["delta"] == 100.0
