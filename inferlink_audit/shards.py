"""CI shards: each job runs a deterministic share of an audit's sweeps; ``merge`` joins them.

A sweep group (one filter under one attack: every local sweep and the global one) is the unit
of work, as it is for pytest-xdist's scheduling. Groups are assigned to shards by greedy
longest-processing-time on an estimated cost (weights swept × thresholds × passes per
example), so every shard of a given spec and count computes the same plan without talking to
the others. Shard 1 also computes the model-wide work (clean accuracy, the attacks on the
unfiltered network, the Lipschitz bounds, the attack-failure indicators) and its checks.

A shard's results.json records, in ``meta.shard``, which groups it holds and every check the
spec plans, and with ``statistics:`` each sweep's per-example outcomes; ``merge_shards``
refuses shards of different specs, checkpoints or versions and missing or duplicate shards,
joins the sweeps in the serial run's order, recomputes the intervals from the outcomes with
the serial run's seeded resample, and evaluates every check again on the joined records, so
the merged file equals a serial run's (meta aside). With ``compare:`` each compared model is
split by its own spec (``meta.shard.peers``), shard 1 measures the transferability and merge
recomputes the label consistency. ``inferlink-audit run --shard`` and the pytest plugin's
``--inferlink-shard`` write the same file (``shard_record``). ``statistics.sequential`` and
``remediation`` are refused (``refuse_unsplittable``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .attack_sanity import Indicator
from .checks import PlannedCheck, evaluate_check, find_baseline_model, is_check, plan_checks
from .errors import AuditError
from .precision import merge_compute_records
from .results import (
    AttackResult,
    AuditResult,
    CheckResult,
    LipschitzResult,
    ModelResult,
    SweepOutcomes,
    SweepResult,
    UnitSemanticsResult,
    read_results,
)
from .scores import Members
from .spec import AuditSpec
from .statistics import (
    Sampling,
    SweepDraws,
    accuracy_interval,
    bootstrap_sweep,
    resample_indices,
    resample_weights,
    sweep_statistics,
)

if TYPE_CHECKING:
    from .audit import AuditSession, SweepCache

__all__ = [
    "Shard",
    "ShardError",
    "attack_passes",
    "in_shard",
    "is_shard",
    "merge_shards",
    "parse_shard",
    "plan_shards",
    "refuse_unsplittable",
    "run_shard",
    "shard_note",
    "shard_of_spec",
    "shard_record",
    "sweep_costs",
    "sweep_keys",
]

SweepKey = tuple[str, str]  # (filter, attack id): one sweep group
K = TypeVar("K", bound=Hashable)

# Gradient or query passes per example for the attacks whose spec gives no step count.
_AUTOATTACK_PASSES = {"standard": 400, "fast": 200}


class ShardError(AuditError):
    """Shards that cannot be run or merged as asked: a malformed ``i/n``, a spec a shard cannot
    split, or shard files that do not belong to one run."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``, counted from 1 (``--shard 2/3``)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str, option: str = "--shard") -> Shard:
    """``"i/n"`` with 1 ≤ i ≤ n, or a ``ShardError`` naming ``option``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        raise ShardError(
            f"{option} {text!r}: expected INDEX/COUNT with 1 <= INDEX <= COUNT, e.g. 1/2 and "
            "2/2 for two jobs."
        )
    return Shard(int(match[1]), int(match[2]))


# --------------------------------------------------------------------------- planning
def sweep_keys(spec: AuditSpec) -> list[SweepKey]:
    """Every sweep group of the spec, in the serial run's order (filters, then attacks)."""
    return [(f, a.id) for f in spec.filtering.filters for a in spec.attack_specs]


