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


#: How ``texts/dev.txt`` (1,736 distinct documents) is split, by line, so that no figure is
#: measured on text a codec was calibrated on: the first 400 documents are the perplexity
#: evaluation set, the last 600 the calibration set, and the 736 between are for tuning choices
#: (rates, options) without touching either. docs/design.md says why.
EVALUATION_DOCUMENTS = 400
CALIBRATION_DOCUMENTS = 600


def split_documents(
    docs: list[str],
    evaluation: int = EVALUATION_DOCUMENTS,
    calibration: int = CALIBRATION_DOCUMENTS,
) -> dict[str, list[str]]:
    """``docs`` cut into ``{"evaluation": first evaluation, "tuning": the middle,
    "calibration": last calibration}``; raises ValueError when the two ends would overlap."""
    if evaluation < 0 or calibration < 0 or evaluation + calibration > len(docs):
        raise ValueError(
            f"cannot take {evaluation} evaluation and {calibration} calibration documents "
            f"from {len(docs)} without overlap"
        )
    return {
        "evaluation": docs[:evaluation],
        "tuning": docs[evaluation : len(docs) - calibration],
        "calibration": docs[len(docs) - calibration :],
    }
