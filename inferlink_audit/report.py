"""The self-contained HTML report (README).

One file that opens offline: inline CSS, inline SVG plots, no external resources, and a few
lines of optional JavaScript that nothing depends on (folding uses ``<details>``). Every
number comes from the :class:`~inferlink_audit.results.AuditResult` the caller also writes
to ``results.json``; the only computation here is formatting, ordering, and (in ``plots``)
normalising curves for drawing.

Templates live in ``templates/`` and ship in the wheel as ``inferlink_audit/templates``;
they are read through ``importlib.resources`` and, in a source checkout or editable
install, from the repository's ``templates/`` folder. Everything is autoescaped: the only
markup inserted unescaped is the SVG that :mod:`inferlink_audit.plots` generated.

Section ids are stable so links into a report keep working: ``summary``, then per model
``checks``, ``labels``, ``targeted``, ``curves``, ``attacks``, ``eps-curves``, ``sanity``,
``lipschitz``, ``remediation`` (suffixed ``-2``, ``-3``, … for the second and later models of a
``compare:`` run), then ``consistency`` (when present), ``metadata`` and ``footer``.
"""

from __future__ import annotations

import importlib.resources
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from markupsafe import Markup

from . import __version__
from .fileio import atomic_write_text
from .indicators import GUIDE
from .results import (
    RESPONSES,
    AuditResult,
    CheckResult,
    ModelResult,
    SweepResult,
    UnitSemanticsResult,
)
from .summary import INERT_EXPLANATION, bf16_speed_warning, inert_sweeps

if TYPE_CHECKING:
    from .plots import CurvePlotter

__all__ = ["render_report", "report_html", "templates_root"]

TEMPLATE_NAME = "report.html.j2"
_SOURCE_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

_LABEL_INITIAL = {"fragile": "F", "robust": "R", "antifragile": "A"}
_META_ORDER = ("version", "torch", "device", "seed", "spec_sha256", "started", "seconds")
_META_TITLES = {
    "version": "inferlink-audit version",
    "torch": "torch",
    "device": "device",
    "seed": "seed",
    "spec_sha256": "spec sha256",
    "started": "started",
    "seconds": "duration",
}


# --------------------------------------------------------------------------- templates
def templates_root() -> Traversable:
    """Where the report templates are: inside the installed package, else the source tree."""
    try:
        packaged = importlib.resources.files("inferlink_audit").joinpath("templates")
        if packaged.joinpath(TEMPLATE_NAME).is_file():
            return packaged
    except (ModuleNotFoundError, NotADirectoryError):  # pragma: no cover - exotic loaders
        pass
    if (_SOURCE_TEMPLATES / TEMPLATE_NAME).is_file():
        return _SOURCE_TEMPLATES
    raise FileNotFoundError(
        f"report templates not found: neither inferlink_audit/templates in the installed "
        f"package nor {_SOURCE_TEMPLATES}; reinstall inferlink-audit."
    )


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    root = templates_root()

    def load(name: str) -> str:
        # Traversable works for wheels, zips and plain folders alike.
        return root.joinpath(name).read_text(encoding="utf-8")

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(load),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(pct=fmt_pct, score=fmt_score, num=fmt_num, count=fmt_count)
    return env


# --------------------------------------------------------------------------- formatting
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def fmt_pct(value: float | None) -> str:
    """Accuracies and rates: a fraction in [0, 1] as a percentage with one decimal."""
    if value is None or _missing(value):
        return "—"
    return f"{100.0 * float(value):.1f}%"


def fmt_score(value: float | None) -> str:
    """Filtering scores φ: signed, three decimals (the sign is the message)."""
    if value is None or _missing(value):
        return "—"
    return f"{float(value):+.3f}"


def fmt_count(value: Any) -> str:
    """Parameter counts with thousands separators (a 40-layer table is read by eye)."""
    return (
        f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else fmt_num(value)
    )


