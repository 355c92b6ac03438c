"""The ten multiple-choice tasks: records on disk -> scoring requests (context, continuations).

A task is a folder ``<data_dir>/<task>/`` holding one ``.jsonl`` file (``../shared/README.md``
describes the records). Every record becomes one :class:`Item`: one context string per choice and
one continuation string per choice, scored the way lm-evaluation-harness does:

* ordinary tasks: the same context (the task's prompt) for every choice, continuation
  ``" " + choice``;
* WinoGrande (partial scoring): the context is the sentence up to the blank with the option
  filled in (``context_options``), the continuation is the shared rest of the sentence.

Prompts follow lm-evaluation-harness 0.4 where it has the task: ``"Question: ...\\nAnswer:"`` for
ARC and PIQA; the bare question stem for OpenBookQA; ``"Q: context question\\nA:"`` for SIQA;
CommonsenseQA lists the options as ``A. ...`` to ``E. ...`` after the question and scores the
letter (``" A"`` ... ``" E"``), as its ``commonsense_qa.yaml``; LogiQA is ``"Passage: ...\\n
Question: ...\\nChoices:\\nA. ...\\nD. ...\\nAnswer:"`` with the option texts as continuations, as
its ``utils_logiqa.doc_to_text``. QASC and CosmosQA (not in lm-eval 0.4's task list in this
form) use the question/answer frame with their facts or passage in front.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fc_edge.errors import ConfigError

TASKS = ("arc_challenge", "arc_easy", "commonsenseqa", "cosmosqa", "logiqa", "openbookqa", "piqa",
         "qasc", "siqa", "winogrande")
# Short names of the paper's tables (Table II/III column order).
PAPER_ORDER = ("openbookqa", "arc_easy", "arc_challenge", "piqa", "siqa", "winogrande",
               "commonsenseqa", "qasc", "logiqa", "cosmosqa")
PAPER_ABBREV = {"openbookqa": "OA", "arc_easy": "A-e", "arc_challenge": "A-c", "piqa": "PA",
                "siqa": "SA", "winogrande": "WG", "commonsenseqa": "CQ", "qasc": "QC",
                "logiqa": "LA", "cosmosqa": "CA"}


LETTERS = "ABCDEFGHIJ"
LETTER_TASKS = ("commonsenseqa",)  # tasks whose continuation is the option letter (lm-eval)


def default_data_dir() -> Path:
    """``../shared/datasets`` next to the repository (the project's shared data folder)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: per choice a context and a continuation (strings)."""

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int

    @property
    def n_choices(self) -> int:
        return len(self.continuations)


def _question_answer(q: str) -> str:
    return f"Question: {q.strip()}\nAnswer:"


def _prompt(task: str, rec: dict[str, Any]) -> str:
    q = str(rec["question"]).strip()
    if task == "openbookqa":
        return q
    if task == "siqa":
        return f"Q: {str(rec['context']).strip()} {q}\nA:"
    if task == "cosmosqa":
        return f"{str(rec['context']).strip()}\n{_question_answer(q)}"
    if task == "logiqa":  # lm-eval 0.4 tasks/logiqa/utils_logiqa.py doc_to_text
        opts = "".join(f"{LETTERS[i]}. {str(c).strip()}\n" for i, c in enumerate(rec["choices"]))
        return f"Passage: {str(rec['context']).strip()}\nQuestion: {q}\nChoices:\n{opts}Answer:"
    if task == "commonsenseqa":  # lm-eval 0.4 tasks/commonsense_qa/default.yaml doc_to_text
        opts = "".join(f"\n{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(rec["choices"]))
        return f"Question: {q}{opts}\nAnswer:"
    if task == "qasc":
        facts = " ".join(str(rec[k]).strip() for k in ("fact1", "fact2") if rec.get(k))
        return f"{facts}\n{_question_answer(q)}" if facts else _question_answer(q)
    if rec.get("context"):  # an unknown task with a context field (any --data-dir folder)
        return f"{str(rec['context']).strip()}\n{_question_answer(q)}"
    return _question_answer(q)


def item_from_record(task: str, rec: dict[str, Any], where: str = "") -> Item:
    """Build the scoring request of one record; :class:`ConfigError` names a malformed one."""
    try:
        label = int(rec["label"])
        if "context_options" in rec:  # WinoGrande: partial scoring
            contexts = tuple(str(c) for c in rec["context_options"])
            cont = " " + str(rec["continuation"]).strip()
            conts = tuple(cont for _ in contexts)
        else:
            prompt = _prompt(task, rec)
            if task in LETTER_TASKS:  # the answer is scored as its letter
                conts = tuple(" " + LETTERS[i] for i in range(len(rec["choices"])))
            else:
                conts = tuple(" " + str(c).strip() for c in rec["choices"])
            contexts = tuple(prompt for _ in conts)
        rid = str(rec.get("id", where))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: not a multiple-choice record ({e!r}); see ../shared/README.md "
                          "for the record format") from None
    if len(conts) < 2 or not 0 <= label < len(conts):
        raise ConfigError(f"{where}: needs >= 2 choices and a label in range, got "
                          f"{len(conts)} choices, label {label}")
    return Item(rid, contexts, conts, label)


def task_file(data_dir: Path, task: str) -> Path:
    folder = Path(data_dir) / task
    if not folder.is_dir():
        have = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir()) if Path(
            data_dir).is_dir() else []
        raise ConfigError(f"no task folder {str(folder)!r} (tasks in {str(data_dir)!r}: "
                          f"{', '.join(have) or 'none'}); give --data-dir or --tasks")
    files = sorted(folder.glob("*.jsonl"))
    if len(files) != 1:
        raise ConfigError(f"{str(folder)!r} must hold exactly one .jsonl file, found {len(files)}")
    return files[0]