def attack_passes(attack: Any, adversarial_source: str) -> int:
    """Forward(-backward) passes per example to evaluate one filtered variant under ``attack``:
    clean and adversarial predictions, plus the attack itself when it runs on every variant."""
    if adversarial_source != "filtered":
        return 2  # the adversarial examples are made once, on the unfiltered network
    kind = attack.kind
    if kind == "fgsm":
        steps = 1
    elif kind == "gaussian":
        steps = 0
    elif kind == "lbfgs":
        steps = attack.max_iter
    elif kind == "apgd":
        steps = attack.steps * attack.restarts
    elif kind == "square":
        steps = attack.queries
    elif kind == "autoattack":
        steps = _AUTOATTACK_PASSES.get(attack.version, 400)
    else:
        steps = int(getattr(attack, "steps", 1))
    return 2 + steps


def sweep_costs(spec: AuditSpec, layer_numels: Sequence[int] | None = None) -> dict[SweepKey, int]:
    """Each sweep group's estimated cost: weights swept (every local scope and the global one)
    × thresholds × passes per example. Without ``layer_numels`` each scope kind counts 1; the
    assignment of one spec's groups is the same either way (the weights are a common factor)."""
    filtering = spec.filtering
    numel = sum(layer_numels) if layer_numels is not None else 1
    weights = numel * len(filtering.scopes)
    return {
        (f, a.id): weights * filtering.thresholds * attack_passes(a, filtering.adversarial_source)
        for f in filtering.filters
        for a in spec.attack_specs
    }


def plan_shards(costs: Mapping[K, int], count: int) -> list[list[K]]:
    """Greedy longest-processing-time: the costliest group first, each to the least loaded
    shard (the lowest index on a tie). Deterministic for a given mapping order; each shard's
    groups keep that order."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    position = {key: i for i, key in enumerate(costs)}
    loads = [0] * count
    assigned: list[list[K]] = [[] for _ in range(count)]
    for key in sorted(costs, key=lambda k: (-costs[k], position[k])):
        target = min(range(count), key=lambda j: (loads[j], j))
        loads[target] += costs[key]
        assigned[target].append(key)
    return [sorted(keys, key=position.__getitem__) for keys in assigned]


def shard_of_spec(
    spec: AuditSpec, shard: Shard, layer_numels: Sequence[int] | None = None
) -> list[SweepKey]:
    """The sweep groups shard ``shard`` computes, in serial order."""
    return plan_shards(sweep_costs(spec, layer_numels), shard.count)[shard.index - 1]


def shard_note(shard: Shard, held: int, total: int) -> str:
    """What a shard reports instead of a verdict, which only the merged audit has."""
    extra = " and the model-wide checks" if shard.index == 1 else ""
    return f"shard {shard}: {held} of {total} sweep groups{extra}"


def in_shard(planned: PlannedCheck, keys: Sequence[SweepKey], shard: Shard) -> bool:
    """Whether the shard evaluates ``planned``: a sweep check with its group, the rest on 1."""
    if planned.filter is not None:
        return (planned.filter, planned.attack or "") in keys
    return shard.index == 1


def refuse_unsplittable(spec: AuditSpec, option: str = "--shard") -> None:
    """A ``ShardError`` naming the key when the merged shards of ``spec`` (or of a spec it
    compares) could not equal a serial run's."""
    from .spec_loader import load_spec, locate_message

    reasons: list[tuple[tuple[str, ...], str]] = []
    if spec.statistics is not None and spec.statistics.sequential is not None:
        reasons.append(
            (
                ("statistics", "sequential"),
                "a sequential run stops each sweep on decisions taken round by round, which "
                "merge cannot repeat from the shards' files",
            )
        )
    if spec.remediation is not None:
        reasons.append(
            (("remediation",), "selective retraining needs every sweep's labels at once")
        )
    if reasons:
        key, why = reasons[0]
        message = (
            f"cannot run in shards ({why}); run this spec without {option}, or remove "
            f"'{'.'.join(key)}' for the sharded run."
        )
        raise ShardError(locate_message(spec, key, message))
    for peer in spec.compare:
        refuse_unsplittable(load_spec(peer), option)


