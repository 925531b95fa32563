"""What each attack-failure indicator measures, which examples it names, and what to do when
it fires: one table for the indicators' own details, the report's section and the docs.

Kept free of torch so the report (``inferlink-audit merge`` included) can read it without
loading the attack code; the measurements themselves live in ``attack_sanity``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IndicatorGuide:
    """One indicator in words: its title, its number, its examples and the remedy."""

    title: str
    measures: str  # what the measured number is (the item passes when measured <= limit)
    concerns: str  # which examples the reading lists
    action: str  # what to do when it fires


GUIDE: dict[str, IndicatorGuide] = {
    "unstable_predictions": IndicatorGuide(
        title="Unstable predictions",
        measures="share of examples whose predicted class differs between two forward passes "
        "of the same input",
        concerns="the examples whose two predictions disagree",
        action="the model is randomised (dropout or noise active in eval mode), so a "
        "gradient attack follows one random draw; attack the expectation over the "
        "randomness (EOT, Athalye et al. 2018) or make the model deterministic",
    ),
    "masked_gradients": IndicatorGuide(
        title="Masked gradients",
        measures="share of the correctly classified examples whose input gradient of the "
        "attack's loss is zero or not finite",
        concerns="the correctly classified examples with a zero or non-finite gradient",
        action="gradients are masked (a saturated softmax, a gradient-stopping or "
        "non-differentiable layer), so gradient attacks cannot move; use the DLR loss "
        "(apgd with loss: dlr, or autoattack), a black-box attack (square), or a "
        "differentiable approximation of the masking layer (BPDA)",
    ),
    "iterative_weaker": IndicatorGuide(
        title="Iterative attack weaker than one step",
        measures="accuracy under the iterative attack minus accuracy under one step of size "
        "ε (FGSM for L∞, FGM for L2) at the same ε",
        concerns="the examples that resist the iterative attack but not the single step",
        action="the iterative attack is failing (step size, too few steps, or masked "
        "gradients); raise its steps or use apgd, which sets its step size itself",
    ),
    "eps_not_monotone": IndicatorGuide(
        title="Accuracy not falling as ε grows",
        measures="with a list of ε: the largest rise in accuracy from one listed ε to the "
        "next; with one ε: accuracy at ε minus accuracy at ε/2",
        concerns="the examples broken at the smaller ε but not at the larger one",
        action="a larger budget should never help the model; the attack's optimisation "
        "fails (gradient masking or a step size that does not scale with eps)",
    ),
    "unbounded_not_broken": IndicatorGuide(
        title="Not broken with ε covering the whole input box",
        measures="accuracy of the iterative attack when ε allows any input",
        concerns="the examples still classified correctly",
        action="with every input allowed the attack should reach ≈ 0; it cannot follow the "
        "gradient (masking, saturation) or is cut short; check its steps and loss",
    ),
    "black_box_stronger": IndicatorGuide(
        title="Black-box attack stronger than white-box",
        measures="accuracy under the white-box attack minus accuracy under the gradient-free "
        "Square attack (1000 queries) at the same ε and norm",
        concerns="the examples broken by the black-box attack only",
        action="a gradient-free attack beats the white-box one, the classic sign of "
        "gradient masking; trust the lower number and audit with autoattack",
    ),
    "not_converged": IndicatorGuide(
        title="Optimisation not converged",
        measures="share of the examples APGD left correct whose best loss still rose by more "
        "than 5% of its total rise over the last tenth of the steps",
        concerns="the examples whose loss was still rising",
        action="the optimisation has not converged; raise steps (or restarts)",
    ),
}
