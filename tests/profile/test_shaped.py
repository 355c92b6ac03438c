"""The analytic link against a real tbf-shaped veth link between two network namespaces."""

import subprocess

import pytest

from fc_edge.profile.shaped import compare_with_model, unavailable_reason

REASON = unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"{REASON}")]


@pytest.mark.parametrize("rate_bps", [50e6, 200e6])  # the 5G preset's rate, and faster
def test_model_agrees_with_shaped_link_within_10_percent(rate_bps):
    res = compare_with_model(rate_bps, sizes=(65_536, 262_144, 1_048_576), repeats=5)
    for row in res["rows"]:
        assert abs(row["rel_error"]) < 0.10, row
    # the namespaces are gone afterwards
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "fcp" not in names
