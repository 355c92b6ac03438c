"""Records -> scoring requests, lm-evaluation-harness tokenization (fc_edge/eval/tasks.py)."""

from __future__ import annotations

import json

import pytest

from fc_edge.errors import ConfigError
from fc_edge.eval.tasks import TASKS, default_data_dir, encode_item, item_from_record, load_task


def words(text: str) -> list[int]:
    """A toy tokenizer: one id per character (ids < 256)."""
    return [ord(c) % 256 for c in text]


def test_piqa_prompt_and_continuations():
    rec = {"id": "p", "question": "How to x?\n", "choices": ["a b", "cd"], "label": 1}
    item = item_from_record("piqa", rec)
    assert item.contexts == ("Question: How to x?\nAnswer:",) * 2
    assert item.continuations == (" a b", " cd")
    assert item.label == 1


def test_winogrande_partial_scoring():
    rec = {"id": "w", "sentence": "A beat B so _ won.", "option1": "A", "option2": "B",
           "label": 0, "context_options": ["A beat B so A", "A beat B so B"],
           "continuation": "won."}
    item = item_from_record("winogrande", rec)
    assert item.contexts == ("A beat B so A", "A beat B so B")
    assert item.continuations == (" won.", " won.")


def test_encode_continuation_tokens_and_characters():
    rec = {"question": "Q", "choices": ["yes", "café"], "label": 0}
    item = item_from_record("arc_easy", rec)
    enc = encode_item(item, words)
    ctx = "Question: Q\nAnswer:"
    assert enc.sequences[0] == tuple(words(ctx + " yes"))
    assert enc.starts == (len(ctx), len(ctx))
    # lm-eval's acc_norm divides by len(choice): characters ("café" is 4, not its 5 UTF-8
    # bytes), without the delimiter space
    assert enc.cont_chars == (3, 4)


def test_trailing_context_space_moves_to_continuation():
    # lm-evaluation-harness: "ctx " + "x" is scored as "ctx" + " x"
    from fc_edge.eval.tasks import Item

    item = Item("i", ("ab ", "ab "), ("x", "y"), 0)
    enc = encode_item(item, words)
    assert enc.starts == (2, 2) and enc.sequences[0] == tuple(words("ab x"))


def test_max_len_keeps_continuation():
    from fc_edge.eval.tasks import Item

    item = Item("i", ("abcdefgh",) * 2, (" x", " y"), 0)
    enc = encode_item(item, words, max_len=5)
    assert enc.sequences[0] == tuple(words("fgh x")) and enc.starts[0] == 3


def test_bad_record_is_a_config_error():
    with pytest.raises(ConfigError):
        item_from_record("piqa", {"question": "q", "choices": ["a"], "label": 0})
    with pytest.raises(ConfigError):
        item_from_record("piqa", {"question": "q", "label": 0})


def test_data_dir_and_limit(tmp_path):
    (tmp_path / "mine").mkdir()
    recs = [{"id": str(i), "question": "q", "choices": ["a", "b"], "label": i % 2}
            for i in range(5)]
    (tmp_path / "mine" / "x.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    assert len(load_task("mine", tmp_path, limit=3)) == 3
    with pytest.raises(ConfigError, match="no task folder"):
        load_task("other", tmp_path)


@pytest.mark.skipif(not default_data_dir().is_dir(), reason="../shared/datasets is absent")
@pytest.mark.parametrize("task", TASKS)
def test_shared_tasks_load(task):
    items = load_task(task, limit=5)
    assert len(items) == 5 and all(2 <= it.n_choices <= 8 for it in items)


def test_commonsenseqa_and_logiqa_prompts_are_lm_evals():
    """Oracle: lm-eval 0.4's own task definitions (its YAML template, its Python doc_to_text)."""
    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
    import importlib.resources

    import jinja2
    import yaml
    from lm_eval.tasks.logiqa.utils_logiqa import doc_to_text

    q, opts = "Where is it?", ["bank", "library", "store", "mall", "new york"]
    item = item_from_record("commonsenseqa", {"question": q, "choices": opts, "label": 3})
    path = importlib.resources.files("lm_eval") / "tasks/commonsense_qa/default.yaml"
    spec = yaml.safe_load(path.read_text())
    doc = {"question": q, "choices": {"text": opts}}
    assert item.contexts[0] == jinja2.Template(spec["doc_to_text"]).render(**doc)
    assert item.continuations == tuple(" " + c for c in spec["doc_to_choice"])  # the letters

    rec = {"context": "Four areas.", "question": "Which follows?", "label": 1,
           "choices": ["one", "two", "three", "four"]}
    item = item_from_record("logiqa", rec)
    assert item.contexts[0] == doc_to_text({**rec, "options": rec["choices"]})
    assert item.continuations == (" one", " two", " three", " four")
