"""How sure each number and decision is (``statistics:`` in the spec; docs/method.md).

Everything here is computed from per-example outcomes (which examples each network variant
classified correctly, clean and adversarial), so no forward pass is repeated:

* each accuracy gets a Wilson score interval (Wilson 1927), which keeps its coverage near 0
  and 1 where the normal approximation does not;
* every quantity read from a curve (φc, φa, φΔ, the antifragile areas, the labels, the
  targeted flag, the fragile fraction and the checks' measured values) gets a *paired*
  bootstrap over examples (Efron & Tibshirani 1993): one resample of the example indices is
  applied to the unfiltered network and to every threshold of every sweep of the model, so a
  resampled curve is the curve a test set of that draw would have given. Intervals are the
  resamples' percentiles. A resample is held as how many times it draws each example, so one
  matrix product gives every resample's accuracy at every threshold (vectorised over
  resamples; nothing loops over them in Python).

Decisions (``decide``): ``estimate`` compares the measured value with the limit (the default
and the behaviour without statistics); ``strict`` passes only when the whole interval is
within the limit; ``lenient`` fails only when the whole interval is beyond it. A decision is
*certain* when the whole interval lies on one side of the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.integrate import simpson
from scipy.stats import norm

from .results import SweepOutcomes, SweepStatistics
from .scores import ROUNDING, alpha_hat

Decide = Literal["estimate", "strict", "lenient"]
Direction = Literal["max", "min"]  # the measured value must stay <= or >= the limit
LABELS: tuple[str, ...] = ("fragile", "robust", "antifragile")
_FRAGILE, _ROBUST, _ANTIFRAGILE = range(3)


# --------------------------------------------------------------------------- intervals
def wilson_interval(
    successes: int | np.ndarray, n: int, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval of a proportion ``successes / n`` (vectorised)."""
    k = np.asarray(successes, dtype=np.float64)
    if n <= 0:
        return np.zeros_like(k), np.ones_like(k)
    z = float(norm.ppf(0.5 + confidence / 2.0))
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def accuracy_interval(accuracy: float, n: int, confidence: float) -> list[float]:
    """Wilson interval of an accuracy measured on ``n`` examples."""
    lo, hi = wilson_interval(round(accuracy * n), n, confidence)
    return [float(lo), float(hi)]


