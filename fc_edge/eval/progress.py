"""Progress bars of the long evaluation loops (tqdm, on stderr)."""

from __future__ import annotations

from typing import Any


def progress_bar(iterable: Any, desc: str, total: int | None, enabled: bool,
                 unit: str = "item") -> Any:
    """``iterable`` under a progress bar (or a bar to update by hand when ``iterable`` is None);
    ``iterable`` itself / None when not ``enabled``."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
