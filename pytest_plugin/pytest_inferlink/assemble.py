"""What one item measured, as JSON, and one ``AuditResult`` assembled from many items.

An item's payload holds everything it used (its check, the sweeps and attack behind it, the
unfiltered model's numbers and the session's metadata), so the controller can rebuild the
result without the worker's session. Items that share a sweep each carry a copy; assembly
keeps the first in plan order, which makes the result independent of which process ran
what and in which order: a serial run and an xdist run give the same ``results.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from inferlink_audit.checks import (
    REMEDIATION_ONLY,
    TRANSFER_ONLY,
    PlannedCheck,
    failure_line,
    is_check,
)
from inferlink_audit.compare import label_consistency
from inferlink_audit.errors import AuditError
from inferlink_audit.precision import compute_summary, merge_compute_records
from inferlink_audit.results import (
    SCHEMA,
    AuditResult,
    CheckResult,
    SweepResult,
    result_from_dict,
    sweep_to_dict,
)

if TYPE_CHECKING:
    from inferlink_audit.audit import AuditSession
    from inferlink_audit.spec import AuditSpec

__all__ = [
    "PAYLOAD_VERSION",
    "ItemRun",
    "SpecStats",
    "assemble_result",
    "check_properties",
    "error_check",
    "failure_lines",
    "spec_stats",
]

PAYLOAD_VERSION = 1
_RESPONSES = ("clean", "adversarial", "difference")


# --------------------------------------------------------------------------- on the item's side
def error_check(planned: PlannedCheck, exc: BaseException) -> CheckResult:
    """An item that could not measure still shows in the report, as a failed check."""
    text = str(exc).strip()
    message = text.splitlines()[0] if text else type(exc).__name__
    if not isinstance(exc, AuditError):
        message = f"{type(exc).__name__}: {message}"
    return CheckResult(
        id=planned.id,
        passed=False,
        measured=math.nan,
        limit=planned.limit,
        detail=f"error: {message}",
        check=planned.check,
        line=planned.line,
    )


def _local_sweeps(session: AuditSession, planned: PlannedCheck) -> dict[str, SweepResult]:
    """The item's local sweeps by layer; only called once its evaluation computed them."""
    if planned.filter is None or planned.attack is None:
        return {}
    sweeps = session.sweeps(planned.filter, planned.attack)
    return {s.layer: s for s in sweeps if s.scope == "local" and s.layer is not None}


