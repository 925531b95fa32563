"""Scores and labels (docs/method.md §4), from accuracy curves to fragile / robust / antifragile.

Integrals use composite Simpson's rule over the normalised threshold α̂ₖ = k/(n − 1), exactly
as ``scipy.integrate.simpson`` computes it (the reference notebooks' ``rob_value``).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch
from scipy.integrate import simpson
from torch import nn

from .results import Label, Labels, Scores, SweepResult


def alpha_hat(n: int) -> np.ndarray:
    """Normalised thresholds k/(n − 1), k = 0 … n − 1: α̂ always runs 0 → 1 in sweep order."""
    return np.arange(n, dtype=np.float64) / (n - 1)


def integrate(curve: Sequence[float] | np.ndarray) -> float:
    """∫ curve dα̂ over [0, 1] by composite Simpson's rule."""
    y = np.asarray(curve, dtype=np.float64)
    return float(simpson(y, x=alpha_hat(len(y))))


def baseline(removed_fraction: Sequence[float] | np.ndarray) -> np.ndarray:
    """b(α) = 1 − ρ(α): performance falling exactly in proportion to the weights removed."""
    return 1.0 - np.asarray(removed_fraction, dtype=np.float64)


#: Simpson's sum rounds: a curve whose φ is exactly −τ on paper (τ = 0.05, say) computes as
#: −0.05000000000000001. Comparisons with τ allow this much, so a score on the boundary stays on
#: the side the definition puts it (the inequalities are strict).
ROUNDING = 1e-12


def label_of(
    response: np.ndarray, base: np.ndarray, tolerance: float
) -> tuple[Label, float, float]:
    """Label one normalised response curve; returns (label, φ, antifragile area).

    Antifragile when removing weights improves performance by more than τ in area,
    else fragile when the curve falls below the baseline by more than τ in area, else robust.
    """
    phi = integrate(response - base)
    gain = integrate(np.maximum(0.0, response - 1.0))
    if gain > tolerance + ROUNDING:
        return "antifragile", phi, gain
    if phi < -tolerance - ROUNDING:
        return "fragile", phi, gain
    return "robust", phi, gain


@dataclass(frozen=True)
class ScoredCurves:
    scores: Scores
    labels: Labels
    targeted: bool
    antifragile_area: Scores
    adversarial_normalised_by: str

    def as_fields(self) -> dict[str, Any]:
        """These values by name, as a ``SweepResult`` holds them (shallow: no copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def normalisers(clean_reference: float, adversarial_reference: float) -> tuple[float, float, str]:
    """ψc⁰ and the adversarial normaliser: ψa⁰, or ψc⁰ when ψa⁰ = 0 (then the report says so).

    A network with no correct clean prediction cannot be normalised at all: its curves are
    then used as raw accuracies ("raw").
    """
    if clean_reference <= 0.0:
        return 1.0, 1.0, "raw"
    if adversarial_reference <= 0.0:
        return clean_reference, clean_reference, "clean"
    return clean_reference, adversarial_reference, "adversarial"


def score_curves(
    clean_accuracy: Sequence[float],
    adversarial_accuracy: Sequence[float],
    removed_fraction: Sequence[float],
    *,
    clean_reference: float,
    adversarial_reference: float,
    tolerance: float,
) -> ScoredCurves:
    """The three filtering scores φc, φa, φΔ, both labels, and whether the attack targets the
    scope."""
    psi_c0, psi_a0, normalised_by = normalisers(clean_reference, adversarial_reference)
    rc = np.asarray(clean_accuracy, dtype=np.float64) / psi_c0
    ra = np.asarray(adversarial_accuracy, dtype=np.float64) / psi_a0
    base = baseline(removed_fraction)
    clean_label, phi_c, gain_c = label_of(rc, base, tolerance)
    adversarial_label, phi_a, gain_a = label_of(ra, base, tolerance)
    phi_d = integrate(ra - rc)
    return ScoredCurves(
        scores=Scores(clean=phi_c, adversarial=phi_a, difference=phi_d),
        labels=Labels(clean=clean_label, adversarial=adversarial_label),
        targeted=phi_d < -tolerance - ROUNDING,
        antifragile_area=Scores(clean=gain_c, adversarial=gain_a, difference=0.0),
        adversarial_normalised_by=normalised_by,
    )


class ScopeLayer(Protocol):
    """What ``scope_members`` reads of an analysed layer (``layers.AnalysedLayer``)."""

    @property
    def name(self) -> str: ...

    @property
    def parameters(self) -> Sequence[torch.Tensor]: ...


Members = Mapping[str, Sequence[tuple[str, int]]]  # layer -> (tensor name, numel) of its scope


def scope_members(
    model: nn.Module, layers: Iterable[ScopeLayer]
) -> dict[str, list[tuple[str, int]]]:
    """Each analysed layer's scope as (tensor name, numel) pairs, for ``fragile_fraction``.

    A tensor is named by its first name in ``model`` (``named_parameters`` order), so a weight
    tied into several layers has one name wherever it appears and is counted once.
    """
    names: dict[int, str] = {}
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        names.setdefault(id(tensor), name)
    return {
        layer.name: [
            (names.get(id(t), f"{layer.name}[{i}]"), t.numel())
            for i, t in enumerate(layer.parameters)
        ]
        for layer in layers
    }


def held_tensors(sweep: SweepResult, members: Members | None) -> Sequence[tuple[Hashable, int]]:
    """What a local sweep's scope holds, as (tensor key, numel): its tensors by name when
    ``members`` (from ``scope_members``) knows the layer, else the layer as one block."""
    layer = sweep.layer or ""
    if members is not None and layer in members:
        return members[layer]
    return [(("layer", layer), sweep.numel)]


def fragile_fraction(
    local_sweeps: Sequence[SweepResult], response: str, members: Members | None = None
) -> tuple[float, list[str]]:
    """Weights in layers labelled fragile / weights in all analysed layers, and those layers.

    ``members`` (from ``scope_members``) says which tensors each layer's scope holds: a tensor
    shared by several layers (tied weights) is one set of weights, counted once in the total
    and counted as fragile when any layer holding it is labelled fragile, since filtering it
    hurts through that layer. Without ``members`` each layer counts its own ``numel``.
    The layers come back worst first (most negative score), which is what a failing check shows.
    """

    sizes = {key: numel for s in local_sweeps for key, numel in held_tensors(s, members)}
    fragile = [s for s in local_sweeps if getattr(s.labels, response) == "fragile"]
    fragile.sort(key=lambda s: getattr(s.scores, response))
    fragile_keys = {key for s in fragile for key, _ in held_tensors(s, members)}
    total = sum(sizes.values())
    fraction = sum(sizes[key] for key in fragile_keys) / total if total else 0.0
    return fraction, [s.layer or "" for s in fragile]
