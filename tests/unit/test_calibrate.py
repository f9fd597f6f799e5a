"""Finding-score calibration (trainers/calibrate.py): Platt scaling with smoothed targets."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from trainers.calibrate import (
    brier,
    finding_threshold,
    fit_finding_calibration,
    fp_budget_threshold,
    smoothed_targets,
)
from triage_node.detectors.segmentation import score_logit


def test_smoothed_targets_follow_platt() -> None:
    targets = smoothed_targets(np.array([True, True, True, False]))
    assert targets[:3] == pytest.approx([0.8, 0.8, 0.8])  # (3 + 1) / (3 + 2)
    assert targets[3] == pytest.approx(1 / 3)  # 1 / (1 + 2)


def test_an_overconfident_detector_is_pulled_towards_its_observed_precision() -> None:
    rng = np.random.default_rng(0)
    # raw scores near 1 for everything; 70 % of findings are real
    real = rng.random(400) < 0.7
    scores = np.where(real, rng.uniform(0.97, 0.9999, 400), rng.uniform(0.9, 0.995, 400))
    spec = fit_finding_calibration(list(scores), list(real))
    calibrated = np.array([spec.probability(score_logit(s)) for s in scores])
    assert brier(list(calibrated), list(real)) < brier(list(scores), list(real))
    assert abs(calibrated.mean() - real.mean()) < 0.05
    # increasing: the ranking (FROC, worklist order) is unchanged
    order = np.argsort(scores)
    assert np.all(np.diff(calibrated[order]) >= -1e-12)


def test_all_true_findings_still_give_a_finite_calibration_below_one() -> None:
    spec = fit_finding_calibration([0.99, 0.995, 0.999, 0.98], [True] * 4)
    assert 0.0 < spec.slope < 10.0
    assert 0.5 < spec.probability(score_logit(0.99)) < 1.0


def test_no_finding_cannot_be_calibrated() -> None:
    with pytest.raises(ValueError, match="no findings"):
        fit_finding_calibration([], [])


def test_the_finding_threshold_keeps_the_target_share_of_true_findings() -> None:
    calibrated = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.3, 0.02, 0.01]
    real = [True] * 10 + [False] * 3
    t = finding_threshold(calibrated, real, 0.9)  # 9 of the 10 true findings
    assert t == pytest.approx(0.1)
    kept_true = sum(1 for c, r in zip(calibrated, real, strict=True) if r and c >= t)
    kept_false = sum(1 for c, r in zip(calibrated, real, strict=True) if not r and c >= t)
    assert (kept_true, kept_false) == (9, 1)
    assert finding_threshold([0.4, 0.2], [False, False], 0.95) == 0.0


def test_the_fp_budget_threshold_is_the_most_sensitive_point_within_the_budget() -> None:
    calibrated = [0.9, 0.8, 0.7, 0.5, 0.3, 0.6, 0.4, 0.2, 0.1]
    real = [True, True, True, True, True, False, False, False, False]
    # 4 cases, 0.25 false findings each: one false finding (0.6) may stay, 0.4 may not
    t = fp_budget_threshold(calibrated, real, 4, 0.25)
    assert 0.4 < t <= 0.41
    kept = [c for c in calibrated if c >= t]
    assert kept == [0.9, 0.8, 0.7, 0.5, 0.6]
    assert fp_budget_threshold(calibrated, real, 40, 0.25) == 0.0  # budget above all false


def test_the_critical_volume_is_chosen_on_validation_rows() -> None:
    """Bleeds measured exactly; one normal has a 0.8 mL false finding. 0.5 mL would flag 1
    normal in 10 (specificity 0.90 < 0.95), so 1 mL is the smallest volume these validation
    rows support; without that finding 0.5 mL (the floor of the rule) is recommended."""
    from trainers.calibrate import critical_volume_on_validation
    from trainers.recipes import CT_HEAD_HEMORRHAGE

    def rows(false_ml: float) -> list[dict[str, Any]]:
        bleeds = [{"kind": "intraparenchymal", "true_ml": ml, "pred_ml": ml, "dice": 0.9,
                   "score": 0.9} for ml in (0.6, 2.0, 6.0, 20.0)]
        normals = [{"kind": "normal", "true_ml": 0.0, "pred_ml": 0.0, "dice": None,
                    "score": 0.0} for _ in range(9)]
        normals.append({"kind": "normal", "true_ml": 0.0, "pred_ml": false_ml, "dice": None,
                        "score": 0.6 if false_ml else 0.0})
        return bleeds + normals

    chosen = critical_volume_on_validation(CT_HEAD_HEMORRHAGE, rows(0.8))
    assert chosen["recommended_critical_volume_ml"] == 1.0
    assert (chosen["bleeds"], chosen["normals"]) == (4, 10)
    by_volume = {r["critical_volume_ml"]: r for r in chosen["sweep"]}
    assert by_volume[0.5]["specificity"] == pytest.approx(0.9)
    assert critical_volume_on_validation(CT_HEAD_HEMORRHAGE, rows(0.0))[
        "recommended_critical_volume_ml"] == 0.5


def test_critical_volume_cases_are_validation_phantoms_on_the_held_out_design() -> None:
    from trainers.calibrate import CRITICAL_VOLUME_FIRST_INDEX, critical_volume_cases
    from trainers.data import evaluation_cases
    from trainers.recipes import CT_HEAD_HEMORRHAGE

    held_out = evaluation_cases(CT_HEAD_HEMORRHAGE, 0)
    validation = critical_volume_cases(CT_HEAD_HEMORRHAGE, 0)
    assert len(validation) == len(held_out)
    for v, t in zip(validation, held_out, strict=True):
        assert (v.split, t.split) == ("val", "test")
        assert v.index == CRITICAL_VOLUME_FIRST_INDEX + t.index
        assert (v.shape, v.spacing, v.bleed_ml, v.bleed_kind) == \
            (t.shape, t.spacing, t.bleed_ml, t.bleed_kind)
    # other phantoms: the random draws differ
    assert validation[0].phantom_rng().random() != held_out[0].phantom_rng().random()


def test_the_margin_over_false_alarms_never_costs_sensitivity() -> None:
    """Two false findings (0.7, 0.95 mL) rule 0.5 mL out (specificity 0.92); with 10 % volume
    error the 0.95 mL one asks for more than 1 mL, but a 5.5 mL bleed measured as 1.5 mL would
    then be missed: 1 mL (both targets met) is chosen."""
    from trainers.calibrate import critical_volume_on_validation
    from trainers.recipes import CT_HEAD_HEMORRHAGE

    bleeds = [{"kind": "subdural", "true_ml": ml, "pred_ml": ml * 1.1, "dice": 0.9, "score": 0.9}
              for ml in (0.6, 2.0, 6.0, 20.0, 30.0)]
    bleeds.append({"kind": "subdural", "true_ml": 5.5, "pred_ml": 1.5, "dice": 0.4,
                   "score": 0.9})
    normals: list[dict[str, Any]] = [
        {"kind": "normal", "true_ml": 0.0, "pred_ml": 0.0, "dice": None, "score": 0.0}
        for _ in range(23)]
    normals += [{"kind": "normal", "true_ml": 0.0, "pred_ml": ml, "dice": None, "score": 0.6}
                for ml in (0.7, 0.95)]
    chosen = critical_volume_on_validation(CT_HEAD_HEMORRHAGE, bleeds + normals)
    assert chosen["recommended_critical_volume_ml"] == 1.0
    by_volume = {r["critical_volume_ml"]: r for r in chosen["sweep"]}
    assert by_volume[2.0]["sensitivity_ge_min_ml"] < 0.95 <= by_volume[1.0][
        "sensitivity_ge_min_ml"]


def test_logit_scores_are_fitted_as_they_are_not_clipped() -> None:
    """``finding_score: peak_logit``: scores beyond the 1e-6 clip still rank (and separate)."""
    logits = [30.0, 28.0, 26.0, 24.0, 16.0, 15.0, 14.5, 14.0]
    real = [True, True, True, True, False, False, False, False]
    spec = fit_finding_calibration(logits, real, logits=True)
    calibrated = [spec.probability(z) for z in logits]
    assert calibrated == sorted(calibrated, reverse=True)
    assert min(calibrated[:4]) > 0.5 > max(calibrated[4:])
    # Through the clipped probability the same findings would all look alike.
    probabilities = [1.0 / (1.0 + np.exp(-z)) for z in logits]
    assert len({score_logit(p) for p in probabilities}) == 1
