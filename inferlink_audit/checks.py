"""The spec's thresholds, as planned items and as evaluated results: every check's logic.

Planning needs only the spec (no torch work), so the pytest plugin can collect items cheaply.
Evaluation is a table of rules, one evaluator per check name (as pytest-benchmark's compare
rules each own their ``fails()``); an evaluator reads exactly the measurements its item needs
through the small ``Measurements`` protocol, which ``AuditSession`` provides lazily. Nothing
here imports the session: the regression checks are pure functions of the planned check, the
current sweeps and the released model's results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .attack_sanity import Indicator, applicable, iterative
from .errors import AuditError, UnsupportedError
from .results import (
    EXAMPLES_KEPT,
    RESPONSES,
    AttackResult,
    AuditResult,
    CheckResult,
    LipschitzResult,
    ModelResult,
    SweepResult,
    UnitSemanticsResult,
)
from .scores import Members, fragile_fraction, held_tensors
from .spec import AttackSpec, AuditSpec
from .statistics import (
    Direction,
    Sampling,
    SweepDraws,
    accuracy_interval,
    decide,
    fragile_fraction_draws,
    percentile_interval,
    targeted_count_draws,
)

MODEL_CHECKS = ("min_clean_accuracy", "max_lipschitz_upper_bound", "min_adversarial_gain")
ATTACK_CHECKS = ("min_adversarial_accuracy",)
SWEEP_CHECKS = (
    "max_fragile_fraction",
    "max_targeted_layers",
    "no_new_fragile_layers",
    "max_score_drop",
)
SWEEP_ONLY = "sweep"  # the item that passes once its sweep is computed (a spec with no checks)
REMEDIATION_ONLY = "remediation"  # runs selective retraining when no gain is asserted
TRANSFER_ONLY = "transfer"  # measures transferability across the compared models
UNITS_ONLY = "unit_semantics"  # analysis.units: reported, never asserted (units.py)
# Items that assert nothing: each passes once what it measures is computed.
MEASUREMENTS = (SWEEP_ONLY, REMEDIATION_ONLY, TRANSFER_ONLY, UNITS_ONLY)


def is_check(planned: PlannedCheck) -> bool:
    """Whether the item asserts a threshold (and so has a CheckResult in results.json)."""
    return planned.check not in MEASUREMENTS


@dataclass(frozen=True)
class PlannedCheck:
    """One test item: a check, at the granularity the design gives it."""

    id: str
    check: str
    filter: str | None
    attack: str | None
    limit: float
    line: int | None
    label: str  # what the first line of a failure names, e.g. "low_pass fgsm(eps=0.1)"
    response: str = "adversarial"  # the curve a fragile fraction is read from (``on:``)


def _limit(spec: AuditSpec, key: str) -> float | None:
    if key == "min_adversarial_gain":
        if spec.remediation is None:
            return None
        gain = spec.remediation.selective_retrain.min_adversarial_gain
        return None if gain is None else float(gain)
    value = getattr(spec.checks, key)
    if key == "max_fragile_fraction":
        return None if value is None else float(value.value)
    if key == "no_new_fragile_layers":
        return 0.0 if value else None
    return None if value is None else float(value)


def plan_checks(spec: AuditSpec) -> list[PlannedCheck]:
    """Every item the spec asks for, in a stable order: model, per attack, per filter × attack."""
    planned: list[PlannedCheck] = []
    attacks = spec.attack_specs
    for key in MODEL_CHECKS:
        limit = _limit(spec, key)
        if limit is not None:
            line = (
                spec.line_of("remediation", "selective_retrain", key)
                if key == "min_adversarial_gain"
                else spec.line_of("checks", key)
            )
            planned.append(PlannedCheck(key, key, None, None, limit, line, spec.name))
    for key in ATTACK_CHECKS:
        # One item per attack and per ε of an attack that lists several (an ε curve).
        for attack in spec.attack_points:
            limit = spec.checks.min_adversarial_limit(attack)
            if limit is not None:
                planned.append(
                    PlannedCheck(
                        f"{attack.id}-{key}",
                        key,
                        None,
                        attack.id,
                        limit,
                        _per_eps_line(spec, key, attack),
                        attack.label,
                    )
                )
    planned.extend(_sanity_checks(spec))
    if spec.remediation is not None and _limit(spec, "min_adversarial_gain") is None:
        line = spec.line_of("remediation")
        planned.append(
            PlannedCheck(REMEDIATION_ONLY, REMEDIATION_ONLY, None, None, 0.0, line, spec.name)
        )
    if spec.compare:
        line = spec.line_of("compare")
        planned.append(PlannedCheck(TRANSFER_ONLY, TRANSFER_ONLY, None, None, 0.0, line, spec.name))
    if spec.analysis.units is not None:
        line = spec.line_of("analysis", "units")
        planned.append(PlannedCheck(UNITS_ONLY, UNITS_ONLY, None, None, 0.0, line, spec.name))
    sweep_keys = [key for key in SWEEP_CHECKS if _limit(spec, key) is not None]
    fraction = spec.checks.max_fragile_fraction
    fragile_response = fraction.on if fraction is not None else "adversarial"
    for filter_name in spec.filtering.filters:
        for attack in attacks:
            label = f"{filter_name} {attack.label}"
            for key in sweep_keys:
                planned.append(
                    PlannedCheck(
                        f"{filter_name}-{attack.id}-{key}",
                        key,
                        filter_name,
                        attack.id,
                        float(_limit(spec, key) or 0.0),
                        spec.line_of("checks", key),
                        label,
                        response=fragile_response,
                    )
                )
    if not any(is_check(p) and p.check not in SANITY_LIMITS for p in planned):
        for filter_name in spec.filtering.filters:
            for attack in attacks:
                planned.append(
                    PlannedCheck(
                        f"{filter_name}-{attack.id}",
                        SWEEP_ONLY,
                        filter_name,
                        attack.id,
                        0.0,
                        spec.line_of("filtering"),
                        f"{filter_name} {attack.label}",
                    )
                )
    return planned


def _per_eps_line(spec: AuditSpec, key: str, attack: AttackSpec) -> int | None:
    """The spec line of an attack's limit: the ``{eps, value}`` item when given per ε."""
    limits = getattr(spec.checks, key)
    if isinstance(limits, list):
        eps = getattr(attack, "eps", None)
        index = next((i for i, p in enumerate(limits) if p.eps == eps), None)
        if index is not None:
            return spec.line_of("checks", key, index)
    return spec.line_of("checks", key)