def fmt_num(value: Any) -> str:
    """Other measurements (distortion, Lipschitz bounds): four significant digits."""
    if _missing(value):
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_meta(value: Any) -> str:
    """Metadata values as written, with floats shortened and lists joined."""
    if isinstance(value, list | tuple):
        return ", ".join(fmt_meta(v) for v in value)
    if isinstance(value, float):
        return fmt_num(value)
    if value is None:
        return "—"
    return fmt_num(value)


def _check_formatter(check: CheckResult) -> Callable[[Any], str]:
    """Show a check's numbers in the unit its key implies (accuracies as %, counts as ints)."""
    key = check.check or check.id.rsplit("-", 1)[-1]
    if "accuracy" in key:
        return fmt_pct
    if "targeted_layers" in key:
        return lambda v: "—" if _missing(v) else f"{v:.0f}"
    if "fraction" in key or "score" in key or "gain" in key:
        return lambda v: "—" if _missing(v) else f"{v:.3f}"
    return fmt_num


def _comparator(check: CheckResult) -> str:
    key = check.check or check.id.rsplit("-", 1)[-1]
    if key.startswith("min_"):
        return "≥ "
    if key.startswith("max_"):
        return "≤ "
    return ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "x"


# --------------------------------------------------------------------------- view model
@dataclass(frozen=True)
class _Cell:
    label: str
    initial: str
    score: str
    title: str
    filter: str
    attack: str
    response: str
    targeted: bool = False


@dataclass(frozen=True)
class _Column:
    attack: str
    filter: str
    response: str


@dataclass(frozen=True)
class _Row:
    name: str
    kind: str
    numel: str
    cells: list[_Cell | None]
    is_global: bool = False


@dataclass(frozen=True)
class _Scope:
    anchor: str
    name: str
    is_global: bool
    kind: str
    numel: str
    groups: list[tuple[str, list[tuple[str, _Cell, _Cell]]]]  # attack → filter, clean, adv.
    svg: Markup
    notes: list[str]
    caption: str


@dataclass(frozen=True)
class _CheckRow:
    id: str
    passed: bool
    measured: str
    limit: str
    detail: str
    layers: list[str]
    line: int | None
    uncertain: bool = False  # with ``statistics:``: the interval straddles the limit


@dataclass(frozen=True)
class _ModelView:
    suffix: str
    model: ModelResult
    checks: list[_CheckRow]
    n_passed: int
    n_failed: int
    columns: list[_Column]
    multi_attack: bool
    rows: list[_Row]
    targeted: list[dict[str, Any]]
    scopes: list[_Scope]
    attacks: list[dict[str, Any]]
    remediation: dict[str, Any] | None
    definitions: str
    sections: list[tuple[str, str]]
    inert: list[str] = field(default_factory=list)  # sweeps whose filter did not act somewhere
    inert_note: str = INERT_EXPLANATION
    eps_curves: dict[str, Any] | None = None  # accuracy against ε (_eps_view)
    sanity: list[dict[str, Any]] = field(default_factory=list)  # indicators (_sanity_view)
    units: dict[str, Any] | None = None  # analysis.units: the image grids (_units_view)


def _layer_order(model: ModelResult) -> list[str]:
    """Swept layers in model order (``model.layers``), then any others in sweep order."""
    swept = [s.layer for s in model.sweeps if s.scope != "global" and s.layer is not None]
    names = [str(layer.get("name")) for layer in model.layers if layer.get("name") in swept]
    return list(dict.fromkeys(names + swept))


def _layer_info(model: ModelResult) -> dict[str, dict[str, Any]]:
    return {str(layer.get("name")): layer for layer in model.layers}


def _ordered(values: Iterable[str], preferred: Iterable[str] = ()) -> list[str]:
    seen = list(dict.fromkeys(values))
    pref = [v for v in preferred if v in seen]
    return pref + [v for v in seen if v not in pref]


