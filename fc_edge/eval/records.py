"""Per-item (per-document) records of a run as JSON lines, and where every result came from.

A records file is written as items are scored, so a stopped run resumes where it stopped:

* line 1: ``{"run": {...}}`` — what is scored (kind, split layers, settings, the wire-format
  version, ...). Given the same file again, a run of the same description appends to it; a file
  of another description (other settings, another wire version) is refused.
* ``{"session": {...}}`` — written each time a process opens the file: the :func:`provenance`
  of the items that follow (commit, dirty flag, wire version, data hashes, command).
* one line per item: ``{"task": ..., "idx": ..., ...}`` (documents: ``{"idx": ..., ...}``).

Records written before sessions existed have none; :func:`sessions_of` reports them as items
without provenance.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fc_edge.errors import ConfigError

RECORDED = ("commit", "dirty", "wire_version", "data", "command")  # what every result names


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def code_version() -> dict[str, Any]:
    """The commit of the fc_edge package being run and whether its tracked files differ from it
    (``dirty``); both None when the package is not in a git checkout."""
    root = Path(__file__).resolve().parents[2]
    head = _git(root, "rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip())}


def provenance(data_files: Iterable[Path] = (), command: Sequence[str] | None = None,
               **extra: Any) -> dict[str, Any]:
    """Where a result comes from: the code (``commit``, ``dirty``), the wire-format version its
    codecs wrote (:data:`fc_edge.codecs.wire.VERSION`), the SHA-256 of each data file (by file
    name; the task folder's name for a task file), the command line, the time (UTC) and
    torch's version; ``extra`` is added as it is."""
    import torch

    from fc_edge.codecs import wire

    data = {}
    for p in data_files:
        p = Path(p)
        data[f"{p.parent.name}/{p.name}"] = file_sha256(p)
    argv = list(sys.argv if command is None else command)
    if argv:
        argv[0] = Path(argv[0]).name
    return {**code_version(), "wire_version": wire.VERSION, "data": data,
            "command": shlex.join(argv), "torch": torch.__version__,
            "time": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), **extra}


def read_lines(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the run description, every other complete line in order: sessions and records). A last
    line cut by an interrupted run and damaged lines are left out."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    try:
        run = json.loads(lines[0])["run"]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        raise ConfigError(f"{path}: not a records file of `fc-edge eval`") from None
    out = []
    for line in lines[1:-1]:  # the text after the last newline is not a complete line
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a damaged line: that item is scored again
    return run, out


def sessions_of(lines: Sequence[dict[str, Any]], keys: set[tuple[str, int]] | None = None
                ) -> list[dict[str, Any]]:
    """The sessions the records in ``lines`` came from (only the records keyed in ``keys``,
    (task, idx), when given; the last record of a key counts): each session's provenance with
    ``items`` = how many of those records it wrote. Records before the first session line form
    a session ``{"provenance": None}``."""
    owner: dict[tuple[str, int], int] = {}
    sessions: list[dict[str, Any] | None] = [None]
    for line in lines:
        if "session" in line:
            sessions.append(line["session"])
        elif "idx" in line:
            owner[(line.get("task", ""), int(line["idx"]))] = len(sessions) - 1
    counts = [0] * len(sessions)
    for key, s in owner.items():
        if keys is None or key in keys:
            counts[s] += 1
    out = []
    for s, n in zip(sessions, counts, strict=True):
        if n:
            out.append({"items": n, **(s if s is not None else {"provenance": None})})
    return out


class Records:
    """The records file of one run (see the module docstring); ``path`` None keeps nothing.

    ``session``: the provenance line written when the file is opened (None: none written)."""

    def __init__(self, path: Path | None, run: dict[str, Any],
                 session: dict[str, Any] | None = None) -> None:
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        self.lines: list[dict[str, Any]] = []
        self.sink: Any = None
        if path is None:
            if session is not None:
                self.lines.append({"session": session})
            return
        path = Path(path)
        if path.is_file() and path.stat().st_size:
            first, self.lines = read_lines(path)
            if first != run:
                raise ConfigError(f"{path} holds another run ({first}); give another --records "
                                  "file or the same settings")
            size = path.stat().st_size
            with open(path, "rb") as f:
                text = f.read()
            if not text.endswith(b"\n"):  # cut by an interrupted run: scored again
                with open(path, "r+b") as f:
                    f.truncate(text.rfind(b"\n") + 1 if b"\n" in text else size)
            for rec in self.lines:
                if "idx" in rec:
                    self.done[(rec.get("task", ""), int(rec["idx"]))] = rec
            self.sink = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.sink = open(path, "w", encoding="utf-8")  # noqa: SIM115
            self.sink.write(json.dumps({"run": run}) + "\n")
        if session is not None:
            self._write({"session": session})

    def get(self, task: str, idx: int) -> dict[str, Any] | None:
        return self.done.get((task, idx))

    def add(self, rec: dict[str, Any]) -> None:
        self._write(rec)

    def _write(self, line: dict[str, Any]) -> None:
        self.lines.append(line)
        if self.sink is not None:
            self.sink.write(json.dumps(line) + "\n")
            self.sink.flush()

    def sessions(self, keys: set[tuple[str, int]] | None = None) -> list[dict[str, Any]]:
        """:func:`sessions_of` this file's lines (with the ones this process wrote)."""
        return sessions_of(self.lines, keys)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
