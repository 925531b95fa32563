"""bf16 sweeps confirmed in fp32 near their boundaries (docs/method.md, "Precision").

bf16 arithmetic flips the prediction of the few examples whose top two logits are closest,
so a bf16 accuracy differs from fp32's by a few examples. How many is measured in the run
itself: some variants are evaluated in both precisions (the unfiltered network per attack and,
per sweep, its variant nearest half the scope removed, where the network is most damaged and
its logits least decided), and the largest difference, doubled and never under one example,
is the accuracy margin ``d``. Every response value of a bf16 sweep is then taken to be within
``d`` of fp32's, and that bound is carried through the scores: a score is a Simpson integral
of ψ(α)/ψ⁰ (ψ⁰ is fp32's, measured exactly), so it moves by at most ``S·d/ψ⁰``, where ``S`` is
the sum of the magnitudes of Simpson's weights. A sweep is re-run in fp32 when one of the
quantities its label, targeted flag or a check compares with a boundary lies within that
margin of the boundary; the final labels and decisions are then fp32's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
from scipy.integrate import simpson

from .results import SweepResult
from .scores import alpha_hat, normalisers

# The measured largest difference is doubled for the variants that were not measured in
# both precisions: they can flip a few more examples than the sampled ones did.
SAFETY = 2.0


@cache
def simpson_weight_sum(n: int) -> float:
    """Σ|wₖ| of the Simpson rule over ``n`` points on α̂ ∈ [0, 1] (as ``scores.integrate``
    computes it): the most an integral moves when every point moves by at most 1."""
    x = alpha_hat(n)
    weights = [simpson(np.eye(n)[k], x=x) for k in range(n)]
    return float(np.sum(np.abs(weights)))


@dataclass(frozen=True)
class PairedVariant:
    """One variant evaluated in both precisions: (clean, adversarial) accuracy of each."""

    where: str
    fp32: tuple[float, float]
    bf16: tuple[float, float]

    @property
    def delta(self) -> float:
        return max(abs(a - b) for a, b in zip(self.fp32, self.bf16, strict=True))


@dataclass
class Calibration:
    """The variants measured in both precisions and the accuracy margin they give."""

    n_examples: int
    pairs: list[PairedVariant] = field(default_factory=list)

    @property
    def max_delta(self) -> float:
        return max((p.delta for p in self.pairs), default=0.0)

    def of_group(self, filter_name: str, attack_id: str) -> Calibration:
        """The pairs one (filter, attack) group measured: the unfiltered network under the
        attack and the group's own variants. Each group's margin comes from these alone, so a
        sweep is confirmed or not whatever ran before it in the process: a serial run, xdist
        workers, CI shards and the sweep cache make the same decisions."""
        mine = f"{filter_name} {attack_id} "
        return Calibration(
            self.n_examples,
            [
                p
                for p in self.pairs
                if p.where == f"unfiltered {attack_id}" or p.where.startswith(mine)
            ],
        )

    @property
    def margin(self) -> float:
        """``d``: the most a bf16 accuracy is taken to differ from fp32's."""
        return self.margin_for(self.n_examples)

    def margin_for(self, examples: int) -> float:
        """``d`` for an accuracy over ``examples`` (a sequential sweep's, fewer than the set's):
        the largest measured difference doubled, never under one example."""
        return SAFETY * max(self.max_delta, 1.0 / examples)

    def to_json(self) -> dict[str, object]:
        deltas = [p.delta for p in self.pairs]
        return {
            "variants": len(self.pairs),
            "max_abs_accuracy_difference": self.max_delta,
            "mean_abs_accuracy_difference": float(np.mean(deltas)) if deltas else 0.0,
            "safety_factor": SAFETY,
            "accuracy_margin": self.margin,
            "pairs": [
                {"where": p.where, "fp32": list(p.fp32), "bf16": list(p.bf16)} for p in self.pairs
            ],
        }


@dataclass(frozen=True)
class ScoreMargins:
    """How far each score of one bf16 sweep may be from fp32's."""

    clean: float
    adversarial: float
    difference: float


def score_margins(
    sweep: SweepResult, accuracy_margin: float, reference: tuple[float, float]
) -> ScoreMargins:
    """Bounds on |φ(bf16) − φ(fp32)| for ``sweep`` when every response value of it is within
    ``accuracy_margin`` of fp32's and ``reference`` (ψc⁰, ψa⁰) is fp32's own."""
    psi_c0, psi_a0, _ = normalisers(*reference)
    s = simpson_weight_sum(len(sweep.thresholds)) * accuracy_margin
    return ScoreMargins(
        clean=s / psi_c0, adversarial=s / psi_a0, difference=s / psi_c0 + s / psi_a0
    )