def load_task(task: str, data_dir: Path | None = None, limit: int | None = None) -> list[Item]:
    """The first ``limit`` items (all when None) of ``<data_dir>/<task>/*.jsonl``."""
    path = task_file(Path(data_dir) if data_dir else default_data_dir(), task)
    items: list[Item] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not JSON ({e})") from None
            items.append(item_from_record(task, rec, f"{path}:{n}"))
    if not items:
        raise ConfigError(f"{path}: no records")
    return items


@dataclass(frozen=True)
class Encoded:
    """Token ids of one item: per choice the whole sequence and where the continuation starts."""

    sequences: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]   # index of the first continuation token in each sequence
    cont_chars: tuple[int, ...]  # characters of each choice (acc_norm), no delimiter space


def encode_item(item: Item, encode: Callable[[str], list[int]], prefix_id: int | None = None,
                max_len: int | None = None) -> Encoded:
    """Tokenize like lm-evaluation-harness: encode ``context + continuation`` whole and take the
    tokens past ``len(encode(context))`` as the continuation (trailing spaces of the context move
    to the continuation first). An empty context gets ``prefix_id`` in front. ``max_len`` cuts
    tokens from the left (the continuation is always kept)."""
    seqs, starts, nchars = [], [], []
    for ctx, cont in zip(item.contexts, item.continuations, strict=True):
        n_space = len(ctx) - len(ctx.rstrip())
        if n_space:
            ctx, cont = ctx[:-n_space], ctx[-n_space:] + cont
        ctx_ids = list(encode(ctx)) if ctx else []
        whole = list(encode(ctx + cont)) if ctx else list(encode(cont))
        cont_ids = whole[len(ctx_ids):]
        if not ctx_ids:
            if prefix_id is None:
                raise ConfigError("an empty context needs a prefix token (the tokenizer's eos)")
            ctx_ids = [prefix_id]
            cont_ids = whole
        if not cont_ids:
            raise ConfigError(f"item {item.id}: a continuation encodes to no tokens")
        seq = ctx_ids + cont_ids
        if max_len is not None and len(seq) > max_len:
            seq = seq[len(seq) - max_len:]
        seqs.append(tuple(seq))
        starts.append(max(1, len(seq) - len(cont_ids)))  # the first token is never predicted
        # lm-evaluation-harness divides by len(choice): characters, no leading delimiter space
        nchars.append(len(item.continuations[len(seqs) - 1].removeprefix(" ")))
    return Encoded(tuple(seqs), tuple(starts), tuple(nchars))


def token_encoder(tokenizer: Any) -> tuple[Callable[[str], list[int]], int | None]:
    """(text -> token ids without special tokens, the end-of-sequence id or None) of a Hugging
    Face tokenizer; a model without one cannot be scored on text (ConfigError)."""
    if tokenizer is None:
        raise ConfigError("evaluation needs a tokenizer: this model has none (synthetic models "
                          "cannot be scored on text)")

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return encode, getattr(tokenizer, "eos_token_id", None)