def check_properties(
    planned: PlannedCheck, result: CheckResult | None, session: AuditSession
) -> list[tuple[str, object]]:
    """JUnit ``<property>`` entries: the numbers CI tools read, and the culprits' scores."""
    props: list[tuple[str, object]] = [("check", planned.id)]
    if result is None:
        return props
    if not is_check(planned):
        return [*props, ("passed", result.passed)]
    props += [("measured", result.measured), ("limit", result.limit), ("passed", result.passed)]
    if result.ci is not None:
        props += [("ci_low", result.ci[0]), ("ci_high", result.ci[1])]
    if result.certain is not None:
        props.append(("certain", result.certain))
    examples = session.examples_deciding(planned)
    if examples is not None:  # statistics.sequential: the examples that decided the check
        props.append(("examples", examples))
    if result.detail.startswith("error: "):
        props.append(("error", result.detail.removeprefix("error: ")))
    elif not result.passed and result.layers:
        by_layer = _local_sweeps(session, planned)
        for name in result.layers:
            sweep = by_layer.get(name)
            if sweep is not None:
                for response in _RESPONSES:
                    value = round(getattr(sweep.scores, response), 6)
                    props.append((f"score:{name}:{response}", value))
    return props


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def failure_lines(
    result: CheckResult, planned: PlannedCheck, spec: AuditSpec, session: AuditSession
) -> list[str]:
    """The failure's text: the one-line verdict first, then what was measured and why."""
    lines = [
        failure_line(result, planned, spec),
        f"  check:    {planned.check} ({planned.id})",
        f"  measured: {_num(result.measured)}",
        f"  limit:    {_num(result.limit)}",
    ]
    if result.ci is not None and spec.statistics is not None:
        lines.append(
            f"  interval: [{_num(result.ci[0])}, {_num(result.ci[1])}] at "
            f"{session.confidence:.0%} ({'certain' if result.certain else 'uncertain'}; "
            f"decide: {spec.statistics.decide})"
        )
    if planned.check == "min_adversarial_accuracy" and planned.attack is not None:
        attack = session.attack_result(planned.attack)
        lines.append(
            f"  attack:   {spec.attack(attack.id).label} on {session.examples_used(attack.id)} "
            "examples: "
            f"success rate {attack.success_rate:.4f}, distortion rms {attack.distortion_rms:.4f}, "
            f"linf {attack.distortion_linf:.4f}"
        )
    if planned.check == "max_lipschitz_upper_bound":
        bounds = sorted(session.lipschitz.layers, key=lambda layer: -layer.upper_bound)
        lines.append("  layer Lipschitz upper bounds, largest first:")
        lines += [f"    {layer.layer}  {layer.upper_bound:.4g}" for layer in bounds[:6]]
    elif result.layers:
        by_layer = _local_sweeps(session, planned)
        width = max(len(name) for name in result.layers)
        lines.append(
            "  layers (scores clean / adversarial / difference, labels clean / adversarial):"
        )
        for name in result.layers:
            s = by_layer.get(name)
            if s is None:
                lines.append(f"    {name}")
                continue
            lines.append(
                f"    {name:<{width}}  {s.scores.clean:+.3f} / {s.scores.adversarial:+.3f} / "
                f"{s.scores.difference:+.3f}  {s.labels.clean} / {s.labels.adversarial}"
                f"{', targeted' if s.targeted else ''}  ({s.numel} weights)"
            )
    return lines


def _model_info(session: AuditSession) -> dict[str, Any] | None:
    # Describing the model must not load it (or retry loading it) after an error.
    if not session.is_prepared:
        return None
    prepared = session.prepared
    spec = session.spec
    clean = math.nan
    with contextlib.suppress(AuditError):
        clean = session.clean_accuracy()
    # Computed once per process and spec, so the plugin's report has the same Lipschitz table
    # as `inferlink-audit run`.
    lipschitz = None
    with contextlib.suppress(AuditError):
        lipschitz = asdict(session.lipschitz)
    statistics: dict[str, Any] = {}  # only with ``statistics:``, so results.json is unchanged
    if spec.statistics is not None:
        with contextlib.suppress(AuditError):
            statistics["clean_accuracy_ci"] = session.clean_accuracy_interval()
        statistics["statistics"] = session.statistics_record()
    return {
        "name": spec.name,
        "checkpoint_sha256": prepared.loaded.checkpoint_sha256,
        "n_examples": prepared.data.n,
        "clean_accuracy": clean,
        "spec_path": str(spec.source_path or ""),
        "layers": [
            {"name": layer.name, "type": layer.type, "numel": layer.numel}
            for layer in prepared.layers
        ],
        "tolerance": spec.filtering.tolerance,
        "values": spec.filtering.values,
        "adversarial_source": spec.filtering.adversarial_source,
        **statistics,
        "lipschitz": lipschitz,
        "remediation": session.computed_remediation,
        "units": None if session.computed_units is None else asdict(session.computed_units),
        # A CI shard's file records them (shards.shard_record); results.json does not.
        "scope_members": session.scope_members(),
    }