def _cell(sweep: SweepResult, response: str) -> _Cell:
    label = getattr(sweep.labels, response)
    score = getattr(sweep.scores, response)
    symbol = "φc" if response == "clean" else "φa"
    scope = sweep.layer if sweep.layer is not None else "global"
    title = (
        f"{scope} · {sweep.filter} · {sweep.attack} · {response}: "
        f"{label}, {symbol} = {fmt_score(score)}"
    )
    targeted = response == "adversarial" and sweep.targeted
    if targeted:
        title += f"; targeted (φΔ = {fmt_score(sweep.scores.difference)})"
    if sweep.statistics is not None:
        stats = sweep.statistics
        lo, hi = stats.scores_ci.get(response, [math.nan, math.nan])
        probability = stats.label_probability.get(response, {}).get(label, math.nan)
        title += (
            f"; {stats.confidence:.0%} interval [{fmt_score(lo)}, {fmt_score(hi)}],"
            f" P({label}) = {probability:.2f}"
        )
    return _Cell(
        label=label,
        initial=_LABEL_INITIAL.get(label, "?"),
        score=fmt_score(score),
        title=title,
        filter=sweep.filter,
        attack=sweep.attack,
        response=response,
        targeted=targeted,
    )


def _check_rows(model: ModelResult) -> list[_CheckRow]:
    rows = []
    # Failures first, otherwise in the spec's order (a stable sort keeps it).
    for check in sorted(model.checks, key=lambda c: c.passed):
        fmt = _check_formatter(check)
        measured = fmt(check.measured)
        if check.ci is not None:
            measured += f" [{fmt(check.ci[0])}, {fmt(check.ci[1])}]"
        rows.append(
            _CheckRow(
                id=check.id,
                passed=check.passed,
                measured=measured,
                uncertain=check.certain is False,
                limit=_comparator(check) + fmt(check.limit),
                detail=check.detail,
                layers=list(check.layers),
                line=check.line,
            )
        )
    return rows


def _split_scopes(model: ModelResult) -> tuple[list[SweepResult], dict[str, list[SweepResult]]]:
    """Global sweeps, and local sweeps by layer."""
    local: dict[str, list[SweepResult]] = {}
    global_sweeps: list[SweepResult] = []
    for sweep in model.sweeps:
        if sweep.scope == "global" or sweep.layer is None:
            global_sweeps.append(sweep)
        else:
            local.setdefault(sweep.layer, []).append(sweep)
    return global_sweeps, local


def _heat_row(
    name: str,
    sweeps: list[SweepResult],
    columns: list[_Column],
    layer: dict[str, Any],
    *,
    is_global: bool = False,
) -> _Row:
    by_key = {(s.attack, s.filter): s for s in sweeps}
    cells: list[_Cell | None] = []
    for col in columns:
        sweep = by_key.get((col.attack, col.filter))
        cells.append(None if sweep is None else _cell(sweep, col.response))
    return _Row(
        name=name,
        kind=str(layer.get("type", "")),
        numel=fmt_count(layer.get("numel", sweeps[0].numel)),
        cells=cells,
        is_global=is_global,
    )


def _targeted_rows(
    model: ModelResult, attacks: list[str], filters: list[str], order: list[str]
) -> list[dict[str, Any]]:
    """Per filter and attack: the targeted layers in model order, and the global scope."""
    rows = []
    for attack in attacks:
        for name in filters:
            same = [s for s in model.sweeps if s.attack == attack and s.filter == name]
            hits = [s for s in same if s.targeted and s.scope != "global" and s.layer is not None]
            hits.sort(key=lambda s: order.index(s.layer) if s.layer in order else len(order))
            glob = next((s for s in same if s.scope == "global" or s.layer is None), None)
            rows.append(
                {
                    "attack": attack,
                    "filter": name,
                    "layers": [(s.layer, fmt_score(s.scores.difference)) for s in hits],
                    "global": None
                    if glob is None
                    else (fmt_score(glob.scores.difference), glob.targeted),
                }
            )
    return rows


