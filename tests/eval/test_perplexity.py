"""The perplexity path against the Hugging Face model itself (fc_edge/eval/perplexity.py).

Oracle: the full model's logits; int8 codes rows on their own, so its per-token and per-document
messages must give the same scores.
"""

from __future__ import annotations

import math

import pytest
import torch

from fc_edge.eval.perplexity import perplexity
from fc_edge.eval.settings import build_settings


def test_perplexity_equals_full_model(char_tok, tiny_llama, tmp_path):
    tok = char_tok
    path = tmp_path / "docs.txt"
    path.write_text("hello world\n\nsplit inference is fun\nx\n")
    res = perplexity(tiny_llama, tok, path, build_settings("none,fourier[ratio=4],identity"), [1],
                     max_tokens=8, progress=False)
    nll, n = 0.0, 0
    for doc in ("hello world", "split inference is fun"):
        ids = torch.tensor([tok(doc)["input_ids"][:8]])
        with torch.inference_mode():
            lp = torch.log_softmax(tiny_llama(ids).logits[0, :-1].double(), -1)
        nll -= float(lp.gather(1, ids[0, 1:, None]).sum())
        n += ids.shape[1] - 1
    assert res["documents"] == 2 and res["tokens"] == n
    assert res["reference_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    r = res["results"]["1"]
    assert r["identity"]["ppl"] == pytest.approx(res["reference_ppl"], rel=1e-6)
    assert r["identity"]["agreement"] == 1.0
    assert r["fourier[ratio=4]"]["row_wise"] is False and r["none"]["row_wise"] is True


def test_per_token_messages(char_tok, tiny_llama, tmp_path):
    """int8 codes each row on its own, so one message per token equals one per document; the
    bytes are then per token."""
    tok = char_tok
    path = tmp_path / "docs.txt"
    path.write_text("hello world, hello split\n")
    settings = build_settings("none,int8")
    block = perplexity(tiny_llama, tok, path, settings, [1], progress=False)
    rows = perplexity(tiny_llama, tok, path, settings, [1], progress=False, per_token=True)
    assert rows["per_token"] and not block["per_token"]
    ppl_rows, ppl_block = rows["results"]["1"]["int8"]["ppl"], block["results"]["1"]["int8"]["ppl"]
    assert ppl_rows == pytest.approx(ppl_block)
    S = len(tok("hello world, hello split")["input_ids"])
    assert rows["results"]["1"]["int8"]["bytes"] < block["results"]["1"]["int8"]["bytes"] / S * 1.5
    assert rows["results"]["1"]["int8"]["raw_bytes"] == 64 * 4




def test_documents_by_part_of_the_split(tmp_path):
    """--documents names a part of fc_edge.paths.split_documents: the evaluation documents are
    the first 400 lines, calibration the last 600; a file too short for the split is a
    ConfigError."""
    from fc_edge.errors import ConfigError
    from fc_edge.eval.perplexity import read_documents

    path = tmp_path / "texts.txt"
    path.write_text("".join(f"document {i}\n\n" for i in range(1100)))
    assert read_documents(path, "evaluation") == [f"document {i}" for i in range(400)]
    assert read_documents(path, "calibration")[0] == "document 500"
    assert read_documents(path, "evaluation", limit=3) == ["document 0", "document 1",
                                                            "document 2"]
    assert len(read_documents(path)) == 1100
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    with pytest.raises(ConfigError, match="--documents evaluation"):
        read_documents(short, "evaluation")


def test_copies_of_a_text_are_one_cluster(char_tok, tiny_llama, tmp_path):
    """Repeated texts count once in the document bootstrap (the interval equals the one over
    the distinct texts with each text's sums); records keep each document's text digest."""
    from fc_edge.eval import stats

    path = tmp_path / "docs.txt"
    texts = ["hello world", "split inference", "a third text here", "the fourth one"]
    path.write_text("\n".join(texts + texts[:2]) + "\n")
    res = perplexity(tiny_llama, char_tok, path, build_settings("none,int4"), [1],
                     progress=False)
    assert res["documents"] == 6 and res["distinct_texts"] == 4
    r = res["results"]["1"]["int4"]
    nll, ref, tok = r["doc_nll"], res["doc_ref_nll"], res["doc_tokens"]
    merged = [[v[i] + (v[i + 4] if i < 2 else 0) for i in range(4)] for v in (ref, nll, tok)]
    want = [100 * v for v in stats.delta_ppl_ci(*merged)]
    assert r["delta_ci95"] == pytest.approx(want, abs=1e-9)