@dataclass(frozen=True)
class ItemRun:
    """What one check item ran: its spec and plan entry, the worker's session and what the
    check gave (a result or the error), and where its sweeps came from."""

    spec: AuditSpec
    spec_index: int
    planned: PlannedCheck
    plan_index: int
    session: AuditSession
    result: CheckResult | None
    error: BaseException | None
    computed: bool  # the item computed a sweep group
    from_cache: bool  # the item read a sweep group from the disk cache
    session_id: str
    seq: int
    sharded: bool = False  # a CI shard: sweeps carry the outcomes merge recomputes intervals from

    def _attacks(self) -> list[dict[str, Any]]:
        """The item's attack on the unfiltered network, with every point of its ε list: cheap
        next to a sweep, and the report's attack table needs it even where no check asserts."""
        attack, session = self.planned.attack, self.session
        if self.error is not None or attack is None:
            return []
        attacks: list[dict[str, Any]] = []
        with contextlib.suppress(AuditError):
            attacks.append(asdict(session.with_interval(session.attack_result(attack))))
            for point in session.curve_points(attack):
                if point.id != attack:
                    attacks.append(asdict(session.with_interval(session.attack_result(point.id))))
        return attacks

    def _sweeps(self) -> list[dict[str, Any]]:
        planned, session = self.planned, self.session
        if self.error is not None:
            return []
        if planned.check in (REMEDIATION_ONLY, "min_adversarial_gain"):
            # Selective retraining labelled every layer under every filter and attack first.
            return [
                sweep_to_dict(s)
                for f in self.spec.filtering.filters
                for a in self.spec.attack_specs
                for s in session.sweeps(f, a.id)
            ]
        if planned.attack is None or planned.filter is None:
            return []
        sweeps = session.sweeps(planned.filter, planned.attack)
        if self.spec.statistics is None or not self.sharded:
            return [sweep_to_dict(s) for s in sweeps]
        # With their outcomes: the shards' merge recomputes the intervals from them.
        return [
            {**sweep_to_dict(s), "outcomes": None if s.outcomes is None else s.outcomes.to_json()}
            for s in sweeps
        ]

    def _compute(self, sweeps: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Under ``compute.precision: bf16``: the settings and, per sweep group the item
        carries, that group's part of the ``compute`` record (calibration pairs, which sweeps
        were confirmed); the controller joins them as ``merge`` joins shards."""
        if self.spec.compute.precision == "fp32" or not self.session.is_prepared:
            return None
        groups = dict.fromkeys((s["filter"], s["attack"]) for s in sweeps)
        return {
            "head": self.session.compute_head(),
            "groups": [
                {"filter": f, "attack": a, **self.session.group_compute_record(f, a)}
                for f, a in groups
            ],
        }

    def _check(self) -> dict[str, Any] | None:
        if not is_check(self.planned):
            return None
        if self.result is not None:
            return asdict(self.result)
        return asdict(error_check(self.planned, self.error or RuntimeError("no result")))

    def _outcome(self) -> str:
        if self.error is not None:
            return "error"
        return "passed" if self.result is not None and self.result.passed else "failed"

    def payload(self) -> str:
        """Everything the item measured or used, as JSON (NaN allowed: Python reads it back)."""
        spec, session, planned = self.spec, self.session, self.planned
        model = _model_info(session)
        attacks, sweeps = self._attacks(), self._sweeps()
        if model is not None:  # after the attacks above: the ε curves they completed
            curves = session.computed_eps_curves()
            model["eps_curves"] = None if curves is None else [asdict(c) for c in curves]
        group = [[planned.filter, planned.attack]]
        payload = {
            "version": PAYLOAD_VERSION,
            "spec": str(spec.source_path or ""),
            "spec_index": self.spec_index,
            "spec_name": spec.name,
            "plan_index": self.plan_index,
            "check_id": planned.id,
            "filters": list(spec.filtering.filters),
            "attack_order": [attack.id for attack in spec.attack_points],
            "model": model,
            "attacks": attacks,
            "sweeps": sweeps,
            "compute": self._compute(sweeps),
            "check": self._check(),
            "transfer": session.computed_transfer if planned.check == TRANSFER_ONLY else None,
            "meta": session.meta(0.0) if model is not None else None,
            "outcome": self._outcome(),
            "computed": group if self.computed else [],
            "cached": group if self.from_cache else [],
            "session": self.session_id,
            "seq": self.seq,
        }
        return json.dumps(payload)


# --------------------------------------------------------------------------- on the controller
@dataclass(frozen=True)
class SpecStats:
    """One spec's items in this run: outcomes and where its sweeps came from."""

    name: str
    spec: str
    passed: int
    failed: int
    errors: int
    computed: int
    from_cache: int
    uncertain: int = 0  # with ``statistics:``: decisions whose interval straddles the limit

    @property
    def verdict(self) -> str:
        return "PASS" if self.failed == 0 and self.errors == 0 else "FAIL"