def _scope_view(
    model: ModelResult,
    k: int,
    name: str,
    sweeps: list[SweepResult],
    *,
    is_global: bool,
    suffix: str,
    svg_prefix: str,
    attacks: list[str],
    filters: list[str],
    layer: dict[str, Any],
    plotter: CurvePlotter,
) -> _Scope:
    from .plots import normalise_sweep

    if is_global:
        covered = sweeps[0].layers
        title = f"global: all {len(covered)} analysed layers" if covered else "global"
    else:
        title = name
    by_key = {(s.attack, s.filter): s for s in sweeps}
    groups = [
        (
            attack,
            [
                (f, _cell(by_key[(attack, f)], "clean"), _cell(by_key[(attack, f)], "adversarial"))
                for f in filters
                if (attack, f) in by_key
            ],
        )
        for attack in attacks
        if any(key[0] == attack for key in by_key)
    ]
    notes = sorted(
        {
            f"{s.attack}: ψa⁰ = 0, so the adversarial curve is normalised by the clean "
            f"accuracy ψc⁰ = {fmt_pct(model.clean_accuracy)}"
            for s in sweeps
            if normalise_sweep(model, s).adversarial_by_clean
        }
    ) + [f"inert: {line}" for line in inert_sweeps(sweeps)]
    svg = plotter.svg(model, sweeps, title=title, id_prefix=f"{svg_prefix}-{k}")
    return _Scope(
        anchor=f"curve{suffix}-{k}-{_slug(name)}",
        name=title,
        is_global=is_global,
        kind="" if is_global else str(layer.get("type", "")),
        numel=fmt_count(layer.get("numel", sweeps[0].numel)),
        groups=groups,
        svg=Markup(svg),  # drawn by plots.py from our own data; matplotlib escaped all text
        notes=notes,
        caption=f"Normalised responses of {title} to each filter",
    )


def _attack_rows(model: ModelResult) -> list[dict[str, str]]:
    return [
        {
            "id": a.id,
            "kind": a.kind,
            "params": ", ".join(f"{k}={fmt_meta(v)}" for k, v in a.params.items()),
            "accuracy": fmt_pct(a.accuracy),
            "success_rate": fmt_pct(a.success_rate),
            "successes": fmt_num(a.successes),
            # Results written before distortion was averaged over successful examples only.
            "over_all": "" if a.distortion_over == "successful" else "yes",
            "rms": fmt_num(a.distortion_rms),
            "linf": fmt_num(a.distortion_linf),
            "l2": fmt_num(a.distortion_l2),
        }
        for a in model.attacks
    ]


def _definitions(model: ModelResult) -> str:
    return (
        "Labels per docs/method.md §4: antifragile if ∫max(0, r − 1)dα̂ > τ, fragile if φ < −τ, "
        f"else robust; τ = {fmt_num(model.tolerance)}; a layer is targeted by an attack "
        f"if φΔ < −τ. Values: {model.values}. Adversarial examples crafted against the "
        f"{model.adversarial_source} network. r = ψ/ψ⁰, baseline b = 1 − ρ, α̂ = k/(n − 1); "
        "integrals by composite Simpson's rule over α̂."
    )


_SECTIONS = (
    ("checks", "Checks"),
    ("labels", "Layer labels"),
    ("targeted", "Targeted layers"),
    ("curves", "Response curves"),
    ("attacks", "Attacks"),
    ("eps-curves", "ε curves"),
    ("sanity", "Attack-failure indicators"),
    ("lipschitz", "Lipschitz"),
    ("remediation", "Remediation"),
    ("units", "Unit semantics"),
)


