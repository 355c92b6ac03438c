"""Every interval README.md and docs/results.md §0 quote comes from a record of the current code.

A published figure with an interval ("+0.99% [+0.69, +1.28]", "agreement 96.4% [95.9, 96.7]")
must be found, at the precision it is printed with, in a results JSON under docs/results/ whose
provenance names a commit and the current wire-format version. A figure left over from records
of an older codec (or of no recorded version at all) fails here, naming the figure.

The oracle is the JSON files themselves, read by this test's own walk (not by the renderer
that writes §0), so a renderer bug that prints numbers the records do not hold fails too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fc_edge.codecs import wire

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
#: a number as printed: sign, digits with optional thousands separators ("+77,373"), decimals
NUM = r"[+\-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
#: "[lo, hi]" with optional % signs; the value before it is optional in prose
INTERVAL = re.compile(rf"\[\s*({NUM})\s*%?\s*,\s*({NUM})\s*%?\s*\]")


def _num(text: str) -> float:
    return float(text.replace("−", "-").replace(",", ""))


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def quoted_intervals(text: str) -> list[tuple[str, str]]:
    """Every ``[lo, hi]`` pair of numbers in ``text`` (markdown), as printed."""
    return [(m.group(1), m.group(2)) for m in INTERVAL.finditer(text)]


def recorded_intervals(obj: object) -> Iterator[tuple[float, float]]:
    """Every numeric pair stored under a key ending in ``ci95`` (or ``ci``), anywhere in a
    results JSON."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if (k.endswith("ci95") or k.endswith("_ci")) and isinstance(v, list) \
                    and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
                yield float(v[0]), float(v[1])
            else:
                yield from recorded_intervals(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from recorded_intervals(v)


def wire_version_of(doc: dict) -> int | None:
    prov = doc.get("provenance") if isinstance(doc, dict) else None
    if isinstance(prov, dict) and prov.get("commit"):
        return prov.get("wire_version")
    return None


def current_records(root: Path = RESULTS) -> list[tuple[Path, list[tuple[float, float]]]]:
    """The results JSONs of the current wire version that name their commit, with their
    intervals."""
    out = []
    for path in sorted(root.rglob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and wire_version_of(doc) == wire.VERSION:
            out.append((path, list(recorded_intervals(doc))))
    return out


def matches(lo: str, hi: str, recorded: list[tuple[float, float]]) -> bool:
    """``[lo, hi]`` as printed equals a recorded pair, rounded to the printed decimals, as a
    fraction or in percent/points (x100)."""
    d = max(_decimals(lo), _decimals(hi))
    want = (_num(lo), _num(hi))
    for a, b in recorded:
        for scale in (1.0, 100.0):
            got = (round(a * scale, d), round(b * scale, d))
            if all(abs(g - w) <= 0.5 * 10 ** -d + 1e-9 for g, w in zip(got, want)):
                return True
    return False


def stale(text: str, records: list[tuple[Path, list[tuple[float, float]]]]) -> list[str]:
    """The intervals of ``text`` that no current record holds."""
    pool = [iv for _, ivs in records for iv in ivs]
    return [f"[{lo}, {hi}]" for lo, hi in quoted_intervals(text) if not matches(lo, hi, pool)]


def section0(markdown: str) -> str:
    start = markdown.index("\n## 0.")
    end = markdown.index("\n## ", start + 1)
    return markdown[start:end]


# --- the checker itself, on cases whose answer is known ---------------------------------------

def test_checker_finds_and_rejects(tmp_path: Path) -> None:
    current = {"provenance": {"commit": "abc", "wire_version": wire.VERSION},
               "results": {"1": {"rotated": {"delta": 0.99, "delta_ci95": [0.6912, 1.2849]},
                                 "int8": {"stats": {"acc": {"agreement_ci95": [0.9594, 0.9673]}}}}}}
    old = {"provenance": {"commit": "def", "wire_version": wire.VERSION - 1},
           "results": {"1": {"rotated": {"delta_ci95": [0.57, 1.17]}}}}
    unversioned = {"results": {"1": {"rotated": {"delta_ci95": [0.33, 0.44]}}}}
    for name, doc in (("a", current), ("b", old), ("c", unversioned)):
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    records = current_records(tmp_path)
    assert [p.name for p, _ in records] == ["a.json"]
    text = ("+0.99% [+0.69%, +1.28%]; agreement 96.4% [95.9, 96.7]; "
            "old +0.87% [+0.57, +1.17]; other [+0.33, +0.44]; wrong [+0.70, +1.28]")
    assert stale(text, records) == ["[+0.57, +1.17]", "[+0.33, +0.44]", "[+0.70, +1.28]"]
    assert quoted_intervals("Δ −0.33 [−0.33, +0.39] and [1, 2]") == [("−0.33", "+0.39"),
                                                                     ("1", "2")]
    # thousands separators: "+83,887% [+77,373%, +90,897%]" is the pair (77373, 90897)
    assert quoted_intervals("[+77,373%, +90,897%] [1,2]") == [("+77,373", "+90,897"), ("1", "2")]
    assert not stale("[+77,373%, +90,897%]", [(Path("x"), [(773.7273, 908.9707)])])


# --- the published documents -----------------------------------------------------------------

@pytest.fixture(scope="module")
def records() -> list[tuple[Path, list[tuple[float, float]]]]:
    found = current_records()
    assert found, f"no results JSON of wire version {wire.VERSION} under {RESULTS}"
    return found


def test_full_set_records_name_commit_and_wire_version() -> None:
    for name in ("main", "others", "ppl_per_token"):
        doc = json.loads((RESULTS / "full" / f"{name}.json").read_text(encoding="utf-8"))
        assert wire_version_of(doc) == wire.VERSION, f"full/{name}.json: not wire v{wire.VERSION}"
        assert len(doc["provenance"]["commit"]) == 40
        assert doc["provenance"].get("data"), f"full/{name}.json names no data file hashes"


def test_readme_quotes_only_current_figures(records) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    bad = stale(text, records)
    assert not bad, f"README.md quotes intervals no current-wire record holds: {bad}"


def test_results_section0_quotes_only_current_figures(records) -> None:
    text = section0((ROOT / "docs" / "results.md").read_text(encoding="utf-8"))
    bad = stale(text, records)
    assert not bad, f"docs/results.md §0 quotes intervals no current-wire record holds: {bad}"
