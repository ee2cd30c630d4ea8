"""External validation: intensity statistics in a corex_cxr source's describe(), and the header-shift arithmetic
the findings use (the findings themselves: tests/plugins/test_report.py; a run with an external stage:
tests/plugins/test_subgroups.py)."""

from __future__ import annotations

import numpy as np
import pytest

import corex_cxr
from corex_eval.external import header_shift, shares, total_variation


def test_describe_reports_intensity_statistics_once_the_cache_is_built(tmp_path):
    data = corex_cxr.phantom_source(image_size=32, seed=0, cache_dir=tmp_path, studies=12, workers=1)
    assert "intensity" not in data.describe()  # nothing decoded yet: describe() reads no pixel
    data.prepare()
    intensity = data.describe()["intensity"]
    for split in ("train", "val", "test"):
        pixels = np.concatenate([item["image"].numpy().ravel() for item in data.split(split)])  # square images: no padding
        stats = intensity[split]
        assert stats["images"] == len(data.split(split))
        assert stats["mean"] == pytest.approx(pixels.mean(), abs=1e-6)
        assert stats["sd"] == pytest.approx(pixels.std(), abs=1e-6)
        for q in (1, 5, 25, 50, 75, 95, 99):
            assert stats[f"p{q}"] == pytest.approx(np.percentile(pixels, q), abs=1e-6)
    # Everything describe() said before is still there, unchanged.
    assert {"train", "val", "test", "subgroups", "unusable"} <= set(data.describe())


def test_header_shift_is_the_total_variation_of_the_value_shares():
    assert shares({"AP": 3, "PA": 1}) == {"AP": 0.75, "PA": 0.25}
    assert total_variation({"AP": 0.75, "PA": 0.25}, {"AP": 0.25, "PA": 0.75}) == pytest.approx(0.5)
    assert total_variation({"AP": 1.0}, {"PA": 1.0}) == pytest.approx(1.0)
    shift = header_shift({"view": {"AP": 55, "PA": 45}, "sex": {"F": 1}}, {"view": {"AP": 90, "PA": 10, "": 0}, "age_band": {"": 3}})
    assert set(shift) == {"view"}  # a field only one side reports is not compared
    assert shift["view"]["distance"] == pytest.approx(0.35)
    assert (shift["view"]["value"], shift["view"]["train"], shift["view"]["external"]) == ("AP", 0.55, 0.9)
    # Unknown ("") is a value: a source without the header has shifted away from one with it.
    assert header_shift({"sex": {"F": 5, "M": 5}}, {"sex": {"": 10}})["sex"]["distance"] == pytest.approx(1.0)
