"""Scores and labels on hand-made curves (DESIGN §1.4)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import simpson

from inferlink_audit.results import Labels, Scores, SweepResult
from inferlink_audit.scores import alpha_hat, fragile_fraction, integrate, score_curves

N = 5
REMOVED = np.linspace(0, 1, N)  # baseline b = 1 - ρ falls linearly from 1 to 0


def test_alpha_hat_and_simpson_match_scipy():
    assert alpha_hat(5).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    y = np.array([1.0, 0.9, 0.7, 0.2, 0.0])
    assert integrate(y) == simpson(y, x=alpha_hat(5))
    assert integrate(np.ones(25)) == pytest.approx(1.0)


def test_curve_on_the_baseline_is_robust():
    base = 1 - REMOVED
    s = score_curves(
        base * 0.8,
        base * 0.4,
        REMOVED,
        clean_reference=0.8,
        adversarial_reference=0.4,
        tolerance=0.05,
    )
    assert s.scores.clean == pytest.approx(0.0, abs=1e-12)
    assert s.labels == Labels("robust", "robust")
    assert not s.targeted


def test_collapse_is_fragile_and_plateau_is_robust():
    clean = np.array([0.9, 0.1, 0.1, 0.1, 0.1])  # falls at once: far below the baseline
    adv = np.array([0.5, 0.5, 0.5, 0.5, 0.5])  # never falls: r = 1 throughout
    s = score_curves(
        clean, adv, REMOVED, clean_reference=0.9, adversarial_reference=0.5, tolerance=0.05
    )
    a = alpha_hat(N)
    assert s.scores.clean == pytest.approx(simpson(clean / 0.9 - (1 - REMOVED), x=a))
    assert s.labels.clean == "fragile"
    # r = 1 exactly: ∫max(0, r-1) = 0, φ = ∫(1 - b) = 0.5 > -τ
    assert s.labels.adversarial == "robust"
    assert s.scores.difference == pytest.approx(s.scores.adversarial - s.scores.clean)
    assert not s.targeted  # adversarial falls slower than clean


def test_improvement_is_antifragile_and_takes_precedence():
    clean = np.array([0.5, 0.8, 0.8, 0.8, 0.0])  # r rises to 1.6
    s = score_curves(
        clean, clean, REMOVED, clean_reference=0.5, adversarial_reference=0.5, tolerance=0.05
    )
    assert s.labels == Labels("antifragile", "antifragile")
    assert s.antifragile_area.clean == pytest.approx(
        simpson(np.maximum(0, clean / 0.5 - 1), x=alpha_hat(N))
    )


def test_targeted_when_adversarial_falls_faster_than_clean():
    clean = np.array([0.9, 0.9, 0.9, 0.9, 0.9])
    adv = np.array([0.6, 0.1, 0.0, 0.0, 0.0])
    s = score_curves(
        clean, adv, REMOVED, clean_reference=0.9, adversarial_reference=0.6, tolerance=0.05
    )
    assert s.scores.difference < -0.05
    assert s.targeted


def test_zero_adversarial_reference_normalises_by_clean():
    clean = np.array([0.8, 0.8, 0.4, 0.2, 0.0])
    adv = np.array([0.0, 0.1, 0.0, 0.0, 0.0])
    s = score_curves(
        clean, adv, REMOVED, clean_reference=0.8, adversarial_reference=0.0, tolerance=0.05
    )
    assert s.adversarial_normalised_by == "clean"
    expected = simpson(adv / 0.8 - (1 - REMOVED), x=alpha_hat(N))
    assert s.scores.adversarial == pytest.approx(expected)
    assert np.isfinite(s.scores.difference)


def test_tolerance_boundary():
    # φ exactly -τ is not fragile, and φΔ exactly -τ is not targeted: both inequalities are
    # strict. τ = 1/16 and the curves are dyadic, so Simpson's sum is exact and φ is -τ itself.
    base = 1 - REMOVED
    tau = 1 / 16
    on = score_curves(
        base - tau,
        base - tau,
        REMOVED,
        clean_reference=1.0,
        adversarial_reference=1.0,
        tolerance=tau,
    )
    assert on.scores.clean == on.scores.adversarial == simpson(-tau * np.ones(N), x=alpha_hat(N))
    assert on.scores.clean == -tau
    assert on.labels == Labels(clean="robust", adversarial="robust")
    below = score_curves(
        base - tau - 2**-10,
        base - tau - 2**-10,
        REMOVED,
        clean_reference=1.0,
        adversarial_reference=1.0,
        tolerance=tau,
    )
    assert below.scores.clean == -tau - 2**-10
    assert below.labels == Labels(clean="fragile", adversarial="fragile")
    targeted = [
        score_curves(
            base,
            base - shift,
            REMOVED,
            clean_reference=1.0,
            adversarial_reference=1.0,
            tolerance=tau,
        )
        for shift in (tau, tau + 2**-10)
    ]
    assert [t.scores.difference for t in targeted] == [-tau, -tau - 2**-10]
    assert [t.targeted for t in targeted] == [False, True]


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.03])
def test_a_score_on_the_boundary_is_robust_despite_rounding(tau):
    # A curve a constant τ below the baseline has φ = −τ on paper; Simpson's sum gives a value
    # a rounding error away from it (−0.05000000000000001 for τ = 0.05), which must not make
    # the layer fragile or targeted.
    base = 1 - REMOVED
    s = score_curves(
        base,
        base - tau,
        REMOVED,
        clean_reference=1.0,
        adversarial_reference=1.0,
        tolerance=tau,
    )
    assert s.scores.adversarial == pytest.approx(-tau, abs=1e-14)
    assert s.labels == Labels(clean="robust", adversarial="robust")
    assert not s.targeted
    gain = score_curves(
        np.ones(N) + tau,
        base,
        REMOVED,
        clean_reference=1.0,
        adversarial_reference=1.0,
        tolerance=tau,
    )
    assert gain.antifragile_area.clean == pytest.approx(tau, abs=1e-14)
    assert gain.labels.clean != "antifragile"


def _sweep(layer, numel, clean, adv, score=-0.1):
    return SweepResult(
        scope="local",
        layer=layer,
        filter="low_pass",
        attack="fgsm_eps0.1",
        numel=numel,
        thresholds=[],
        removed_fraction=[],
        clean_accuracy=[],
        adversarial_accuracy=[],
        scores=Scores(score, score, 0.0),
        labels=Labels(clean, adv),
        targeted=False,
    )


def test_fragile_fraction_counts_parameters_worst_first():
    sweeps = [
        _sweep("conv1", 100, "robust", "fragile", -0.1),
        _sweep("fc1", 300, "fragile", "fragile", -0.4),
        _sweep("fc2", 600, "robust", "antifragile", 0.2),
    ]
    fraction, layers = fragile_fraction(sweeps, "adversarial")
    assert fraction == pytest.approx(0.4)
    assert layers == ["fc1", "conv1"]
    assert fragile_fraction(sweeps, "clean") == (pytest.approx(0.3), ["fc1"])


def test_a_tied_tensor_counts_once_and_is_fragile_when_any_holder_is():
    # enc and dec share one 200-element weight; dec also holds a 10-element bias of its own.
    members = {
        "enc": [("enc.weight", 200)],
        "dec": [("enc.weight", 200), ("dec.bias", 10)],
        "fc": [("fc.weight", 90)],
    }
    sweeps = [
        _sweep("enc", 200, "robust", "robust", 0.0),
        _sweep("dec", 210, "fragile", "robust", -0.3),
        _sweep("fc", 90, "fragile", "fragile", -0.2),
    ]
    total = 200 + 10 + 90  # distinct weights, not 200 + 210 + 90
    fraction, layers = fragile_fraction(sweeps, "clean", members=members)
    assert fraction == (200 + 10 + 90) / total  # enc.weight is fragile through dec
    assert layers == ["dec", "fc"]
    assert fragile_fraction(sweeps, "adversarial", members=members) == (90 / total, ["fc"])
    # Without the members each layer counts its own numel, as before.
    assert fragile_fraction(sweeps, "adversarial") == (90 / 500, ["fc"])


def test_scope_members_name_a_tied_tensor_once():
    from torch import nn

    from inferlink_audit.layers import AnalysedLayer
    from inferlink_audit.scores import scope_members

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    layers = [
        AnalysedLayer("0", "Linear", [model[0].weight]),
        AnalysedLayer("2", "Linear", [model[2].weight, model[2].bias]),
    ]
    assert scope_members(model, layers) == {
        "0": [("0.weight", 16)],
        "2": [("0.weight", 16), ("2.bias", 4)],
    }