def _by_spec(payloads: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for payload in payloads:
        groups.setdefault((payload["spec_index"], payload["spec"]), []).append(payload)
    return [
        sorted(groups[key], key=lambda p: (p["plan_index"], p["check_id"]))
        for key in sorted(groups)
    ]


def spec_stats(payloads: list[dict[str, Any]]) -> list[SpecStats]:
    stats = []
    for items in _by_spec(payloads):
        outcomes = [p["outcome"] for p in items]
        stats.append(
            SpecStats(
                name=items[0]["spec_name"],
                spec=items[0]["spec"],
                passed=outcomes.count("passed"),
                failed=outcomes.count("failed"),
                errors=outcomes.count("error"),
                # A sweep is computed by the one item that first needs it in its process,
                # so summing counts every computation, duplicates across workers included.
                computed=sum(len(p["computed"]) for p in items),
                from_cache=sum(len(p["cached"]) for p in items),
                uncertain=sum(
                    1
                    for p in items
                    if p["check"] is not None and p["check"].get("certain") is False
                ),
            )
        )
    return stats


def _index(order: list[str], value: str) -> tuple[int, str]:
    return (order.index(value) if value in order else len(order), value)


def _model(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The model's entry of results.json (its JSON form), from the items of one spec."""
    infos = [p["model"] for p in items if p["model"] is not None]
    if not infos:
        return None  # the model never loaded: nothing was measured
    filters: list[str] = items[0]["filters"]
    attack_order: list[str] = items[0]["attack_order"]
    attacks: dict[str, dict[str, Any]] = {}
    sweep_groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    compute_groups: dict[tuple[str, str], dict[str, Any]] = {}
    for payload in items:
        for attack in payload["attacks"]:
            attacks.setdefault(attack["id"], attack)
        for group in (payload.get("compute") or {}).get("groups", []):
            compute_groups.setdefault((group["filter"], group["attack"]), group)
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for sweep in payload["sweeps"]:
            groups.setdefault((sweep["filter"], sweep["attack"]), []).append(sweep)
        for key, sweeps in groups.items():
            sweep_groups.setdefault(key, sweeps)  # the engine's order: local in model order, global
    ordered_groups = sorted(
        sweep_groups, key=lambda k: (_index(filters, k[0]), _index(attack_order, k[1]))
    )
    model = {
        key: value
        for key, value in infos[0].items()
        if key not in ("lipschitz", "remediation", "units")
    }
    return {
        **model,
        "attacks": [attacks[key] for key in sorted(attacks, key=lambda a: _index(attack_order, a))],
        "sweeps": [s for key in ordered_groups for s in sweep_groups[key]],
        "lipschitz": next((i["lipschitz"] for i in infos if i["lipschitz"] is not None), None),
        "remediation": next((i["remediation"] for i in infos if i.get("remediation")), None),
        "units": next((i["units"] for i in infos if i.get("units")), None),
        "checks": [p["check"] for p in items if p["check"] is not None],
        "eps_curves": next((i["eps_curves"] for i in infos if i.get("eps_curves")), None),
        "compute": _compute(
            items, [compute_groups[k] for k in ordered_groups if k in compute_groups]
        ),
        **_sequential_examples(model, infos),
    }


def _compute(items: list[dict[str, Any]], groups: list[dict[str, Any]]) -> dict[str, Any] | None:
    """results.json's ``compute`` from each sweep group's part, in the serial run's order, as
    ``merge`` joins CI shards' records: the same record as ``inferlink-audit run`` writes."""
    head = next((p["compute"]["head"] for p in items if p.get("compute")), None)
    if head is None:
        return None
    n = next(p["model"]["n_examples"] for p in items if p["model"] is not None)
    records = [
        {
            **head,
            "calibration": {"pairs": group["pairs"]} if head["confirm"] else None,
            "sweeps": group["sweeps"],
        }
        for group in groups
    ]
    return merge_compute_records(records, n) if records else compute_summary(head, None, [])


def _sequential_examples(model: dict[str, Any], infos: list[dict[str, Any]]) -> dict[str, Any]:
    """With ``statistics.sequential``: the examples of every unfiltered accuracy, from
    whichever item (or xdist worker) measured it."""
    statistics = model.get("statistics") or {}
    if "examples" not in (statistics.get("sequential") or {}):
        return {}
    examples: dict[str, int] = {}
    for info in infos:
        sequential = (info.get("statistics") or {}).get("sequential") or {}
        for key, used in (sequential.get("examples") or {}).items():
            examples.setdefault(key, used)
    sequential = {**statistics["sequential"], "examples": examples}
    return {"statistics": {**statistics, "sequential": sequential}}


def _meta(specs: list[list[dict[str, Any]]], seconds: float) -> dict[str, Any]:
    """The first spec's metadata; timing fields merged over every session that ran."""
    with_meta = [[p for p in items if p["meta"] is not None] for items in specs]
    with_meta = [items for items in with_meta if items]
    meta = dict(with_meta[0][0]["meta"])
    latest: dict[str, dict[str, Any]] = {}
    for items in with_meta:
        for payload in items:
            known = latest.get(payload["session"])
            if known is None or payload["seq"] > known["seq"]:
                latest[payload["session"]] = payload
    timings: dict[str, float] = {}
    prefix = len(with_meta) > 1
    for payload in latest.values():
        for key, value in payload["meta"].get("timings", {}).items():
            name = f"{payload['spec_name']}: {key}" if prefix else key
            timings[name] = round(timings.get(name, 0.0) + value, 3)
    # Measured by whichever process first ran a bf16 sweep.
    speeds = [p["meta"].get("bf16_speed") for items in with_meta for p in items]
    if any(speeds):
        meta["bf16_speed"] = next(s for s in speeds if s)
    meta["started"] = min(p["meta"]["started"] for items in with_meta for p in items)
    meta["seconds"] = round(seconds, 3)
    meta["timings"] = dict(sorted(timings.items()))
    meta["runner"] = "pytest"
    # Under xdist with several GPUs each worker has its own (devices.worker_device_name).
    meta["devices"] = sorted({p["meta"]["device"] for items in with_meta for p in items})
    if prefix:
        meta["specs"] = [
            {
                "name": items[0]["spec_name"],
                "spec": items[0]["meta"].get("spec", ""),
                "spec_sha256": items[0]["meta"].get("spec_sha256", ""),
            }
            for items in with_meta
        ]
    return meta


def assemble_result(payloads: list[dict[str, Any]], *, seconds: float) -> AuditResult | None:
    """One result from every item's payload, or None when no model was ever loaded."""
    specs = _by_spec(payloads)
    models: list[dict[str, Any]] = []
    measured: list[list[dict[str, Any]]] = []
    for items in specs:
        model = _model(items)
        if model is not None:
            models.append(model)
            measured.append(items)
    if not models:
        return None
    # Through the library's own reader, so the result is exactly what results.json holds.
    result = result_from_dict(
        {"schema": SCHEMA, "meta": _meta(measured, seconds), "models": models}
    )
    transfer = [row for p in payloads if p.get("transfer") for row in p["transfer"]]
    compared = any(p["check_id"] == TRANSFER_ONLY for p in payloads)
    if compared and len(result.models) > 1:
        consistency = {**label_consistency(result.models), "transfer": transfer}
        result = replace(result, consistency=consistency)
    return result
