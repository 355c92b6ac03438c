"""Where fc-edge finds shared data and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path:
    """The shared data folder: ``$FC_EDGE_SHARED``, else ``../shared`` beside the checkout."""
    env = os.environ.get("FC_EDGE_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared"


def cache_dir() -> Path:
    """``$FC_EDGE_CACHE``, else ``~/.cache/fc-edge``."""
    return Path(os.environ.get("FC_EDGE_CACHE", Path.home() / ".cache" / "fc-edge"))


def read_texts(path: Path | None = None, limit: int | None = None) -> list[str]:
    """Documents, one per line, of ``path`` (default: shared ``texts/dev.txt``); [] if absent."""
    path = path or shared_dir() / "texts" / "dev.txt"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        docs = [line.strip() for line in f if line.strip()]
    return docs[:limit] if limit else docs