def _model_view(model: ModelResult, index: int, plotter: CurvePlotter) -> _ModelView:
    """Everything the template shows for one model, formatted and ordered."""
    from .plots import FILTER_ORDER

    suffix = "" if index == 0 else f"-{index + 1}"
    filters = _ordered((s.filter for s in model.sweeps), FILTER_ORDER)
    # Attacks in the spec's order (model.attacks), then any only the sweeps name.
    attacks = _ordered([a.id for a in model.attacks] + [s.attack for s in model.sweeps])
    attacks = [a for a in attacks if any(s.attack == a for s in model.sweeps)]
    columns = [_Column(a, f, r) for a in attacks for f in filters for r in RESPONSES]
    info = _layer_info(model)
    order = _layer_order(model)
    global_sweeps, local = _split_scopes(model)

    rows = [_heat_row(name, local[name], columns, info.get(name, {})) for name in order]
    if global_sweeps:
        rows.insert(0, _heat_row("global (all layers)", global_sweeps, columns, {}, is_global=True))

    scope_list = [("global", global_sweeps, True)] if global_sweeps else []
    scope_list += [(name, local[name], False) for name in order]
    scopes = [
        _scope_view(
            model,
            k,
            name,
            sweeps,
            is_global=is_global,
            suffix=suffix,
            svg_prefix=f"svg-m{index + 1}",
            attacks=attacks,
            filters=filters,
            layer={} if is_global else info.get(name, {}),
            plotter=plotter,
        )
        for k, (name, sweeps, is_global) in enumerate(scope_list)
    ]
    checks = _check_rows(model)
    n_failed = sum(not c.passed for c in checks)
    return _ModelView(
        suffix=suffix,
        model=model,
        checks=checks,
        n_passed=len(checks) - n_failed,
        n_failed=n_failed,
        columns=columns,
        multi_attack=len(attacks) > 1,
        rows=rows,
        targeted=_targeted_rows(model, attacks, filters, order),
        scopes=scopes,
        attacks=_attack_rows(model),
        remediation=_remediation_view(model.remediation),
        definitions=_definitions(model),
        sections=[(f"{sid}{suffix}", title) for sid, title in _SECTIONS],
        inert=inert_sweeps(model.sweeps),
        eps_curves=_eps_view(model, index),
        sanity=_sanity_view(model),
        units=_units_view(model.units),
    )


UNITS_POINT = (
    "Szegedy et al. (2014, §3) found that the test images that most activate a single unit "
    "look no more alike than those that most align with a random direction of the same "
    "layer: the meaning lives in the space of activations, not in its coordinates. Compare "
    'the rows below. If the random directions look as "semantic" as the units, individual '
    "units carry no special meaning, and reading one unit as a detector of one concept is "
    "not supported."
)


def _units_view(units: UnitSemanticsResult | None) -> dict[str, Any] | None:
    """The unit-semantics grids: one row of top-k images per unit, then per direction."""
    if units is None:
        return None
    reduced = (
        f"its {'×'.join(map(str, units.activation_shape))} output averaged over spatial "
        f"positions to a {units.dimensions}-vector"
        if units.reduction == "spatial_mean"
        else f"its {units.dimensions}-dimensional output"
    )
    method = (
        f"Layer {units.layer}: {reduced}. Units: the {len(units.units)} most variable over the "
        f"test set. Directions: {len(units.directions)} random unit vectors drawn from seed "
        f"{units.seed}. Each row shows the {units.k} test images with the largest activation "
        "(units) or projection (directions), largest first, with the example's index, class "
        "and value, and how many of them share the row's most common class (docs/method.md §9)."
    )

    def row(top: Any, label: str) -> dict[str, Any]:
        examples = []
        for index, value in zip(top.examples, top.values, strict=True):
            cls = units.labels.get(str(index))
            text = f"#{index}" + ("" if cls is None else f" · class {cls}")
            examples.append(
                {
                    "index": index,
                    "src": units.images.get(str(index)),
                    "caption": text,
                    "value": fmt_num(value),
                    "title": f"test example {text}: {fmt_num(value)}",
                }
            )
        alike = (
            ""
            if top.majority_share is None
            else f"class {top.majority_class}: {round(top.majority_share * len(top.examples))}"
            f"/{len(top.examples)}"
        )
        return {"label": label, "alike": alike, "examples": examples}

    def share(rows: list[Any]) -> str:
        shares = [r.majority_share for r in rows if r.majority_share is not None]
        return fmt_pct(sum(shares) / len(shares)) if shares else "—"

    summary = (
        f"Share of the top {units.k} images in their row's most common class, on average: "
        f"units {share(units.units)}, random directions {share(units.directions)}."
    )

    groups = [
        (
            "Natural-basis units",
            [row(u, f"unit {u.index} (variance {fmt_num(u.variance)})") for u in units.units],
        ),
        ("Random directions", [row(d, f"direction {d.index}") for d in units.directions]),
    ]
    return {
        "point": UNITS_POINT,
        "method": method,
        "summary": summary,
        "groups": groups,
        "note": units.image_note,
    }