def run_shard(
    spec: AuditSpec,
    shard: Shard,
    *,
    device: str | None = None,
    cache: SweepCache | None = None,
    on_variant: Callable[[str], None] | None = None,
    output_dir: Path | None = None,
) -> AuditResult:
    """The shard's sweeps and the checks that read only them (shard 1: the model-wide work
    too), as a results.json marked ``meta.shard``. With ``compare:`` every compared model
    is split by its own spec's plan, and shard 1 measures the transferability."""
    from .audit import AuditSession

    refuse_unsplittable(spec)
    t0 = time.perf_counter()
    main = AuditSession(
        spec, device=device, cache=cache, on_variant=on_variant, output_dir=output_dir
    )
    sessions = [main, *main.peers()]
    models = [_shard_model(session, shard) for session in sessions]
    meta = main.meta(time.perf_counter() - t0)
    meta["shard"] = shard_record(
        shard,
        [(s.spec, m, s.scope_members()) for s, m in zip(sessions, models, strict=True)],
        transfer=main.transfer() if spec.compare and shard.index == 1 else None,
    )
    return AuditResult(meta=meta, models=models)


def _model_record(
    spec: AuditSpec, shard: Shard, model: ModelResult, members: Members
) -> dict[str, Any]:
    """What merge needs of one model's shard: the plan, every planned check, and with
    ``statistics:`` each sweep's per-example outcomes (results.json leaves them out)."""
    costs = sweep_costs(spec, [int(layer["numel"]) for layer in model.layers])
    keys = plan_shards(costs, shard.count)[shard.index - 1]
    record: dict[str, Any] = {
        "sweeps": [list(k) for k in keys],
        "all_sweeps": [list(k) for k in costs],
        "costs": [costs[k] for k in costs],
        "checks": [asdict(p) for p in plan_checks(spec) if is_check(p)],
        "members": {layer: [list(m) for m in pairs] for layer, pairs in members.items()},
        "baseline": None if spec.baseline is None else str(spec.baseline),
    }
    if spec.statistics is not None:
        record["outcomes"] = [
            None if s.outcomes is None else s.outcomes.to_json() for s in model.sweeps
        ]
    return record