def percentile_interval(draws: np.ndarray, confidence: float) -> list[float]:
    """The central ``confidence`` interval of bootstrap draws (NaN draws ignored)."""
    finite = np.asarray(draws, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return [float("nan"), float("nan")]
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(finite, [tail, 1.0 - tail])
    return [float(lo), float(hi)]


# --------------------------------------------------------------------------- resampling
def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` draws of ``n`` example indices with replacement, seeded: (resamples, n)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def resample_weights(indices: np.ndarray) -> np.ndarray:
    """How many times each resample draws each example: (resamples, n) float32 counts, so
    that ``weights @ bits.T`` is every resample's number of correct examples at once."""
    resamples, n = indices.shape
    offsets = indices + (np.arange(resamples) * n)[:, None]
    counts = np.bincount(offsets.ravel(), minlength=resamples * n)
    return counts.reshape(resamples, n).astype(np.float32)


def simpson_weights(points: int) -> np.ndarray:
    """w with ``y @ w == scores.integrate(y)`` for curves of ``points`` values (Simpson's rule
    is linear in y, so integrating the unit vectors gives its weights)."""
    return np.asarray(simpson(np.eye(points), x=alpha_hat(points), axis=-1), dtype=np.float64)


# --------------------------------------------------------------------------- one sweep
@dataclass(frozen=True)
class SweepDraws:
    """One sweep's quantities under every resample (arrays of length ``resamples``)."""

    scores: dict[str, np.ndarray]  # clean, adversarial, difference
    antifragile_area: dict[str, np.ndarray]  # clean, adversarial
    labels: dict[str, np.ndarray]  # clean, adversarial: codes into LABELS
    targeted: np.ndarray  # bool

    def fragile(self, response: str) -> np.ndarray:
        return self.labels[response] == _FRAGILE


def _label_codes(phi: np.ndarray, gain: np.ndarray, tolerance: float) -> np.ndarray:
    """``scores.label_of`` for every resample at once."""
    codes = np.full(phi.shape, _ROBUST, dtype=np.int8)
    codes[phi < -tolerance - ROUNDING] = _FRAGILE
    codes[gain > tolerance + ROUNDING] = _ANTIFRAGILE
    return codes


def bootstrap_sweep(
    outcomes: SweepOutcomes,
    removed_fraction: Sequence[float],
    weights: np.ndarray,
    tolerance: float,
) -> SweepDraws:
    """Scores, labels and targeted flag of one sweep under each resample in ``weights``.

    Mirrors ``scores.score_curves`` (normalisers included: ψa⁰ = 0 normalises by ψc⁰, ψc⁰ = 0
    leaves raw accuracies), with the unfiltered network resampled together with the curve.
    """
    bits = np.concatenate(
        [
            outcomes.unpacked(outcomes.clean),
            outcomes.unpacked(outcomes.adversarial),
            outcomes.unpacked(outcomes.unfiltered_clean)[None],
            outcomes.unpacked(outcomes.unfiltered_adversarial)[None],
        ]
    ).astype(np.float32)
    accuracy = (weights @ bits.T).astype(np.float64) / outcomes.n  # (resamples, 2T + 2)
    t = outcomes.clean.shape[0]
    psi_c, psi_a = accuracy[:, :t], accuracy[:, t : 2 * t]
    psi_c0, psi_a0 = accuracy[:, 2 * t], accuracy[:, 2 * t + 1]
    raw = psi_c0 <= 0.0
    clean_norm = np.where(raw, 1.0, psi_c0)
    adversarial_norm = np.where(raw, 1.0, np.where(psi_a0 <= 0.0, psi_c0, psi_a0))
    rc = psi_c / clean_norm[:, None]
    ra = psi_a / adversarial_norm[:, None]
    w = simpson_weights(t)
    base = 1.0 - np.asarray(removed_fraction, dtype=np.float64)
    phi_c, phi_a, phi_d = (rc - base) @ w, (ra - base) @ w, (ra - rc) @ w
    gain_c, gain_a = np.maximum(0.0, rc - 1.0) @ w, np.maximum(0.0, ra - 1.0) @ w
    return SweepDraws(
        scores={"clean": phi_c, "adversarial": phi_a, "difference": phi_d},
        antifragile_area={"clean": gain_c, "adversarial": gain_a},
        labels={
            "clean": _label_codes(phi_c, gain_c, tolerance),
            "adversarial": _label_codes(phi_a, gain_a, tolerance),
        },
        targeted=phi_d < -tolerance - ROUNDING,
    )


def sweep_statistics(
    outcomes: SweepOutcomes, draws: SweepDraws, confidence: float
) -> SweepStatistics:
    """What results.json records of one sweep: Wilson bands and bootstrap intervals."""

    def bands(packed: np.ndarray) -> list[list[float]]:
        correct = outcomes.unpacked(packed).sum(axis=1)
        lo, hi = wilson_interval(correct, outcomes.n, confidence)
        return [[float(a), float(b)] for a, b in zip(lo, hi, strict=True)]

    resamples = len(draws.targeted)
    return SweepStatistics(
        confidence=confidence,
        resamples=resamples,
        clean_accuracy_ci=bands(outcomes.clean),
        adversarial_accuracy_ci=bands(outcomes.adversarial),
        scores_ci={k: percentile_interval(v, confidence) for k, v in draws.scores.items()},
        antifragile_area_ci={
            k: percentile_interval(v, confidence) for k, v in draws.antifragile_area.items()
        },
        label_probability={
            response: {label: float(np.mean(codes == i)) for i, label in enumerate(LABELS)}
            for response, codes in draws.labels.items()
        },
        targeted_probability=float(np.mean(draws.targeted)),
    )


# --------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Sampling:
    """What the checks read to give their measured values an interval and decide on it."""

    confidence: float
    decide: Decide
    n: int  # examples in the test set
    draws: Callable[[str, str], list[SweepDraws]]  # (filter, attack) -> aligned with sweeps
    # Examples an unfiltered accuracy was measured on (None: clean accuracy, else the attack),
    # when that is not ``n`` (``statistics.sequential`` stops those too once decided).
    examples: Callable[[str | None], int] | None = None


def fragile_fraction_draws(
    draws: Sequence[SweepDraws],
    held: Sequence[Sequence[tuple[Hashable, int]]],
    response: str,
) -> np.ndarray:
    """The fragile-parameter fraction of local sweeps under each resample.

    ``held[i]`` is what sweep i's scope holds, as (tensor key, numel): a tensor held by several
    layers (tied weights) counts once, and as fragile when any layer holding it is fragile —
    the same rule as ``scores.fragile_fraction``.
    """
    keys = list(dict.fromkeys(key for scope in held for key, _ in scope))
    if not draws or not keys:
        return np.zeros(0)
    sizes = dict(pair for scope in held for pair in scope)
    index = {key: i for i, key in enumerate(keys)}
    holders = np.zeros((len(keys), len(draws)), dtype=bool)
    for j, scope in enumerate(held):
        for key, _ in scope:
            holders[index[key], j] = True
    fragile = np.stack([d.fragile(response) for d in draws]).astype(bool)  # sweeps × resamples
    tensor_fragile = (holders.astype(np.int64) @ fragile.astype(np.int64)) > 0
    numels = np.array([sizes[key] for key in keys], dtype=np.float64)
    total = numels.sum()
    return numels @ tensor_fragile / total if total > 0 else np.zeros(fragile.shape[1])


def targeted_count_draws(draws: Sequence[SweepDraws]) -> np.ndarray:
    """How many of the sweeps an attack targets, under each resample."""
    if not draws:
        return np.zeros(0)
    return np.stack([d.targeted for d in draws]).sum(axis=0).astype(np.float64)


def within(value: float, limit: float, direction: Direction) -> bool:
    return value <= limit if direction == "max" else value >= limit


def decide(
    measured: float,
    limit: float,
    ci: Sequence[float] | None,
    direction: Direction,
    mode: Decide,
) -> tuple[bool, bool | None]:
    """(passed, certain) of a check whose measured value must stay on ``direction``'s side of
    ``limit``, given its interval ``ci`` (None: nothing was sampled, the value is exact).

    ``estimate`` decides by ``measured``; ``strict`` passes only when the whole interval is
    within the limit; ``lenient`` fails only when the whole interval is beyond it. Certain:
    the whole interval is on one side of the limit (an exact value is always certain).
    """
    if ci is None or any(not np.isfinite(v) for v in ci):
        return within(measured, limit, direction), None if ci is not None else True
    lo, hi = float(ci[0]), float(ci[1])
    all_within = within(hi, limit, direction) and within(lo, limit, direction)
    all_beyond = not within(hi, limit, direction) and not within(lo, limit, direction)
    if mode == "strict":
        passed = all_within
    elif mode == "lenient":
        passed = not all_beyond
    else:
        passed = within(measured, limit, direction)
    return passed, all_within or all_beyond
