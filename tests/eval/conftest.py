"""Fixtures of the eval tests: a character tokenizer and two toy tasks."""

from __future__ import annotations

import json

import pytest


class CharTokenizer:
    """One token per character (ids 1..250; 0 is the end-of-sequence id)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 250 for c in text]}


@pytest.fixture()
def char_tok():
    return CharTokenizer()


@pytest.fixture()
def data_dir(tmp_path):
    (tmp_path / "toy").mkdir()
    recs = [{"id": str(i), "question": f"what is {i}?", "choices": ["one", "two words", "x"],
             "label": i % 3} for i in range(4)]
    (tmp_path / "toy" / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    (tmp_path / "wino").mkdir()
    w = {"id": "w", "sentence": "a _ b", "option1": "p", "option2": "q", "label": 1,
         "context_options": ["a p", "a q"], "continuation": "b c"}
    (tmp_path / "wino" / "dev.jsonl").write_text(json.dumps(w))
    return tmp_path