# Attack-failure indicators (attack_sanity.py): the most each may measure and still pass.
SANITY_LIMITS = {
    "unstable_predictions": 0.0,  # share of examples whose two forward passes disagree
    "masked_gradients": 0.05,  # share of correct examples with a zero or non-finite gradient
    "iterative_weaker": 0.01,  # accuracy above the single-step attack's at the same eps
    "eps_not_monotone": 0.01,  # accuracy at eps above accuracy at eps/2
    "unbounded_not_broken": 0.05,  # accuracy when eps covers the whole input box
    "black_box_stronger": 0.10,  # accuracy above the Square attack's at the same eps
    "not_converged": 0.10,  # share of unbroken examples whose APGD loss still rises late
}


def sanity_enabled(spec: AuditSpec) -> bool:
    """``checks.attack_sanity``, by default on when the spec lists an iterative gradient
    attack (pgd, apgd, autoattack)."""
    setting = spec.checks.attack_sanity
    return any(iterative(a) for a in spec.attack_specs) if setting is None else setting


def _sanity_checks(spec: AuditSpec) -> list[PlannedCheck]:
    """The indicator items: the model's prediction stability, then each attack's indicators."""
    attacks = [a for a in spec.attack_specs if applicable(a)]
    if not sanity_enabled(spec) or not attacks:
        return []
    line = spec.line_of("checks", "attack_sanity")
    name = "unstable_predictions"
    planned = [PlannedCheck(name, name, None, None, SANITY_LIMITS[name], line, spec.name)]
    for attack in attacks:
        for name in applicable(attack):
            planned.append(
                PlannedCheck(
                    f"{attack.id}-{name}",
                    name,
                    None,
                    attack.id,
                    SANITY_LIMITS[name],
                    line,
                    attack.label,
                )
            )
    return planned


