"""Computed output as frozen dataclasses, and their JSON form (DESIGN §2.5).

``results.json`` is the machine-readable contract: other tools read it and every number in
the HTML report comes from it. Field names here are the JSON names; keep them stable and
bump ``SCHEMA`` on a breaking change. Fields beyond §2.5 are additions, never renames.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import AuditError
from .fileio import atomic_write_text

SCHEMA = "inferlink-audit/results/v1"

Label = str  # "fragile" | "robust" | "antifragile"
RESPONSES: tuple[str, ...] = ("clean", "adversarial")


@dataclass(frozen=True)
class AttackResult:
    """One attack on the unfiltered network.

    ``successes`` counts the examples the network classified correctly and the attack made it
    misclassify; ``success_rate`` is their share of the correctly classified ones. Distortion
    (rms, L∞, L2 of x′ − x) is averaged over ``distortion_over``: "successful" (those
    ``successes`` examples, as Szegedy et al. report it; NaN when there are none) in results
    written by this version, "all" (every example) in older files.
    """

    id: str
    kind: str
    params: dict[str, Any]
    accuracy: float
    success_rate: float
    distortion_rms: float
    distortion_linf: float
    distortion_l2: float = 0.0
    successes: int | None = None  # None in files written before it was recorded
    distortion_over: str = "all"


@dataclass(frozen=True)
class Scores:
    """The paper's three filtering scores φc, φa, φΔ (DESIGN §1.4)."""

    clean: float
    adversarial: float
    difference: float


@dataclass(frozen=True)
class Labels:
    clean: Label
    adversarial: Label


@dataclass(frozen=True)
class SweepResult:
    """Responses of one scope to one filter under one attack, and what they mean."""

    scope: str  # "local" | "global"
    layer: str | None  # None for the global scope
    filter: str
    attack: str
    numel: int
    thresholds: list[float]
    removed_fraction: list[float]
    clean_accuracy: list[float]
    adversarial_accuracy: list[float]
    scores: Scores
    labels: Labels
    targeted: bool
    # Additions to §2.5, so a reader can see why a label was given.
    antifragile_area: Scores = field(default_factory=lambda: Scores(0.0, 0.0, 0.0))
    adversarial_normalised_by: str = "adversarial"  # "clean" when ψa⁰ = 0 (DESIGN §1.4)
    layers: list[str] = field(default_factory=list)  # the layers a global scope covers
    evaluated_variants: int = 0  # distinct masks actually evaluated (duplicates reused)
    # Thresholds whose variant zeroed nonzero weights yet left every clean logit bit-identical
    # to the unfiltered network's: the filter did not act there (a bypassed layer). A finding,
    # shown in the report and the summary; it does not fail a check by itself.
    inert_thresholds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class LipschitzLayer:
    layer: str
    upper_bound: float


@dataclass(frozen=True)
class LipschitzResult:
    layers: list[LipschitzLayer]
    network_upper_bound: float | None  # None when some operation has no known bound
    note: str = ""  # why the network bound is unavailable, or how it was composed
    tolerance: float = 1e-8  # relative tolerance of the iterative operator norms
    reason: str = ""  # why the network bound is unavailable, naming the node; "" when it is not


@dataclass(frozen=True)
class CheckResult:
    """One asserted threshold: what was measured, the limit, and why it failed if it did."""

    id: str
    passed: bool
    measured: float
    limit: float
    detail: str
    check: str = ""  # the check's key, e.g. "max_fragile_fraction"
    line: int | None = None  # the check's line in the spec
    layers: list[str] = field(default_factory=list)  # the layers that caused a failure


@dataclass(frozen=True)
class ModelResult:
    name: str
    checkpoint_sha256: str
    n_examples: int
    clean_accuracy: float
    attacks: list[AttackResult]
    sweeps: list[SweepResult]
    lipschitz: LipschitzResult | None
    remediation: dict[str, Any] | None
    checks: list[CheckResult]
    spec_path: str = ""
    layers: list[dict[str, Any]] = field(
        default_factory=list
    )  # name, type, numel of analysed layers
    tolerance: float = 0.05
    values: str = "signed"
    adversarial_source: str = "filtered"


@dataclass(frozen=True)
class AuditResult:
    meta: dict[str, Any]
    models: list[ModelResult]
    consistency: dict[str, Any] | None = None
    schema: str = SCHEMA

    @property
    def passed(self) -> bool:
        return all(check.passed for model in self.models for check in model.checks)


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null so strict readers can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def result_to_dict(result: AuditResult) -> dict[str, Any]:
    data = asdict(result)
    ordered = {"schema": data.pop("schema"), "meta": data.pop("meta"), "models": data.pop("models")}
    if data.get("consistency") is not None:
        ordered["consistency"] = data["consistency"]
    return _finite(ordered)


def result_from_dict(data: dict[str, Any]) -> AuditResult:
    """Rebuild an AuditResult from its JSON form (for merge, baselines and the report)."""
    if not isinstance(data, dict):
        raise TypeError(f"the file holds a JSON {type(data).__name__}, not an object")
    if data.get("schema") != SCHEMA:
        raise AuditError(
            f"results file has schema {data.get('schema')!r}, this version reads {SCHEMA!r}: "
            "re-run the audit with this version to regenerate it."
        )
    models = []
    for m in data["models"]:
        lip = m.get("lipschitz")
        models.append(
            ModelResult(
                name=m["name"],
                checkpoint_sha256=m["checkpoint_sha256"],
                n_examples=m["n_examples"],
                clean_accuracy=m["clean_accuracy"],
                attacks=[AttackResult(**a) for a in m["attacks"]],
                sweeps=[sweep_from_dict(s) for s in m["sweeps"]],
                lipschitz=None
                if lip is None
                else LipschitzResult(
                    layers=[LipschitzLayer(**layer) for layer in lip["layers"]],
                    network_upper_bound=lip["network_upper_bound"],
                    note=lip.get("note", ""),
                    tolerance=lip.get("tolerance", 1e-8),
                    reason=lip.get("reason", ""),
                ),
                remediation=m.get("remediation"),
                checks=[CheckResult(**c) for c in m["checks"]],
                spec_path=m.get("spec_path", ""),
                layers=m.get("layers", []),
                tolerance=m.get("tolerance", 0.05),
                values=m.get("values", "signed"),
                adversarial_source=m.get("adversarial_source", "filtered"),
            )
        )
    return AuditResult(meta=data["meta"], models=models, consistency=data.get("consistency"))


def sweep_from_dict(s: dict[str, Any]) -> SweepResult:
    s = dict(s)
    s["scores"] = Scores(**s["scores"])
    s["labels"] = Labels(**s["labels"])
    if "antifragile_area" in s:
        s["antifragile_area"] = Scores(**s["antifragile_area"])
    return SweepResult(**s)


def write_results(result: AuditResult, path: str | Path) -> Path:
    """Write results.json atomically (an interruption never leaves half a file)."""
    text = json.dumps(result_to_dict(result), indent=2, sort_keys=False)
    return atomic_write_text(path, text + "\n")


def read_results(path: str | Path) -> AuditResult:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditError(
            f"{path}: cannot read results ({exc}); pass a results.json written by inferlink-audit."
        ) from None
    try:
        return result_from_dict(data)
    except AuditError as exc:
        raise AuditError(f"{path}: {exc}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise AuditError(
            f"{path}: not a results.json written by inferlink-audit ({type(exc).__name__}: {exc})"
        ) from None
