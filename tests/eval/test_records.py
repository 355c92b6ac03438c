"""Records files (fc_edge/eval/records.py): resumable JSON lines that say what made each item.

Oracle: the file format written out by hand (run line, session lines, item lines) and
hashlib / git for the provenance fields.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from fc_edge.errors import ConfigError
from fc_edge.eval.records import Records, file_sha256, provenance, sessions_of

RUN = {"kind": "accuracy", "settings": ["none"], "wire_version": 2}


def test_sessions_say_which_process_wrote_each_item(tmp_path):
    path = tmp_path / "r.jsonl"
    first = Records(path, RUN, {"commit": "aaa"})
    first.add({"task": "t", "idx": 0, "v": 1})
    first.add({"task": "t", "idx": 1, "v": 1})
    first.close()
    again = Records(path, RUN, {"commit": "bbb"})
    assert set(again.done) == {("t", 0), ("t", 1)}
    again.add({"task": "t", "idx": 1, "v": 2})  # scored again: the later record counts
    again.add({"task": "u", "idx": 0, "v": 2})
    again.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == {"run": RUN} and lines[1] == {"session": {"commit": "aaa"}}
    assert lines[4] == {"session": {"commit": "bbb"}}
    assert again.sessions() == [{"items": 1, "commit": "aaa"}, {"items": 2, "commit": "bbb"}]
    assert again.sessions({("t", 0)}) == [{"items": 1, "commit": "aaa"}]


def test_records_without_sessions_have_no_provenance(tmp_path):
    """A file written before sessions existed (its items are counted as of unknown origin)."""
    lines = [{"run": RUN}, {"task": "t", "idx": 0}, {"session": {"commit": "c"}},
             {"task": "t", "idx": 1}]
    assert sessions_of(lines[1:]) == [{"items": 1, "provenance": None},
                                      {"items": 1, "commit": "c"}]


def test_another_run_is_refused_and_a_cut_line_scored_again(tmp_path):
    path = tmp_path / "r.jsonl"
    r = Records(path, RUN)
    r.add({"task": "t", "idx": 0})
    r.add({"task": "t", "idx": 1})
    r.close()
    with pytest.raises(ConfigError, match="another run"):
        Records(path, {**RUN, "wire_version": 1})
    text = path.read_text()
    path.write_text(text[:-5])  # the last line cut by an interrupted run
    again = Records(path, RUN)
    assert set(again.done) == {("t", 0)}
    again.close()
    assert path.read_text() == text[: text.rindex('{"task": "t", "idx": 1}')]


def test_provenance_names_code_wire_data_and_command(tmp_path):
    from fc_edge.codecs import wire

    data = tmp_path / "piqa" / "dev.jsonl"
    data.parent.mkdir()
    data.write_bytes(b"x" * 3000000)
    p = provenance([data], ["/usr/bin/fc-edge", "eval", "--tasks", "a b"], note=1)
    assert p["data"] == {"piqa/dev.jsonl": hashlib.sha256(b"x" * 3000000).hexdigest()}
    assert file_sha256(data) == p["data"]["piqa/dev.jsonl"]
    assert p["wire_version"] == wire.VERSION and p["command"] == "fc-edge eval --tasks 'a b'"
    assert p["note"] == 1 and set(p) >= {"commit", "dirty", "torch", "time"}
    assert p["commit"] is None or len(p["commit"]) == 40
