"""The NTIRE 2025 score formula and ID gate (pipelines/quality/ntire_score.py)."""
import math

import pytest

from facemend.pipelines.quality.ntire_score import (DATASET_COUNTS, ID_THRESHOLDS, id_gate, ntire_score, score_terms,
                                            weighted_mean)


def test_reproduces_the_aiia_factsheet_score():
    """AIIA's factsheet: NIQE 5.186, CLIP-IQA 0.929, MANIQA 0.730, MUSIQ 77.481, Q-Align 4.646, FID 61.315 -> 4.231."""
    total = ntire_score(niqe=5.186, clipiqa=0.929, maniqa=0.730, musiq=77.481, qalign=4.646, fid=61.315)
    assert round(total, 3) == 4.231
    terms = score_terms(niqe=5.186, clipiqa=0.929, maniqa=0.730, musiq=77.481, qalign=4.646, fid=61.315)
    assert terms["niqe"] == pytest.approx(0.4814) and terms["fid"] == pytest.approx(0.38685)
    assert terms["musiq"] == pytest.approx(0.77481) and terms["qalign"] == pytest.approx(0.9292)


def test_lower_better_terms_clip_at_zero_and_missing_metrics_are_left_out():
    assert score_terms(niqe=12.0, fid=150.0) == {"niqe": 0.0, "fid": 0.0}
    assert ntire_score(clipiqa=0.5, musiq=50) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown metric"):
        ntire_score(lpips=0.1)
    with pytest.raises(ValueError, match="finite"):
        ntire_score(niqe=math.nan)


def test_id_gate_per_set_thresholds_and_fail_above_ten():
    assert ID_THRESHOLDS == {"CelebA": 0.5, "LFW-Test": 0.6, "CelebChild-Test": 0.6, "Wider-Test": 0.3,
                             "WebPhoto-Test": 0.3}
    # 0.45 is low for CelebA (0.5) and LFW (0.6) but fine for Wider (0.3); exactly the threshold is not low
    gate = id_gate([0.45, 0.45, 0.45, 0.6], ["CelebA", "LFW-Test", "Wider-Test", "LFW-Test"])
    assert [p["low"] for p in gate["per_image"]] == [True, True, False, False]
    assert gate["low_count"] == 2 and gate["passed"]
    assert gate["low_by_dataset"] == {"CelebA": 1, "LFW-Test": 1}
    assert id_gate([0.1] * 10, ["Wider-Test"] * 10)["passed"]
    assert not id_gate([0.1] * 11, ["Wider-Test"] * 11)["passed"]
    assert id_gate([0.55], None, default_threshold=0.6)["low_count"] == 1
    with pytest.raises(ValueError, match="unknown dataset 'FFHQ'"):
        id_gate([0.9], ["FFHQ"])


def test_weighted_mean_uses_official_dataset_sizes():
    # CelebChild has 50 images, the others 100: a two-set mean weights them 50:100
    v = weighted_mean([1.0, 1.0, 4.0], ["CelebChild-Test", "CelebChild-Test", "CelebA"], DATASET_COUNTS)
    assert v == pytest.approx((1.0 * 50 + 4.0 * 100) / 150)
    assert weighted_mean([1.0, 2.0, 6.0]) == pytest.approx(3.0)
