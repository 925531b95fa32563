"""Computed output as frozen dataclasses, and their JSON form (README).

``results.json`` is the machine-readable contract: other tools read it and every number in
the HTML report comes from it. Field names here are the JSON names; keep them stable and
bump ``SCHEMA`` on a breaking change. Fields beyond §2.5 are additions, never renames.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
    accuracy_ci: list[float] | None = None  # Wilson interval, with ``statistics:`` only


@dataclass(frozen=True)
class Scores:
    """The paper's three filtering scores φc, φa, φΔ (docs/method.md §4)."""

    clean: float
    adversarial: float
    difference: float


@dataclass(frozen=True)
class Labels:
    clean: Label
    adversarial: Label


class SweepOutcomes:
    """Which examples each threshold's variant classified correctly, clean and adversarial.

    Rows follow the sweep's thresholds (a threshold that zeroes nothing repeats the unfiltered
    network's row); bits are packed eight examples to a byte (``np.packbits``), so 1,650
    variants of a 10,000-example test set take a few MB. Kept in memory and in the sweep
    cache, never in results.json: the statistics are computed from them without new passes.
    """

    def __init__(
        self,
        n: int,
        clean: np.ndarray,
        adversarial: np.ndarray,
        unfiltered_clean: np.ndarray,
        unfiltered_adversarial: np.ndarray,
    ) -> None:
        self.n = n
        self.clean, self.adversarial = clean, adversarial  # (thresholds, ceil(n / 8)) uint8
        self.unfiltered_clean = unfiltered_clean  # (ceil(n / 8),) uint8
        self.unfiltered_adversarial = unfiltered_adversarial

    def unpacked(self, packed: np.ndarray) -> np.ndarray:
        """The bits of ``packed`` (one of this object's arrays) as booleans, examples last."""
        return np.unpackbits(packed, axis=-1, count=self.n).astype(bool)

    def to_json(self) -> dict[str, Any]:
        def text(a: np.ndarray) -> str:
            return base64.b64encode(np.ascontiguousarray(a, dtype=np.uint8).tobytes()).decode()

        return {
            "n": self.n,
            "thresholds": int(self.clean.shape[0]),
            "clean": text(self.clean),
            "adversarial": text(self.adversarial),
            "unfiltered_clean": text(self.unfiltered_clean),
            "unfiltered_adversarial": text(self.unfiltered_adversarial),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepOutcomes:
        n, rows = int(data["n"]), int(data["thresholds"])
        width = (n + 7) // 8

        def array(key: str, shape: tuple[int, ...]) -> np.ndarray:
            raw = np.frombuffer(base64.b64decode(data[key], validate=True), dtype=np.uint8)
            return raw.reshape(shape).copy()

        return cls(
            n,
            array("clean", (rows, width)),
            array("adversarial", (rows, width)),
            array("unfiltered_clean", (width,)),
            array("unfiltered_adversarial", (width,)),
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> SweepOutcomes:
        return self  # immutable in use; ``asdict`` need not copy the bits


@dataclass(frozen=True)
class SweepStatistics:
    """How sure a sweep's numbers are (``statistics:`` in the spec; docs/method.md).

    Accuracy intervals are Wilson score intervals; the others are percentile intervals of a
    paired bootstrap over examples. ``label_probability`` is, per response, the fraction of
    resamples giving each label; ``targeted_probability`` the fraction flagging the scope.
    """

    confidence: float
    resamples: int
    clean_accuracy_ci: list[list[float]]
    adversarial_accuracy_ci: list[list[float]]
    scores_ci: dict[str, list[float]]
    antifragile_area_ci: dict[str, list[float]]
    label_probability: dict[str, dict[str, float]]
    targeted_probability: float


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
    adversarial_normalised_by: str = "adversarial"  # "clean" when ψa⁰ = 0 (docs/method.md §4)
    layers: list[str] = field(default_factory=list)  # the layers a global scope covers
    evaluated_variants: int = 0  # distinct masks actually evaluated (duplicates reused)
    # Thresholds whose variant zeroed nonzero weights yet left every clean logit bit-identical
    # to the unfiltered network's: the filter did not act there (a bypassed layer). A finding,
    # shown in the report and the summary; it does not fail a check by itself.
    inert_thresholds: list[float] = field(default_factory=list)
    # With ``statistics:`` in the spec: intervals and label probabilities (absent otherwise).
    statistics: SweepStatistics | None = None
    # Per-example outcomes (memory and sweep cache only; never written to results.json).
    outcomes: SweepOutcomes | None = field(default=None, repr=False, compare=False)
    # With ``statistics.sequential``: how many examples the sweep used and why it stopped.
    sequential: SequentialRecord | None = None


@dataclass(frozen=True)
class SequentialRecord:
    """How a sweep of a sequential run ended (docs/method.md §8): ``examples`` used (the first
    ones of the seeded order, or all), after ``rounds`` rounds; ``stopped_early`` when fewer
    than the test set; ``decided`` when its labels, targeted flag and the checks reading it
    were all certain at the last look (False: the data ran out first, it is uncertain)."""

    examples: int
    rounds: int
    stopped_early: bool
    decided: bool


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
    # With ``statistics:`` only: the interval of ``measured`` (None where nothing is sampled,
    # e.g. the Lipschitz bound) and whether the decision holds across the whole interval.
    ci: list[float] | None = None
    certain: bool | None = None
    # Attack-failure indicators only: the examples the reading concerns (data indices, the
    # first EXAMPLES_KEPT of them) and how many there are.
    examples: list[int] | None = None
    examples_count: int | None = None


EXAMPLES_KEPT = 100  # example indices an indicator keeps in results.json


@dataclass(frozen=True)
class EpsCurve:
    """Accuracy against ε (σ for noise) of one attack that lists several values.

    ``attacks`` are the ids of the single-ε attacks (each also in ``ModelResult.attacks``),
    in the order of ``values`` (ascending); ``sweep_attack`` is the one filtering sweeps use.
    """

    label: str  # the attack without its budget, e.g. "pgd-linf(steps=10)"
    kind: str
    parameter: str  # "eps" or "sigma"
    norm: str  # "linf", "l2", or "" for noise
    values: list[float]
    attacks: list[str]
    accuracy: list[float]
    sweep_attack: str
    accuracy_ci: list[list[float]] | None = None  # Wilson intervals, with ``statistics:``


@dataclass(frozen=True)
class TopExamples:
    """The test examples that most activate one unit, or most align with one random direction
    (``kind``: "unit" or "direction"; ``index``: the unit's coordinate or the direction's
    number), largest value first (docs/method.md §9)."""

    kind: str
    index: int
    examples: list[int]  # indices into the test set as loaded (after ``limit``)
    values: list[float]  # the activation (unit) or projection (direction) of each
    variance: float | None = None  # for a unit: its variance over the test set
    # The most common class among ``examples`` (ties: the smaller class) and its share: how
    # alike the row's images are, for comparing units with directions.
    majority_class: int | None = None
    majority_share: float | None = None


@dataclass(frozen=True)
class UnitSemanticsResult:
    """``analysis.units``: Szegedy et al.'s unit semantics for one layer (units.py)."""

    layer: str
    activation_shape: list[int]  # the layer's output per example
    reduction: str  # "none", or "spatial_mean" (a C×H×W output averaged over positions)
    dimensions: int  # D, the dimension of the space the directions live in
    k: int
    seed: int
    unit_choice: str  # "most_variable"
    units: list[TopExamples]
    directions: list[TopExamples]
    direction_vectors: list[list[float]]  # unit-length, one per direction
    images: dict[str, str] = field(default_factory=dict)  # example index → base64 PNG
    labels: dict[str, int] = field(default_factory=dict)  # example index → its class
    image_note: str = ""  # why there are no images, when there are none

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitSemanticsResult:
        data = dict(data)
        for key in ("units", "directions"):
            data[key] = [TopExamples(**row) for row in data[key]]
        return cls(**data)


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
    clean_accuracy_ci: list[float] | None = None  # Wilson interval, with ``statistics:`` only
    statistics: dict[str, Any] | None = None  # confidence, resamples, decide, when asked for
    eps_curves: list[EpsCurve] | None = None  # attacks listing several ε, when there are any
    # ``compute.precision: bf16``: the calibration and which sweeps were confirmed in fp32
    compute: dict[str, Any] | None = None
    units: UnitSemanticsResult | None = None  # ``analysis.units``, when asked for


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


# Optional fields of the statistics: written only when set, so a spec without ``statistics``
# writes exactly the results.json it always did.
_OPTIONAL = (
    "statistics",
    "ci",
    "certain",
    "accuracy_ci",
    "clean_accuracy_ci",
    "examples",
    "examples_count",
    "eps_curves",
    "sequential",
    "compute",
    "units",
)


def _without_unset(item: dict[str, Any]) -> dict[str, Any]:
    item.pop("outcomes", None)
    return {k: v for k, v in item.items() if not (k in _OPTIONAL and v is None)}


def sweep_to_dict(sweep: SweepResult) -> dict[str, Any]:
    """A sweep's results.json form (its per-example outcomes left out)."""
    return _without_unset(asdict(sweep))


def result_to_dict(result: AuditResult) -> dict[str, Any]:
    data = asdict(result)
    for model in data["models"]:
        for key in ("sweeps", "checks", "attacks"):
            model[key] = [_without_unset(item) for item in model[key]]
    data["models"] = [_without_unset(model) for model in data["models"]]
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
                clean_accuracy_ci=m.get("clean_accuracy_ci"),
                statistics=m.get("statistics"),
                eps_curves=None
                if m.get("eps_curves") is None
                else [EpsCurve(**c) for c in m["eps_curves"]],
                compute=m.get("compute"),
                units=None if m.get("units") is None else UnitSemanticsResult.from_dict(m["units"]),
            )
        )
    return AuditResult(meta=data["meta"], models=models, consistency=data.get("consistency"))


def sweep_from_dict(s: dict[str, Any]) -> SweepResult:
    s = dict(s)
    s["scores"] = Scores(**s["scores"])
    s["labels"] = Labels(**s["labels"])
    if "antifragile_area" in s:
        s["antifragile_area"] = Scores(**s["antifragile_area"])
    if s.get("statistics") is not None:
        s["statistics"] = SweepStatistics(**s["statistics"])
    if s.get("outcomes") is not None:
        s["outcomes"] = SweepOutcomes.from_json(s["outcomes"])
    if s.get("sequential") is not None:
        s["sequential"] = SequentialRecord(**s["sequential"])
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
