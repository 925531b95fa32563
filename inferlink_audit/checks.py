"""The spec's thresholds, as planned items and as evaluated results.

Planning needs only the spec (no torch work), so the pytest plugin can collect items cheaply;
evaluation asks an ``AuditSession`` for exactly the measurements an item needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UnsupportedError
from .results import CheckResult, SweepResult
from .scores import fragile_fraction
from .spec import AuditSpec

if TYPE_CHECKING:
    from .audit import AuditSession

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
MEASUREMENTS = (SWEEP_ONLY, REMEDIATION_ONLY, TRANSFER_ONLY)  # items that assert nothing


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
        limit = _limit(spec, key)
        if limit is not None:
            for attack in attacks:
                planned.append(
                    PlannedCheck(
                        f"{attack.id}-{key}",
                        key,
                        None,
                        attack.id,
                        limit,
                        spec.line_of("checks", key),
                        attack.label,
                    )
                )
    if spec.remediation is not None and _limit(spec, "min_adversarial_gain") is None:
        line = spec.line_of("remediation")
        planned.append(
            PlannedCheck(REMEDIATION_ONLY, REMEDIATION_ONLY, None, None, 0.0, line, spec.name)
        )
    if spec.compare:
        line = spec.line_of("compare")
        planned.append(PlannedCheck(TRANSFER_ONLY, TRANSFER_ONLY, None, None, 0.0, line, spec.name))
    sweep_keys = [key for key in SWEEP_CHECKS if _limit(spec, key) is not None]
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
                    )
                )
    if not any(is_check(p) for p in planned):
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


def _layers_text(layers: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(layers[:limit])
    return shown + (f", … {len(layers) - limit} more" if len(layers) > limit else "")


def _local(sweeps: Sequence[SweepResult]) -> list[SweepResult]:
    return [s for s in sweeps if s.scope == "local"]


def evaluate_check(planned: PlannedCheck, session: AuditSession) -> CheckResult:
    """Measure what ``planned`` needs (computing it lazily, once) and compare with its limit."""
    key, limit = planned.check, planned.limit
    layers: list[str] = []
    if key == "min_clean_accuracy":
        measured = session.clean_accuracy()
        passed = measured >= limit
        detail = f"clean accuracy {measured:.4f} {'>=' if passed else '<'} min {limit:.4f}"
    elif key == "max_lipschitz_upper_bound":
        lipschitz = session.lipschitz
        bound = lipschitz.network_upper_bound
        measured = float("inf") if bound is None else bound
        passed = measured <= limit
        worst = sorted(lipschitz.layers, key=lambda layer: -layer.upper_bound)[:3]
        layers = [layer.layer for layer in worst]
        detail = (
            f"{lipschitz.note}; cannot assert max {limit:.4g}"
            if bound is None
            else f"network Lipschitz bound {bound:.4g} {'<=' if passed else '>'} max {limit:.4g}"
            + f" (largest layers: {', '.join(f'{x.layer} {x.upper_bound:.3g}' for x in worst)})"
        )
        layers = [] if passed else layers
    elif key == "min_adversarial_gain":
        remediation = session.remediation() or {}
        selective, control = remediation["selective"], remediation["control"]
        measured = selective["adversarial_after"] - selective["adversarial_before"]
        control_gain = control["adversarial_after"] - control["adversarial_before"]
        passed = measured >= limit
        detail = (
            f"selective retraining adversarial gain {measured:+.4f} "
            f"{'>=' if passed else '<'} min {limit:+.4f} (control: {control_gain:+.4f}; "
            f"frozen: {', '.join(remediation['frozen_layers']) or 'none'})"
        )
    elif key == "min_adversarial_accuracy":
        attack = session.attack_result(planned.attack or "")
        measured = attack.accuracy
        passed = measured >= limit
        detail = (
            f"adversarial accuracy {measured:.4f} {'>=' if passed else '<'} min {limit:.4f} "
            f"(clean {session.clean_accuracy():.4f}, success rate {attack.success_rate:.4f})"
        )
    elif key in ("max_fragile_fraction", "max_targeted_layers", SWEEP_ONLY):
        local = _local(session.sweeps(planned.filter or "", planned.attack or ""))
        if key == "max_fragile_fraction":
            response = session.spec.checks.max_fragile_fraction.on  # type: ignore[union-attr]
            measured, layers = fragile_fraction(local, response)
            passed = measured <= limit
            detail = (
                f"{'' if response == 'adversarial' else 'clean '}fragile fraction {measured:.2f} "
                f"{'<=' if passed else '>'} max {limit:.2f}"
            )
        elif key == "max_targeted_layers":
            targeted = sorted((s for s in local if s.targeted), key=lambda s: s.scores.difference)
            layers = [s.layer or "" for s in targeted]
            measured = float(len(layers))
            passed = measured <= limit
            detail = f"{len(layers)} targeted layers {'<=' if passed else '>'} max {int(limit)}"
        else:
            measured, passed, detail = 0.0, True, "sweep computed"
        if layers:
            detail += f" ({_layers_text(layers)})"
    elif key == REMEDIATION_ONLY:
        session.remediation()
        measured, passed, detail = 0.0, True, "remediation computed"
    elif key == TRANSFER_ONLY:
        session.transfer()
        measured, passed, detail = 0.0, True, "transferability computed"
    elif key in ("no_new_fragile_layers", "max_score_drop"):
        return session.baseline_check(planned)
    else:
        raise UnsupportedError(
            f"check {key!r} is validated but not supported yet in this version; remove it from "
            "'checks' to run the audit."
        )
    return CheckResult(
        id=planned.id,
        passed=passed,
        measured=measured,
        limit=limit,
        detail=detail,
        check=key,
        line=planned.line,
        layers=layers,
    )


def failure_line(result: CheckResult, planned: PlannedCheck, spec: AuditSpec) -> str:
    """The first line a failing item shows: ``file:line: what: measured vs limit (layers)``."""
    where = spec.source_path.name if spec.source_path is not None else spec.name
    line = f":{result.line}" if result.line else ""
    return f"{where}{line}: {planned.label}: {result.detail}"
