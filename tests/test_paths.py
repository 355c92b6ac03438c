"""The document split: its parts are disjoint, in order, and cover the file."""

from __future__ import annotations

import pytest

from fc_edge.paths import read_texts, shared_dir, split_documents


def test_split_is_disjoint_and_covers_the_documents():
    docs = [f"doc {i}" for i in range(20)]
    parts = split_documents(docs, evaluation=5, calibration=6)
    assert parts["evaluation"] == docs[:5]
    assert parts["calibration"] == docs[14:]
    assert parts["tuning"] == docs[5:14]
    with pytest.raises(ValueError, match="overlap"):
        split_documents(docs, evaluation=15, calibration=6)


def test_dev_texts_are_distinct_and_split_as_documented():
    docs = read_texts()
    if not docs:
        pytest.skip(f"no texts/dev.txt under {shared_dir()}")
    assert len(set(docs)) == len(docs) == 1736
    parts = split_documents(docs)
    assert [len(parts[k]) for k in ("evaluation", "tuning", "calibration")] == [400, 736, 600]
    assert not set(parts["evaluation"]) & set(parts["calibration"])