def _eps_view(model: ModelResult, index: int) -> dict[str, Any] | None:
    """Accuracy against ε: the plot, and per attack its points with their intervals."""
    if not model.eps_curves:
        return None
    from .eps_plots import eps_curves_svg  # matplotlib: only to draw a report

    rows = []
    for curve in model.eps_curves:
        cis: list[list[float] | None] = [None] * len(curve.values)
        if curve.accuracy_ci is not None:
            cis = list(curve.accuracy_ci)
        points = [
            f"{fmt_num(value)}: {fmt_pct(acc)}"
            + ("" if ci is None else f" [{fmt_pct(ci[0])}, {fmt_pct(ci[1])}]")
            for value, acc, ci in zip(curve.values, curve.accuracy, cis, strict=True)
        ]
        sweep = curve.values[curve.attacks.index(curve.sweep_attack)]
        rows.append(
            {
                "label": curve.label,
                "parameter": "σ" if curve.parameter == "sigma" else "ε",
                "points": points,
                "sweep": f"{fmt_num(sweep)} ({curve.sweep_attack})",
            }
        )
    svg = eps_curves_svg(model.eps_curves, model.clean_accuracy, id_prefix=f"svg-eps-m{index + 1}")
    return {"svg": Markup(svg), "rows": rows}  # our own plot; matplotlib escaped all text


def _indicator_value(name: str, value: float) -> str:
    """Shares as percentages, accuracy differences as signed points."""
    if name in ("iterative_weaker", "eps_not_monotone", "black_box_stronger"):
        return f"{100.0 * value:+.1f} pts"
    return fmt_pct(value)


def _sanity_view(model: ModelResult) -> list[dict[str, Any]]:
    """The attack-failure indicators, grouped by indicator in a fixed order: what each
    measures and what to do when it fires, then its reading per attack (fired first)."""
    groups = []
    for name, guide in GUIDE.items():
        readings = sorted(
            (c for c in model.checks if c.check == name), key=lambda c: (c.passed, c.id)
        )
        if not readings:
            continue
        rows = []
        for check in readings:
            shown = ", ".join(str(i) for i in (check.examples or [])[:20])
            count = check.examples_count or 0
            more = f", … {count - 20} more" if count > 20 else ""
            rows.append(
                {
                    "attack": check.id.removesuffix(f"-{name}") if check.id != name else "model",
                    "passed": check.passed,
                    "measured": _indicator_value(name, check.measured),
                    "limit": "≤ " + _indicator_value(name, check.limit).removeprefix("+"),
                    "count": count,
                    "examples": shown + more,
                    "detail": check.detail,
                }
            )
        fired = sum(not row["passed"] for row in rows)
        groups.append(
            {
                "name": name,
                "title": guide.title,
                "measures": guide.measures,
                "concerns": guide.concerns,
                "action": guide.action[:1].upper() + guide.action[1:],
                "fired": fired,
                "rows": rows,
            }
        )
    return groups


