"""What a person reads at the end of a run: the terminal section and the CI step summary."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from inferlink_audit.results import AuditResult, ModelResult
from inferlink_audit.summary import INERT_EXPLANATION, bf16_speed_warning, inert_sweeps

from .assemble import SpecStats

__all__ = ["finding_lines", "step_summary", "terminal_lines"]

_WORST_LAYERS = 3
SHARD_NOTE = (
    "this is one CI shard: join every shard's results.json with 'inferlink-audit merge' "
    "for the audit's verdict and report"
)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def finding_lines(result: AuditResult | None) -> list[str]:
    """Findings that fail no item but change how the results read: inert filtering, a bf16
    run slower than fp32 would have been."""
    lines = []
    for model in result.models if result is not None else []:
        inert = inert_sweeps(model.sweeps)
        if inert:
            lines.append(f"WARNING {model.name}: inert filtering: {'; '.join(inert)}.")
            lines.append(f"  {INERT_EXPLANATION}")
    speed = None if result is None else bf16_speed_warning(result.meta)
    if speed:
        lines.append(f"WARNING {speed}")
    return lines


def terminal_lines(
    stats: list[SpecStats],
    collect_errors: dict[str, str],
    written: list[Path],
    problems: list[str],
    shard_notes: Mapping[str, str] | None = None,
) -> list[str]:
    """Per spec its verdict and where its sweeps came from; the report's path comes last.
    A CI shard (``shard_notes``: spec -> "shard 1/2: 2 of 4 sweep groups") says what it
    holds instead of a verdict on the whole audit, and lists its shard files."""
    lines = []
    for s in stats:
        counts = f"{s.passed} passed, {s.failed} failed" + (
            f", {s.errors} errors" if s.errors else ""
        )
        uncertain = f", {s.uncertain} uncertain" if s.uncertain else ""
        verdict = (shard_notes or {}).get(s.spec, s.verdict)
        lines.append(
            f"{s.name} ({Path(s.spec).name}): {verdict}: {counts}{uncertain}; "
            f"{s.computed} sweeps computed, {s.from_cache} from cache"
        )
    for nodeid, message in collect_errors.items():
        lines.append(f"{nodeid}: not collected: {_first_line(message)}")
    lines.extend(problems)
    if shard_notes:
        lines.extend(f"shard results: {path}" for path in written)
        lines.append(SHARD_NOTE)
    elif written:
        lines.extend(f"{path.stem}: {path}" for path in written[:-1])
        lines.append(f"report: {written[-1]}")
    return lines


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _number(value: float) -> str:
    if value != value:  # NaN: the check could not measure
        return "–"
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def _worst_layers(model: ModelResult) -> list[str]:
    local = [s for s in model.sweeps if s.scope == "local"]
    worst = sorted(local, key=lambda s: s.scores.adversarial)[:_WORST_LAYERS]
    if not worst:
        return []
    rows = [
        "| layer | filter | attack | score clean | score adversarial "
        "| labels clean / adversarial |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in worst:
        rows.append(
            f"| `{_cell(s.layer)}` | {s.filter} | {s.attack} | {s.scores.clean:+.3f} | "
            f"{s.scores.adversarial:+.3f} | {s.labels.clean} / {s.labels.adversarial}"
            f"{' (targeted)' if s.targeted else ''} |"
        )
    return ["", "Worst layers (lowest adversarial score):", "", *rows]


def step_summary(
    result: AuditResult | None,
    stats: list[SpecStats],
    report: Path | None,
    collect_errors: dict[str, str],
    shard_notes: Mapping[str, str] | None = None,
) -> str:
    """Markdown for ``$GITHUB_STEP_SUMMARY``: a verdict per check, the worst layers, the report.
    A CI shard's says which share it ran and that the verdict on the audit comes from merge."""
    failed = any(s.verdict != "PASS" for s in stats) or bool(collect_errors)
    notes = shard_notes or {}
    title = "FAIL" if failed else "PASS"
    out = ["", f"## inferlink-audit: {'one shard, its checks ' if notes else ''}{title}"]
    if notes:
        out += ["", f"{SHARD_NOTE[0].upper()}{SHARD_NOTE[1:]}."]
    by_spec = {s.spec: s for s in stats}
    for model in result.models if result is not None else []:
        s = by_spec.get(model.spec_path)
        verdict = (
            s.verdict
            if s is not None
            else ("PASS" if all(c.passed for c in model.checks) else "FAIL")
        )
        mark = "✅" if verdict == "PASS" else "❌"
        if model.spec_path in notes:
            verdict = f"{notes[model.spec_path]}, {verdict}"
        out += ["", f"### {mark} {_cell(model.name)}: {verdict}", ""]
        facts = [f"`{Path(model.spec_path).name}`", f"{model.n_examples} examples"]
        if model.clean_accuracy == model.clean_accuracy:
            facts.append(f"clean accuracy {model.clean_accuracy:.2%}")
        if s is not None:
            facts.append(f"{s.computed} sweeps computed, {s.from_cache} from cache")
        out.append(" · ".join(facts))
        if model.checks:
            out += [
                "",
                "| check | verdict | measured | limit | detail |",
                "| --- | --- | --- | --- | --- |",
            ]
            for check in model.checks:
                mark = "✅ pass" if check.passed else "❌ fail"
                if check.certain is False:
                    mark += " (uncertain)"
                measured = _number(check.measured)
                if check.ci is not None:
                    measured += f" [{_number(check.ci[0])}, {_number(check.ci[1])}]"
                out.append(
                    f"| `{_cell(check.id)}` | {mark} | {measured} | "
                    f"{_number(check.limit)} | {_cell(check.detail)} |"
                )
        out += _worst_layers(model)
    if collect_errors:
        out += ["", "Specs that could not be collected:", ""]
        out += [
            f"- `{_cell(node)}`: {_cell(_first_line(msg))}" for node, msg in collect_errors.items()
        ]
    if report is not None:
        out += ["", f"Report: `{report}` (numbers: `{report.with_name('results.json')}`)"]
    return "\n".join(out) + "\n"