def shard_record(
    shard: Shard,
    models: Sequence[tuple[AuditSpec, ModelResult, Members]],
    transfer: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``meta.shard`` of a shard's results.json: the first model's plan at the top, the
    compared models' in ``peers``, and shard 1's transferability rows (``compare:``).
    ``inferlink-audit run --shard`` and ``pytest --inferlink-shard`` both write it."""
    (spec, model, members), *peers = models
    record: dict[str, Any] = {
        "index": shard.index,
        "count": shard.count,
        **_model_record(spec, shard, model, members),
    }
    if spec.compare:
        record["peers"] = [_model_record(s, shard, m, mem) for s, m, mem in peers]
        record["transfer"] = transfer
    return record


def _shard_model(session: AuditSession, shard: Shard) -> ModelResult:
    """One model's share: its planned sweep groups and their checks; in shard 1 also the
    model-wide measurements and checks."""
    spec, p = session.spec, session.prepared
    costs = sweep_costs(spec, [layer.numel for layer in p.layers])
    keys = plan_shards(costs, shard.count)[shard.index - 1]
    planned = [x for x in plan_checks(spec) if is_check(x)]
    checks = [session.evaluate(x) for x in planned if in_shard(x, keys, shard)]
    first = shard.index == 1
    return ModelResult(
        name=spec.name,
        checkpoint_sha256=p.loaded.checkpoint_sha256,
        n_examples=p.data.n,
        clean_accuracy=session.clean_accuracy(),
        attacks=[session.with_interval(session.attack_result(a.id)) for a in spec.attack_points]
        if first
        else [],
        sweeps=[s for f, a in keys for s in session.sweeps(f, a)],
        lipschitz=session.lipschitz if first else None,
        remediation=None,
        checks=checks,
        spec_path=str(spec.source_path or ""),
        layers=[{"name": x.name, "type": x.type, "numel": x.numel} for x in p.layers],
        tolerance=spec.filtering.tolerance,
        values=spec.filtering.values,
        adversarial_source=spec.filtering.adversarial_source,
        clean_accuracy_ci=session.clean_accuracy_interval(),
        statistics=session.statistics_record(),
        eps_curves=session.eps_curves() if first else None,
        units=session.unit_semantics() if first else None,
        compute=session.compute_record(),
    )


# --------------------------------------------------------------------------- merging
def is_shard(result: AuditResult) -> bool:
    return isinstance(result.meta.get("shard"), dict)


def _refuse_mismatch(runs: Sequence[tuple[Path, AuditResult]], what: str, value: Any) -> None:
    """One paragraph naming each file with its value, when the files disagree on ``what``."""
    values = [value(run) for _, run in runs]
    if len({repr(v) for v in values}) <= 1:
        return
    listed = "; ".join(f"{path}: {v}" for (path, _), v in zip(runs, values, strict=True))
    raise ShardError(
        f"cannot merge shards of different {what} ({listed}); merge the shards of one run, "
        "made from the same spec, checkpoint and versions."
    )


def _check_complete(runs: Sequence[tuple[Path, AuditResult]]) -> int:
    count = runs[0][1].meta["shard"]["count"]
    by_index: dict[int, list[Path]] = {}
    for path, run in runs:
        by_index.setdefault(run.meta["shard"]["index"], []).append(path)
    duplicates = {i: paths for i, paths in by_index.items() if len(paths) > 1}
    if duplicates:
        listed = "; ".join(
            f"shard {i}/{count} in {', '.join(map(str, paths))}"
            for i, paths in sorted(duplicates.items())
        )
        raise ShardError(f"cannot merge: duplicate shards ({listed}); give each shard once.")
    missing = [i for i in range(1, count + 1) if i not in by_index]
    if missing:
        given = ", ".join(
            f"{path} (shard {run.meta['shard']['index']}/{count})" for path, run in runs
        )
        raise ShardError(
            f"cannot merge: shard {', '.join(f'{i}/{count}' for i in missing)} missing; given "
            f"{given}. Download every shard's results.json before merging."
        )
    return count


def _validated(runs: Sequence[tuple[Path, AuditResult]]) -> None:
    plain = [str(path) for path, run in runs if not is_shard(run)]
    if plain:
        raise ShardError(
            f"cannot merge shards with whole runs ({', '.join(plain)} not written with "
            "--shard); merge either the shards of one run or whole runs."
        )
    _refuse_mismatch(runs, "specs (spec_sha256)", lambda r: r.meta.get("spec_sha256"))
    _refuse_mismatch(
        runs,
        "checkpoints (checkpoint_sha256)",
        lambda r: [m.checkpoint_sha256 for m in r.models],
    )
    _refuse_mismatch(
        runs,
        "versions (inferlink-audit, torch)",
        lambda r: f"inferlink-audit {r.meta.get('version')}, torch {r.meta.get('torch')}",
    )
    _refuse_mismatch(runs, "shard counts", lambda r: r.meta["shard"]["count"])
    for path, run in runs:
        missing = [i for part in _parts(run) for i in part.get("missing_items", [])]
        if missing:
            info = run.meta["shard"]
            raise ShardError(
                f"cannot merge: {path} (shard {info['index']}/{info['count']}) did not run "
                f"{len(missing)} of its items ({', '.join(missing[:4])}"
                f"{', …' if len(missing) > 4 else ''}: deselected by -k, --lf or a plugin); "
                "re-run that shard without deselecting any of its items."
            )


class _Merged:
    """``Measurements`` over joined shard records: what the checks read, nothing computed."""

    def __init__(
        self,
        model: ModelResult,
        recorded: Mapping[str, CheckResult],
        members: Members,
        baseline: str | None,
        spec_path: str,
        sampling: Sampling | None = None,
    ) -> None:
        self.model, self.recorded, self.members = model, recorded, members
        self.baseline, self.spec_path = baseline, spec_path
        self._sampling = sampling

    def sampling(self) -> Sampling | None:
        return self._sampling  # with ``statistics:``: draws recomputed from the outcomes

    def clean_accuracy(self) -> float:
        return self.model.clean_accuracy

    def attack_result(self, attack_id: str) -> AttackResult:
        return next(a for a in self.model.attacks if a.id == attack_id)

    def sweeps(self, filter_name: str, attack_id: str) -> list[SweepResult]:
        return [s for s in self.model.sweeps if s.filter == filter_name and s.attack == attack_id]

    @property
    def lipschitz(self) -> LipschitzResult:
        assert self.model.lipschitz is not None  # shard 1 always records it
        return self.model.lipschitz

    def remediation(self) -> dict[str, Any] | None:
        return None  # refused by run_shard

    def transfer(self) -> list[dict[str, Any]]:
        return []  # no check asserts on it

    def unit_semantics(self) -> UnitSemanticsResult | None:
        return self.model.units  # shard 1 computed it

    def baseline_model(self) -> ModelResult:
        assert self.baseline is not None  # planned only with a baseline
        return find_baseline_model(
            read_results(self.baseline),
            self.model.name,
            baseline=Path(self.baseline),
            spec=Path(self.spec_path) if self.spec_path else None,
            line=None,
        )

    def scope_members(self) -> Members:
        return self.members

    def attack_indicator(self, name: str, attack_id: str | None, limit: float) -> Indicator:
        # Shard 1 measured the indicator on the model itself; its record is the measurement.
        record = self.recorded[name if attack_id is None else f"{attack_id}-{name}"]
        examples = tuple(record.examples or ())
        return Indicator(
            name, attack_id, record.measured, limit, record.detail, examples, record.examples_count
        )


def _with_outcomes(model: ModelResult, part: Mapping[str, Any]) -> list[SweepResult]:
    """The shard's sweeps with the per-example outcomes its ``meta.shard`` kept."""
    kept = part.get("outcomes") or [None] * len(model.sweeps)
    return [
        s if o is None else replace(s, outcomes=SweepOutcomes.from_json(o))
        for s, o in zip(model.sweeps, kept, strict=True)
    ]


def _resampled(model: ModelResult, seed: int) -> tuple[ModelResult, Sampling | None]:
    """With ``statistics:``, every interval, label probability and bootstrap draw computed
    again from the joined outcomes, with the serial run's seeded resample (paired over every
    sweep, as ``AuditSession`` does), so checks decide on exactly the serial run's draws."""
    record = model.statistics
    if record is None:
        return model, None
    confidence, n = float(record["confidence"]), model.n_examples
    weights = resample_weights(resample_indices(n, int(record["resamples"]), seed))
    draws: dict[SweepKey, list[SweepDraws]] = {}
    groups: dict[SweepKey, list[SweepResult]] = {}
    for s in model.sweeps:
        groups.setdefault((s.filter, s.attack), []).append(s)
    sweeps: list[SweepResult] = []
    for key, group in groups.items():
        if any(s.outcomes is None for s in group):
            sweeps += group  # as the session: no outcomes (filtering.fast), no intervals
            continue
        for s in group:
            assert s.outcomes is not None
            d = bootstrap_sweep(s.outcomes, s.removed_fraction, weights, model.tolerance)
            draws.setdefault(key, []).append(d)
            sweeps.append(replace(s, statistics=sweep_statistics(s.outcomes, d, confidence)))

    def draws_of(filter_name: str, attack_id: str) -> list[SweepDraws]:
        found = draws.get((filter_name, attack_id))
        if found is None:
            raise AuditError(
                f"statistics: the sweeps of {filter_name} under {attack_id} kept no per-example "
                "outcomes (filtering.fast's batched passes do not), so they have no intervals"
            )
        return found

    model = replace(
        model,
        sweeps=sweeps,
        attacks=[
            replace(a, accuracy_ci=accuracy_interval(a.accuracy, n, confidence))
            for a in model.attacks
        ],
        clean_accuracy_ci=accuracy_interval(model.clean_accuracy, n, confidence),
    )
    return model, Sampling(confidence, record["decide"], n, draws_of)


def _refuse_unmeasured(
    pieces: Sequence[tuple[ModelResult, Mapping[str, Any]]],
    by_key: Mapping[SweepKey, list[SweepResult]],
) -> None:
    """A check whose sweeps no shard computed (its item failed before measuring) would be
    evaluated on nothing: refused, naming the shard that should hold them."""
    for index, (model, part) in enumerate(pieces, 1):
        held = {(f, a) for f, a in part["sweeps"]}
        for planned in part["checks"]:
            key = (planned["filter"], planned["attack"] or "")
            if planned["filter"] is None or key not in held or by_key.get(key):
                continue
            raise ShardError(
                f"cannot merge: shard {index}/{len(pieces)} holds no sweeps of {key[0]} under "
                f"{key[1]} for {model.name}, which check {planned['id']} reads (its items failed "
                "before measuring them); fix the error that shard reports and re-run it."
            )


def _merge_model(pieces: Sequence[tuple[ModelResult, Mapping[str, Any]]], seed: int) -> ModelResult:
    """One model's shards (in shard order) joined, its checks evaluated on the joined data."""
    base, info = pieces[0]
    by_key: dict[SweepKey, list[SweepResult]] = {}
    for model, part in pieces:
        for s in _with_outcomes(model, part):
            by_key.setdefault((s.filter, s.attack), []).append(s)
    sweeps = [s for f, a in info["all_sweeps"] for s in by_key.get((f, a), [])]
    _refuse_unmeasured(pieces, by_key)
    compute = merge_compute_records([m.compute for m, _ in pieces], base.n_examples)
    joined, sampling = _resampled(replace(base, sweeps=sweeps, checks=[], compute=compute), seed)
    recorded = {c.id: c for c in base.checks}
    members = {layer: [tuple(m) for m in pairs] for layer, pairs in info["members"].items()}
    measurements = _Merged(
        joined, recorded, members, info.get("baseline"), base.spec_path, sampling
    )
    checks = [evaluate_check(PlannedCheck(**p), measurements) for p in info["checks"]]
    return replace(joined, checks=checks)


def _parts(result: AuditResult) -> list[Mapping[str, Any]]:
    info = result.meta["shard"]
    return [info, *info.get("peers", [])]


def merge_shards(runs: Sequence[tuple[Path, AuditResult]]) -> AuditResult:
    """One results.json from every shard of one run, with every check evaluated on the joined
    sweeps (and, with ``statistics:``, every interval on the joined outcomes): equal to the
    serial run's but for ``meta``."""
    _validated(runs)
    _check_complete(runs)
    ordered = sorted(runs, key=lambda pr: int(pr[1].meta["shard"]["index"]))
    first = ordered[0][1]
    seed = int(first.meta.get("seed", 0))
    models = [
        _merge_model([(run.models[m], _parts(run)[m]) for _, run in ordered], seed)
        for m in range(len(first.models))
    ]
    consistency = None
    if "transfer" in first.meta["shard"]:  # compare: labels agree across the joined models
        from .compare import label_consistency

        transfer = first.meta["shard"]["transfer"] or []
        consistency = {**label_consistency(models), "transfer": transfer}
    meta = {k: v for k, v in first.meta.items() if k != "shard"}
    meta["merged_from"] = [str(path) for path, _ in ordered]
    meta["shard_seconds"] = [run.meta.get("seconds") for _, run in ordered]
    return AuditResult(meta=meta, models=models, consistency=consistency)
