"""Compare the scores of one records file (made now) with another's (made earlier), item by
item, per setting: how many decisions (acc and acc_norm) differ, the largest log-likelihood
difference, how many payloads changed size.

    python docs/results/rescore_check.py NEW.jsonl OLD.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def items(path: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "idx" in rec:
            out[rec["task"], int(rec["idx"])] = rec
    return out


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def main() -> None:
    new, old = (items(Path(p)) for p in sys.argv[1:3])
    keys = sorted(new.keys() & old.keys())
    settings = sorted({k for key in keys for k in new[key]["s"]} &
                      {k for key in keys for k in old[key]["s"]})
    print(f"{len(keys)} items in both files")
    for s in settings:
        flips = flips_norm = resized = 0
        worst = 0.0
        for key in keys:
            a, b = new[key]["s"][s], old[key]["s"][s]
            chars = new[key]["chars"]
            worst = max(worst, max(abs(x - y) for x, y in zip(a["ll"], b["ll"])))
            flips += argmax(a["ll"]) != argmax(b["ll"])
            flips_norm += (argmax([x / c for x, c in zip(a["ll"], chars)])
                           != argmax([y / c for y, c in zip(b["ll"], chars)]))
            resized += a["bytes"] != b["bytes"]
        print(f"{s}: acc decisions differ on {flips}, acc_norm on {flips_norm} of {len(keys)}; "
              f"max |Δ loglik| {worst:.2e} nats; payload size differs on {resized}")


if __name__ == "__main__":
    main()