def near_boundary(
    sweep: SweepResult,
    margins: ScoreMargins,
    tolerance: float,
    check_values: Sequence[tuple[str, float, float, float]] = (),
) -> list[str]:
    """What puts ``sweep`` within its margin of a boundary (empty: bf16 decides it as fp32
    would). ``check_values``: (name, value, boundary, margin) of checks reading the sweep
    beyond its labels and targeted flag (a score drop against its limit)."""
    reasons = []
    for response in ("clean", "adversarial"):
        m = getattr(margins, response)
        area = getattr(sweep.antifragile_area, response)
        phi = getattr(sweep.scores, response)
        if abs(area - tolerance) <= m:
            reasons.append(f"{response} antifragile area {area:.4f} within {m:.4f} of {tolerance}")
        if abs(phi + tolerance) <= m:
            reasons.append(f"{response} score {phi:.4f} within {m:.4f} of {-tolerance}")
    if abs(sweep.scores.difference + tolerance) <= margins.difference:
        reasons.append(
            f"difference score {sweep.scores.difference:.4f} within {margins.difference:.4f} "
            f"of {-tolerance}"
        )
    for name, value, boundary, margin in check_values:
        if abs(value - boundary) <= margin:
            reasons.append(f"{name} {value:.4f} within {margin:.4f} of {boundary}")
    return reasons


def largest_difference(a: SweepResult, b: SweepResult) -> float:
    """The largest |Δ accuracy| between two evaluations of one sweep, over its thresholds."""
    return max(
        max(abs(x - y) for x, y in zip(a.clean_accuracy, b.clean_accuracy, strict=True)),
        max(
            abs(x - y) for x, y in zip(a.adversarial_accuracy, b.adversarial_accuracy, strict=True)
        ),
    )


def calibration_index(sweep: SweepResult) -> int | None:
    """The threshold of ``sweep`` evaluated in both precisions: the one whose removed fraction
    is nearest one half, among those that remove something and not everything."""
    inside = [(abs(r - 0.5), k) for k, r in enumerate(sweep.removed_fraction) if 0.0 < r < 1.0]
    return min(inside)[1] if inside else None


def calibration_from_json(n_examples: int, record: dict[str, Any] | None) -> Calibration:
    """A ``Calibration`` back from its results.json form (``Calibration.to_json``)."""
    pairs = [
        PairedVariant(p["where"], tuple(p["fp32"]), tuple(p["bf16"]))
        for p in (record or {}).get("pairs", [])
    ]
    return Calibration(n_examples, pairs)


def compute_summary(
    head: dict[str, Any], calibration: Calibration | None, sweeps: list[dict[str, Any]]
) -> dict[str, Any]:
    """results.json's ``compute`` from its settings (``head``), the calibration and each bf16
    sweep's record: the same whether the sweeps were computed, read from the sweep cache or
    joined from CI shards."""
    checked = [
        s["fp32_max_abs_accuracy_difference"]
        for s in sweeps
        if "fp32_max_abs_accuracy_difference" in s
    ]
    return head | {
        "calibration": None if calibration is None else calibration.to_json(),
        "sweeps": sweeps,
        "confirmed": sum(1 for s in sweeps if s["confirmed"]),
        # Over the confirmed sweeps' every threshold: how far bf16 really was from fp32.
        "confirmed_max_abs_accuracy_difference": max(checked, default=None),
        "confirmed_beyond_margin": sum(
            1
            for s in sweeps
            if s.get("fp32_max_abs_accuracy_difference", 0.0) > s["accuracy_margin"]
        ),
    }


def merge_compute_records(
    records: Sequence[dict[str, Any] | None], n_examples: int
) -> dict[str, Any] | None:
    """One ``compute`` record from several runs' (CI shards) over disjoint sweeps: their
    sweep records side by side, their calibration pairs together (each once)."""
    present = [r for r in records if r is not None]
    if not present:
        return None
    first = present[0]
    head: dict[str, Any] = {
        k: first[k] for k in ("precision", "memory_format", "confirm") if k in first
    }
    pairs: dict[str, dict[str, Any]] = {}
    for r in present:
        for pair in (r.get("calibration") or {}).get("pairs", []):
            pairs.setdefault(pair["where"], pair)
    calibrated = any(r.get("calibration") is not None for r in present)
    calibration = (
        calibration_from_json(n_examples, {"pairs": list(pairs.values())}) if calibrated else None
    )
    return compute_summary(head, calibration, [s for r in present for s in r.get("sweeps", [])])
