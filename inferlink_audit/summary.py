"""One-screen text summaries of a result: the terminal's and the CI step summary's."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .indicators import GUIDE
from .results import AuditResult, ModelResult, SweepResult

_SHORT = {"fragile": "F", "robust": "r", "antifragile": "A"}

INERT_EXPLANATION = (
    "At these thresholds the filter zeroed nonzero weights, yet every clean logit on the whole "
    "test set stayed bit-identical to the unfiltered network's: the filter did not act there, "
    "so those points measure the unfiltered network. The layer is bypassed (its output unused "
    "or multiplied by zero), or the zeroed weights only touch units that are zero on every "
    "input (dead ReLUs). Labels are computed all the same and no check fails for this alone; "
    "look at the layer, or leave it out with filtering.layers.exclude."
)


def inert_sweeps(sweeps: Iterable[SweepResult]) -> list[str]:
    """One line per sweep with inert thresholds (``SweepResult.inert_thresholds``)."""
    return [
        f"{s.layer or 'global'} · {s.filter} · {s.attack}: {len(s.inert_thresholds)} of "
        f"{len(s.thresholds)} thresholds"
        for s in sweeps
        if s.inert_thresholds
    ]


def label_table(model: ModelResult) -> list[str]:
    """Layers × filter (per attack): clean/adversarial label initials, e.g. ``r/F``."""
    columns = sorted({(s.filter, s.attack) for s in model.sweeps}, key=lambda c: (c[1], c[0]))
    rows = [s.layer or "" for s in model.sweeps if s.scope == "local"]
    names = list(dict.fromkeys(rows)) + (
        ["(global)"] if any(s.scope == "global" for s in model.sweeps) else []
    )
    if not names:
        return []
    by_key = {(s.layer or "(global)", s.filter, s.attack): s for s in model.sweeps}
    width = max(len(n) for n in names) + 2
    multi_attack = len({c[1] for c in columns}) > 1
    heads = [f"{f}{'@' + a if multi_attack else ''}" for f, a in columns]
    col_w = max(9, *(len(h) + 2 for h in heads))
    lines = ["layer".ljust(width) + "".join(h.ljust(col_w) for h in heads)]
    for name in names:
        cells = []
        for f, a in columns:
            s = by_key.get((name, f, a))
            cells.append(
                (
                    f"{_SHORT[s.labels.clean]}/{_SHORT[s.labels.adversarial]}"
                    + ("*" if s.targeted else "")
                    if s
                    else "-"
                ).ljust(col_w)
            )
        lines.append(name.ljust(width) + "".join(cells))
    lines.append(
        "labels clean/adversarial: F fragile, r robust, A antifragile; * targeted by the attack"
    )
    return lines


def bf16_speed_warning(meta: dict[str, Any]) -> str | None:
    """When ``compute.precision: bf16`` measured slower than fp32 on this model and device
    (``meta.bf16_speed``): say so, since the mode exists only to be faster."""
    speed = meta.get("bf16_speed")
    if not speed or speed["speedup"] >= 1.0:
        return None
    return (
        f"compute.precision: bf16 ran at {speed['speedup']:.2f}x fp32's speed on this model "
        f"and device (the unfiltered network under {speed['attack']}, {speed['examples']} "
        f"examples: {speed['bf16_seconds']:.3f} s in bf16 against {speed['fp32_seconds']:.3f} s "
        "in fp32). bf16 pays on large convolutions and matrix units, not on small or depthwise "
        "layers: without compute.precision this audit is exact and likely faster."
    )


def sequential_line(model: ModelResult) -> str | None:
    """What a sequential run used (``statistics.sequential``): examples per unfiltered
    accuracy, sweeps decided early and sweeps the test set ran out on; None otherwise."""
    settings = (model.statistics or {}).get("sequential")
    if not settings or "examples" not in settings:
        return None
    records = [s.sequential for s in model.sweeps if s.sequential is not None]
    early = sum(1 for r in records if r.stopped_early)
    uncertain = sum(1 for r in records if not r.decided)
    used = ", ".join(f"{key} {count}" for key, count in settings["examples"].items())
    return (
        f"sequential: {used} of {model.n_examples} examples; sweeps: {early} of {len(records)} "
        f"decided early, {uncertain} uncertain when the data ran out "
        f"(looks at {settings['look_confidence']:.2%})"
    )


def text_summary(result: AuditResult) -> str:
    out: list[str] = []
    for model in result.models:
        out.append(
            f"== {model.name}: clean accuracy {model.clean_accuracy:.2%} "
            f"on {model.n_examples} examples"
        )
        for attack in model.attacks:
            out.append(
                f"   {attack.id}: accuracy {attack.accuracy:.2%}, "
                f"success rate {attack.success_rate:.2%}, "
                f"rms distortion {attack.distortion_rms:.4f}"
            )
        out.extend("   " + line for line in label_table(model))
        inert = inert_sweeps(model.sweeps)
        if inert:
            out.append(f"   WARNING inert filtering: {'; '.join(inert)}.")
            out.append(f"   {INERT_EXPLANATION}")
        passed = [c for c in model.checks if c.passed]
        failed = [c for c in model.checks if not c.passed]
        uncertain = [c for c in model.checks if c.certain is False]
        counts = f"{len(passed)} passed, {len(failed)} failed"
        if model.statistics is not None:
            counts += f", {len(uncertain)} uncertain at {model.statistics['confidence']:.0%}"
        out.append(f"   checks: {counts}")
        sequential = sequential_line(model)
        if sequential:
            out.append(f"   {sequential}")
        indicators = [c for c in model.checks if c.check in GUIDE]
        if indicators:
            fired = [c.id for c in indicators if not c.passed]
            out.append(
                f"   attack-failure indicators: {len(indicators) - len(fired)} quiet, "
                f"{len(fired)} fired" + (f" ({', '.join(fired)})" if fired else "")
            )
        for check in failed:
            out.append(f"   FAIL {check.id}: {check.detail}")
        for check in uncertain:
            if check.passed:
                out.append(f"   UNCERTAIN {check.id}: {check.detail}")
    speed = bf16_speed_warning(result.meta)
    if speed:
        out.append(f"WARNING {speed}")
    out.append("verdict: " + ("PASS" if result.passed else "FAIL"))
    return "\n".join(out)
