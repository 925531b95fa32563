"""``--inferlink-shard I/N``: the shard files a pytest shard writes (the items it keeps are
chosen in ``plugin.pytest_collection_modifyitems``).

Each spec is split on its own, with exactly the plan ``inferlink-audit run SPEC --shard I/N``
uses (``inferlink_audit.shards``), so a spec's shard file from pytest and from the command
line hold the same sweep groups and ``inferlink-audit merge`` joins either. A spec that
compares models (``compare:``) is written together with the specs it compares, as
``inferlink-audit run`` writes it. The model-wide items (clean accuracy, attacks on the
unfiltered network, Lipschitz bounds, transferability) run in shard 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferlink_audit.results import AuditResult

from .assemble import assemble_result

if TYPE_CHECKING:
    from inferlink_audit.shards import Shard
    from inferlink_audit.spec import AuditSpec

__all__ = ["ShardFile", "shard_files"]


@dataclass(frozen=True)
class ShardFile:
    """One audit's shard: where its results.json goes and what it holds."""

    path: Path
    result: AuditResult
    notes: dict[str, str]  # spec path -> "shard 1/2: 2 of 4 sweep groups"


def _units(specs: dict[str, AuditSpec]) -> list[list[str]]:
    """The specs written to one file each: a spec with the specs it compares (run order)."""
    compared = {
        path: [str(Path(p).resolve()) for p in spec.compare if str(Path(p).resolve()) in specs]
        for path, spec in specs.items()
    }
    peers = {p for paths in compared.values() for p in paths}
    # A compared spec is written with the spec that compares it, not on its own.
    return [[path, *compared[path]] for path in specs if path not in peers]


def _by_model(result: AuditResult, paths: Sequence[str]) -> AuditResult:
    order = {p: i for i, p in enumerate(paths)}
    models = sorted(result.models, key=lambda m: order.get(m.spec_path, len(order)))
    return replace(result, models=models, consistency=None)  # merge computes it on all sweeps


def _not_run(spec: AuditSpec, shard: Shard, ran: set[str]) -> list[str]:
    """The items of the spec's share that no payload came from (``-k``, ``--lf``, a plugin)."""
    from inferlink_audit.checks import plan_checks
    from inferlink_audit.shards import in_shard, shard_of_spec

    keys = shard_of_spec(spec, shard)
    return [p.id for p in plan_checks(spec) if in_shard(p, keys, shard) and p.id not in ran]


def shard_files(
    payloads: list[dict[str, Any]], shard: Shard, report_dir: Path, *, seconds: float
) -> list[ShardFile]:
    """One shard file per audited spec (a spec that compares: with the compared models), in
    ``report_dir`` when the run has one, else in ``report_dir/<spec name>/``. A shard that
    did not run all of its items says which (``missing_items``), and merge refuses it."""
    from inferlink_audit.shards import shard_note, shard_record
    from inferlink_audit.spec_loader import load_spec

    by_path: dict[str, list[dict[str, Any]]] = {}
    for payload in sorted(payloads, key=lambda p: p["spec_index"]):
        by_path.setdefault(payload["spec"], []).append(payload)
    specs = {path: load_spec(Path(path)) for path in by_path}
    members = {p["spec"]: p["model"]["scope_members"] for p in payloads if p["model"] is not None}
    units = _units(specs)
    files = []
    for paths in units:
        result = assemble_result([p for path in paths for p in by_path[path]], seconds=seconds)
        if result is None or not any(m.spec_path == paths[0] for m in result.models):
            continue  # the spec's model never loaded: its items' errors say why
        result = _by_model(result, paths)
        held = [m.spec_path for m in result.models]
        root = specs[paths[0]]
        transfer = next((p["transfer"] for p in by_path[paths[0]] if p.get("transfer")), None)
        record = shard_record(
            shard,
            [(specs[path], m, members[path]) for path, m in zip(held, result.models, strict=True)],
            transfer=transfer if root.compare and shard.index == 1 else None,
        )
        notes = {}
        for path, part in zip(held, [record, *record.get("peers", [])], strict=True):
            missing = _not_run(specs[path], shard, {p["check_id"] for p in by_path[path]})
            if missing:
                part["missing_items"] = missing
            notes[path] = shard_note(shard, len(part["sweeps"]), len(part["all_sweeps"]))
        result = replace(result, meta={**result.meta, "shard": record})
        folder = report_dir if len(units) == 1 else report_dir / root.name
        files.append(ShardFile(folder / "results.json", result, notes))
    return files