class BaselineError(AuditError):
    """The baseline cannot be compared with: it holds no model of the spec's name, or no sweep
    of the filter and attack a regression check needs."""


class Measurements(Protocol):
    """What the checks read from one model's audit; the session computes each lazily, once."""

    def clean_accuracy(self) -> float: ...

    def attack_result(self, attack_id: str) -> AttackResult: ...

    def sweeps(self, filter_name: str, attack_id: str) -> list[SweepResult]: ...

    @property
    def lipschitz(self) -> LipschitzResult: ...

    def remediation(self) -> dict[str, Any] | None: ...

    def transfer(self) -> list[dict[str, Any]]: ...

    def baseline_model(self) -> ModelResult: ...

    def scope_members(self) -> Members: ...

    def attack_indicator(self, name: str, attack_id: str | None, limit: float) -> Indicator: ...

    def unit_semantics(self) -> UnitSemanticsResult | None: ...


Evaluator = Callable[[PlannedCheck, Measurements], CheckResult]


def _layers_text(layers: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(layers[:limit])
    return shown + (f", … {len(layers) - limit} more" if len(layers) > limit else "")


def _local(sweeps: Sequence[SweepResult]) -> list[SweepResult]:
    return [s for s in sweeps if s.scope == "local"]


def _result(
    planned: PlannedCheck,
    measured: float,
    passed: bool,
    detail: str,
    layers: Sequence[str] = (),
) -> CheckResult:
    """The item's verdict; the culprit layers, when there are any, close its detail."""
    if layers:
        detail += f" ({_layers_text(layers)})"
    return CheckResult(
        id=planned.id,
        passed=passed,
        measured=measured,
        limit=planned.limit,
        detail=detail,
        check=planned.check,
        line=planned.line,
        layers=list(layers),
    )


def _sweeps_of(planned: PlannedCheck, measurements: Measurements) -> list[SweepResult]:
    return measurements.sweeps(planned.filter or "", planned.attack or "")


# --------------------------------------------------------------------------- the evaluators
def _min_clean_accuracy(planned: PlannedCheck, m: Measurements) -> CheckResult:
    measured, limit = m.clean_accuracy(), planned.limit
    passed = measured >= limit
    detail = f"clean accuracy {measured:.4f} {'>=' if passed else '<'} min {limit:.4f}"
    return _result(planned, measured, passed, detail)


def _max_lipschitz_upper_bound(planned: PlannedCheck, m: Measurements) -> CheckResult:
    """An unavailable bound fails: a gate that cannot measure must not let the model through."""
    lipschitz, limit = m.lipschitz, planned.limit
    bound = lipschitz.network_upper_bound
    if bound is None or math.isnan(bound):
        # ``reason`` names the operation without a bound where the spectral analysis gives it.
        reason = getattr(lipschitz, "reason", "")
        why = f"network Lipschitz bound unavailable: {reason}" if reason else lipschitz.note
        why = why or "network Lipschitz bound unavailable (no reason recorded)"
        return _result(planned, math.inf, False, f"{why}; cannot assert max {limit:.4g}")
    passed = bound <= limit
    worst = sorted(lipschitz.layers, key=lambda layer: -layer.upper_bound)[:3]
    detail = (
        f"network Lipschitz bound {bound:.4g} {'<=' if passed else '>'} max {limit:.4g}"
        f" (largest layers: {', '.join(f'{x.layer} {x.upper_bound:.3g}' for x in worst)})"
    )
    result = _result(planned, bound, passed, detail)
    # The culprits go into ``layers`` (for the report) without repeating them in the detail.
    return result if passed else replace(result, layers=[x.layer for x in worst])


def _min_adversarial_gain(planned: PlannedCheck, m: Measurements) -> CheckResult:
    remediation = m.remediation()
    if remediation is None:  # planning only asks for this check when the spec remediates
        raise UnsupportedError("min_adversarial_gain needs 'remediation' in the spec")
    selective, control = remediation["selective"], remediation["control"]
    measured = selective["adversarial_after"] - selective["adversarial_before"]
    control_gain = control["adversarial_after"] - control["adversarial_before"]
    passed = measured >= planned.limit
    detail = (
        f"selective retraining adversarial gain {measured:+.4f} "
        f"{'>=' if passed else '<'} min {planned.limit:+.4f} (control: {control_gain:+.4f}; "
        f"frozen: {', '.join(remediation['frozen_layers']) or 'none'})"
    )
    return _result(planned, measured, passed, detail)


def _min_adversarial_accuracy(planned: PlannedCheck, m: Measurements) -> CheckResult:
    attack = m.attack_result(planned.attack or "")
    measured, limit = attack.accuracy, planned.limit
    passed = measured >= limit
    detail = (
        f"adversarial accuracy {measured:.4f} {'>=' if passed else '<'} min {limit:.4f} "
        f"(clean {m.clean_accuracy():.4f}, success rate {attack.success_rate:.4f})"
    )
    return _result(planned, measured, passed, detail)


def _max_fragile_fraction(planned: PlannedCheck, m: Measurements) -> CheckResult:
    measured, layers = fragile_fraction(
        _local(_sweeps_of(planned, m)), planned.response, m.scope_members()
    )
    passed = measured <= planned.limit
    detail = (
        f"{'' if planned.response == 'adversarial' else 'clean '}fragile fraction "
        f"{measured:.2f} {'<=' if passed else '>'} max {planned.limit:.2f}"
    )
    return _result(planned, measured, passed, detail, layers)


def _max_targeted_layers(planned: PlannedCheck, m: Measurements) -> CheckResult:
    local = _local(_sweeps_of(planned, m))
    targeted = sorted((s for s in local if s.targeted), key=lambda s: s.scores.difference)
    layers = [s.layer or "" for s in targeted]
    passed = len(layers) <= planned.limit
    detail = f"{len(layers)} targeted layers {'<=' if passed else '>'} max {int(planned.limit)}"
    return _result(planned, float(len(layers)), passed, detail, layers)


def _sweep_only(planned: PlannedCheck, m: Measurements) -> CheckResult:
    _sweeps_of(planned, m)
    return _result(planned, 0.0, True, "sweep computed")


def _remediation_only(planned: PlannedCheck, m: Measurements) -> CheckResult:
    m.remediation()
    return _result(planned, 0.0, True, "remediation computed")


def _transfer_only(planned: PlannedCheck, m: Measurements) -> CheckResult:
    m.transfer()
    return _result(planned, 0.0, True, "transferability computed")


def _units_only(planned: PlannedCheck, m: Measurements) -> CheckResult:
    m.unit_semantics()
    return _result(planned, 0.0, True, "unit semantics computed")


def _attack_sanity(planned: PlannedCheck, m: Measurements) -> CheckResult:
    """An attack-failure indicator: its detail names the measurement, the examples it
    concerns and, when it fails, what to do."""
    reading = m.attack_indicator(planned.check, planned.attack, planned.limit)
    result = _result(planned, reading.measured, reading.passed, reading.detail)
    examples = list(reading.examples)
    count = len(examples) if reading.count is None else reading.count
    return replace(result, examples=examples[:EXAMPLES_KEPT], examples_count=count)


def _regression(planned: PlannedCheck, m: Measurements) -> CheckResult:
    return regression_check(planned, _sweeps_of(planned, m), m.baseline_model())


EVALUATORS: dict[str, Evaluator] = {
    "min_clean_accuracy": _min_clean_accuracy,
    "max_lipschitz_upper_bound": _max_lipschitz_upper_bound,
    "min_adversarial_gain": _min_adversarial_gain,
    "min_adversarial_accuracy": _min_adversarial_accuracy,
    "max_fragile_fraction": _max_fragile_fraction,
    "max_targeted_layers": _max_targeted_layers,
    "no_new_fragile_layers": _regression,
    "max_score_drop": _regression,
    SWEEP_ONLY: _sweep_only,
    REMEDIATION_ONLY: _remediation_only,
    TRANSFER_ONLY: _transfer_only,
    UNITS_ONLY: _units_only,
    **{name: _attack_sanity for name in SANITY_LIMITS},
}


def evaluate_check(planned: PlannedCheck, measurements: Measurements) -> CheckResult:
    """Measure what ``planned`` needs (computed lazily, once) and compare it with its limit;
    with ``statistics:``, give the measured value its interval and decide as the spec says."""
    evaluator = EVALUATORS.get(planned.check)
    if evaluator is None:
        raise UnsupportedError(
            f"check {planned.check!r} is validated but not supported yet in this version; "
            "remove it from 'checks' to run the audit."
        )
    result = evaluator(planned, measurements)
    # Measurements without ``sampling`` (no statistics) keep today's decision exactly.
    sampling: Sampling | None = getattr(measurements, "sampling", lambda: None)()
    if sampling is None or planned.check not in DIRECTIONS:
        return result
    return decided(planned, result, interval_of(planned, result, measurements, sampling), sampling)


# --------------------------------------------------------------------------- intervals
# Which side of its limit each check's measured value must stay on.
DIRECTIONS: dict[str, Direction] = {
    "min_clean_accuracy": "min",
    "min_adversarial_accuracy": "min",
    "min_adversarial_gain": "min",
    "max_lipschitz_upper_bound": "max",
    "max_fragile_fraction": "max",
    "max_targeted_layers": "max",
    "no_new_fragile_layers": "max",
    "max_score_drop": "max",
}


def _local_draws(
    planned: PlannedCheck, m: Measurements, sampling: Sampling
) -> list[tuple[SweepResult, SweepDraws]]:
    sweeps = _sweeps_of(planned, m)
    draws = sampling.draws(planned.filter or "", planned.attack or "")
    return [(s, d) for s, d in zip(sweeps, draws, strict=True) if s.scope == "local"]


def _regression_draws(planned: PlannedCheck, m: Measurements, sampling: Sampling) -> np.ndarray:
    """``regression_check``'s measured value under each resample (the baseline is fixed)."""
    sweeps = _sweeps_of(planned, m)
    draws = dict(
        zip(
            (id(s) for s in sweeps),
            sampling.draws(planned.filter or "", planned.attack or ""),
            strict=True,
        )
    )
    pairs = _paired(planned, sweeps, m.baseline_model())
    if planned.check == "no_new_fragile_layers":
        counts = [
            draws[id(s)].fragile(response)
            for s, old in pairs
            for response in RESPONSES
            if old is None or getattr(old.labels, response) != "fragile"
        ]
        return np.asarray(np.sum(counts, axis=0, dtype=np.float64)) if counts else np.zeros(1)
    drops = [
        getattr(old.scores, response) - draws[id(s)].scores[response]
        for s, old in pairs
        if old is not None
        for response in ("clean", "adversarial", "difference")
    ]
    return np.max(drops, axis=0)


def interval_of(
    planned: PlannedCheck, result: CheckResult, m: Measurements, sampling: Sampling
) -> list[float] | None:
    """The interval of ``result.measured`` at the sampling's confidence; None when the value
    is not a sample of the test set (the Lipschitz bound) or cannot be resampled here."""
    confidence, check = sampling.confidence, planned.check
    if check in ("min_clean_accuracy", "min_adversarial_accuracy"):
        n = sampling.n if sampling.examples is None else sampling.examples(planned.attack)
        return accuracy_interval(result.measured, n, confidence)
    if check == "max_fragile_fraction":
        pairs = _local_draws(planned, m, sampling)
        members = m.scope_members()
        draws = fragile_fraction_draws(
            [d for _, d in pairs], [held_tensors(s, members) for s, _ in pairs], planned.response
        )
        return percentile_interval(draws, confidence)
    if check == "max_targeted_layers":
        draws = targeted_count_draws([d for _, d in _local_draws(planned, m, sampling)])
        return percentile_interval(draws, confidence)
    if check in ("no_new_fragile_layers", "max_score_drop"):
        return percentile_interval(_regression_draws(planned, m, sampling), confidence)
    return None


def decided(
    planned: PlannedCheck, result: CheckResult, ci: list[float] | None, sampling: Sampling
) -> CheckResult:
    """``result`` with its interval, decided by ``statistics.decide``; the detail says the
    interval and whether the decision is certain at the confidence."""
    direction = DIRECTIONS[planned.check]
    passed, certain = decide(result.measured, planned.limit, ci, direction, sampling.decide)
    if ci is None:
        return replace(result, passed=passed)
    digits = 0 if planned.check in ("max_targeted_layers", "no_new_fragile_layers") else 2
    shown = f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    detail = f"{result.detail}; {sampling.confidence:.0%} interval {shown}"
    if not certain:
        detail += ", uncertain"
    if sampling.decide != "estimate":
        detail += f" ({sampling.decide}: {'passes' if passed else 'fails'})"
    return replace(result, passed=passed, detail=detail, ci=ci, certain=certain)


# --------------------------------------------------------------------------- regression checks
def find_baseline_model(
    released: AuditResult, name: str, *, baseline: Path, spec: Path | None, line: int | None
) -> ModelResult:
    """The model named ``name`` in the baseline's results: never another model in its place."""
    model = next((m for m in released.models if m.name == name), None)
    if model is None:
        found = ", ".join(repr(m.name) for m in released.models) or "no model"
        where = f"{spec if spec is not None else name}{f':{line}' if line else ''}"
        raise BaselineError(
            f"{where}: baseline: {baseline} holds no model named {name!r} (it holds {found}); "
            "the regression checks compare a model with its own released results, so point "
            "'baseline' at a results.json of this model, or give the spec the released name."
        )
    return model


def _paired(
    planned: PlannedCheck, now: Sequence[SweepResult], baseline: ModelResult
) -> list[tuple[SweepResult, SweepResult | None]]:
    """Each current sweep with the baseline's sweep of the same scope, filter and attack."""
    before = {
        (s.scope, s.layer): s
        for s in baseline.sweeps
        if s.filter == planned.filter and s.attack == planned.attack
    }
    pairs = [(s, before.get((s.scope, s.layer))) for s in now]
    if not any(old is not None for _, old in pairs):
        has = sorted({f"{s.filter} under {s.attack}" for s in baseline.sweeps}) or ["no sweeps"]
        raise BaselineError(
            f"baseline model {baseline.name!r} has no sweep of {planned.filter} under "
            f"{planned.attack} for the layers analysed now (it has: {', '.join(has)}); "
            "re-run the baseline with this spec's filters, attacks and layers."
        )
    return pairs


def regression_check(
    planned: PlannedCheck, now: Sequence[SweepResult], baseline: ModelResult
) -> CheckResult:
    """``no_new_fragile_layers`` or ``max_score_drop`` of ``now`` against the released sweeps.

    A scope is newly fragile for a response when it is fragile now and was not in the
    baseline (or was not analysed there); a score drop is baseline score − current score,
    for the clean, adversarial and difference scores of every scope analysed in both.
    """
    pairs = _paired(planned, now, baseline)
    if planned.check == "no_new_fragile_layers":
        layers = [
            f"{s.layer or 'global'} ({response})"
            for s, old in pairs
            for response in RESPONSES
            if getattr(s.labels, response) == "fragile"
            and (old is None or getattr(old.labels, response) != "fragile")
        ]
        passed = len(layers) <= planned.limit
        detail = f"{len(layers)} layers newly fragile since the baseline"
        return _result(planned, float(len(layers)), passed, detail, layers)
    drops = sorted(
        (
            (getattr(old.scores, response) - getattr(s.scores, response), s, response)
            for s, old in pairs
            if old is not None
            for response in ("clean", "adversarial", "difference")
        ),
        key=lambda d: -d[0],
    )
    measured = drops[0][0]
    passed = measured <= planned.limit
    layers = [f"{s.layer or 'global'} ({r})" for drop, s, r in drops if drop > planned.limit]
    detail = f"largest score drop {measured:.3f} {'<=' if passed else '>'} max {planned.limit:.3f}"
    return _result(planned, measured, passed, detail, layers)


def failure_line(result: CheckResult, planned: PlannedCheck, spec: AuditSpec) -> str:
    """The first line a failing item shows: ``file:line: what: measured vs limit (layers)``."""
    where = spec.source_path.name if spec.source_path is not None else spec.name
    line = f":{result.line}" if result.line else ""
    return f"{where}{line}: {planned.label}: {result.detail}"