def _remediation_view(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if data is None:
        return None
    runs = []
    for key, title in (
        ("selective", "selective (fragile layers frozen)"),
        ("control", "control (all layers trained)"),
    ):
        run = data.get(key)
        if isinstance(run, dict):
            runs.append(
                {
                    "name": title,
                    "clean_before": fmt_pct(run.get("clean_before")),
                    "clean_after": fmt_pct(run.get("clean_after")),
                    "adversarial_before": fmt_pct(run.get("adversarial_before")),
                    "adversarial_after": fmt_pct(run.get("adversarial_after")),
                }
            )
    known = {"selective", "control", "frozen_layers", "trained_layers", "checkpoint"}
    extra = [
        (k, fmt_meta(v)) for k, v in data.items() if k not in known and not isinstance(v, dict)
    ]
    normalisation = data.get("normalisation")
    if isinstance(normalisation, dict):  # which normalisation trains or stays with which layer
        pairs = [f"{layer} → {fmt_meta(mods)}" for layer, mods in normalisation.items()]
        extra.append(("normalisation", ", ".join(pairs) or "none"))
    return {
        "frozen": list(data.get("frozen_layers") or []),
        "trained": list(data.get("trained_layers") or []),
        "checkpoint": data.get("checkpoint"),
        "runs": runs,
        "extra": extra,
    }


def _meta_rows(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Known keys first in a fixed order, then everything else as written (nested dicts too)."""
    keys = [k for k in _META_ORDER if k in meta] + [k for k in meta if k not in _META_ORDER]
    rows = []
    for key in keys:
        value = meta[key]
        if key == "seconds" and isinstance(value, int | float) and not isinstance(value, bool):
            text = f"{fmt_num(float(value))} s"
        else:
            text = fmt_meta(value) if not isinstance(value, dict) else ""
        nested = (
            [(str(k), fmt_meta(v) if not isinstance(v, dict) else str(v)) for k, v in value.items()]
            if isinstance(value, dict)
            else []
        )
        rows.append({"key": _META_TITLES.get(key, key), "value": text, "nested": nested})
    return rows


def _consistency_view(data: dict[str, Any] | None, models: list[str]) -> dict[str, Any] | None:
    if not data:
        return None
    layers = data.get("layers") or []
    names = list(models)
    for entry in layers:
        for name in entry.get("labels") or {}:
            if name not in names:
                names.append(name)
    rows = []
    for entry in layers:
        labels = entry.get("labels") or {}
        distinct = {v for v in labels.values() if v is not None}
        rows.append(
            {
                "layer": entry.get("layer"),
                "filter": entry.get("filter"),
                "response": entry.get("response"),
                "attack": entry.get("attack", ""),
                "cells": [
                    (labels.get(n), _LABEL_INITIAL.get(str(labels.get(n)), "")) for n in names
                ],
                "agree": len(distinct) <= 1,
            }
        )
    transfer = data.get("transfer") or []
    sources = list(dict.fromkeys(t["source"] for t in transfer))
    targets = list(dict.fromkeys(t["target"] for t in transfer))
    by_key = {(t["attack"], t["source"], t["target"]): t["accuracy"] for t in transfer}
    transfer_rows = [
        {
            "attack": attack,
            "source": source,
            "cells": [
                (fmt_pct(by_key.get((attack, source, target))), source == target)
                for target in targets
            ],
        }
        for attack in dict.fromkeys(t["attack"] for t in transfer)
        for source in sources
        if any((attack, source, target) in by_key for target in targets)
    ]
    return {
        "agreement": fmt_pct(data.get("agreement")),
        "note": data.get("note", ""),
        "models": names,
        "rows": rows,
        "transfer_targets": targets,
        "transfer_rows": transfer_rows,
    }


# --------------------------------------------------------------------------- rendering
def report_html(result: AuditResult, *, results_name: str = "results.json") -> str:
    """The report as one HTML string; ``results_name`` is the link to the JSON beside it."""
    from .plots import CurvePlotter  # matplotlib is heavy: import it only to draw a report

    plotter = CurvePlotter()
    views = [_model_view(m, i, plotter) for i, m in enumerate(result.models)]
    n_failed = sum(v.n_failed for v in views)
    n_checks = sum(len(v.checks) for v in views)
    audit_version = result.meta.get("version")
    template = _environment().get_template(TEMPLATE_NAME)
    return template.render(
        result=result,
        passed=result.passed,
        views=views,
        n_checks=n_checks,
        n_failed=n_failed,
        n_passed=n_checks - n_failed,
        results_name=results_name,
        meta_rows=_meta_rows(result.meta),
        consistency=_consistency_view(result.consistency, [m.name for m in result.models]),
        tool_version=__version__,
        audit_version=audit_version,
        bf16_speed=result.meta.get("bf16_speed"),
        bf16_slower=bf16_speed_warning(result.meta),
        title=" · ".join(m.name for m in result.models) or "inferlink-audit",
    )


def render_report(
    result: AuditResult, out_dir: Path, *, results_name: str = "results.json"
) -> Path:
    """Write ``out_dir/report.html`` atomically and return its path.

    The caller writes ``results.json`` (the report only links to it by relative name), so
    the two files can be moved together and the link still works.
    """
    html = report_html(result, results_name=results_name)
    return atomic_write_text(Path(out_dir) / "report.html", html)
