"""Response-curve figures for the HTML report, as inline SVG strings (docs/method.md §4; README).

Figures are built on ``matplotlib.figure.Figure`` directly, never through pyplot, so no
backend is selected and no global figure state is created: the report can be rendered
inside a pytest session (or any host program) without disturbing its own plotting. The
rcParams a figure needs are applied with ``rc_context`` only while it is drawn.

Several SVGs share one HTML page, so every ``id`` an SVG defines (clip paths, tick
markers, matplotlib's group ids) is prefixed with a per-plot prefix, and the per-file
boilerplate (XML prolog, doctype, metadata, the global ``<style>`` rule, repeated font
lists) is stripped; the page's CSS supplies those once.

The only computation here is the normalisation of docs/method.md §4 needed to draw the curves:
r = ψ/ψ⁰, baseline b = 1 − ρ, α̂ₖ = k/(n − 1). Scores and labels are shown as the audit
computed them, never recomputed.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.typing import RcKeyType

from .results import ModelResult, SweepResult

__all__ = [
    "COLOURS",
    "FILTER_ORDER",
    "CurvePlotter",
    "NormalisedCurves",
    "normalise_sweep",
    "response_curves_svg",
]

#: Filters in the order docs/method.md §2 lists them; unknown filters follow in first-seen order.
FILTER_ORDER: tuple[str, ...] = ("low_pass", "high_pass", "pulse")

#: Colours shared with the report's CSS so the plots and the heat map speak one language.
COLOURS: dict[str, str] = {
    "clean": "#1f4e79",
    "adversarial": "#c0501f",
    "baseline": "#333333",
    "fragile": "#c62828",
    "robust": "#5b7fa6",
    "antifragile": "#2e7d32",
}

_RC: dict[RcKeyType, Any] = {
    # Text stays text: searchable, selectable, and far smaller than glyph paths.
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.size": 7.5,
    "axes.titlesize": 7.5,
    "axes.labelsize": 7.5,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.linewidth": 0.6,
    "axes.edgecolor": "#666666",
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "lines.linewidth": 1.4,
    "path.simplify": True,
}

# A fixed layout in inches (constrained layout would cost half the drawing time, per plot).
_AXES_W = 2.55  # one filter panel
_AXES_H = 1.45
_GAP_W = 0.16  # between panels; inner y tick labels are hidden (shared y)
_TITLE_H = 0.48  # a three-line panel title above every row
_LEFT = 0.48  # y label and tick labels
_RIGHT = 0.12
_TOP = 0.3  # the scope's title
_BOTTOM = 0.36  # x tick labels and x label; the page draws the legend once, in HTML
_MAX_TITLE = 90  # characters of a scope title drawn in the plot; the page shows it whole


@dataclass(frozen=True)
class NormalisedCurves:
    """One sweep's curves on the axes of docs/method.md §4, ready to draw.

    ``adversarial_by_clean`` is true when ψa⁰ = 0 forced the adversarial curve onto ψc⁰;
    ``note`` says so (or says why nothing could be normalised) in words for the reader.
    """

    alpha_hat: np.ndarray
    clean: np.ndarray
    adversarial: np.ndarray
    baseline: np.ndarray
    adversarial_by_clean: bool
    note: str | None
    # With ``statistics:``: each curve's Wilson band (lower, upper), normalised like the curve.
    bands: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


def _as_array(values: Iterable[float | None]) -> np.ndarray:
    """JSON writes non-finite numbers as null; draw those as gaps, not as zeros."""
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def _valid_denominator(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def normalise_sweep(model: ModelResult, sweep: SweepResult) -> NormalisedCurves:
    """Normalise a sweep's accuracies by the unfiltered network's (docs/method.md §4)."""
    clean = _as_array(sweep.clean_accuracy)
    adversarial = _as_array(sweep.adversarial_accuracy)
    removed = _as_array(sweep.removed_fraction)
    # The lists have one entry per threshold; if a damaged file disagrees, draw the common
    # part rather than fail the whole report.
    n = min(len(clean), len(adversarial), len(removed))
    clean, adversarial, removed = clean[:n], adversarial[:n], removed[:n]
    alpha_hat = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(n)

    psi_c0 = model.clean_accuracy
    attack = next((a for a in model.attacks if a.id == sweep.attack), None)
    psi_a0 = attack.accuracy if attack is not None else None
    by_clean = sweep.adversarial_normalised_by == "clean" or not _valid_denominator(psi_a0)
    note: str | None = None
    if not _valid_denominator(psi_c0):
        nan = np.full(n, math.nan)
        return NormalisedCurves(
            alpha_hat, nan, nan, 1.0 - removed, by_clean, "ψc⁰ = 0: not normalised"
        )
    if by_clean:
        psi_a0 = psi_c0
        note = "ra = ψa/ψc⁰ (ψa⁰ = 0)" if attack is not None else "ra = ψa/ψc⁰ (attack unknown)"
    assert psi_a0 is not None
    bands = None
    if sweep.statistics is not None:
        stats = sweep.statistics
        bands = {}
        for name, ci, psi0 in (
            ("clean", stats.clean_accuracy_ci, psi_c0),
            ("adversarial", stats.adversarial_accuracy_ci, psi_a0),
        ):
            lo = _as_array(pair[0] for pair in ci[:n])
            hi = _as_array(pair[1] for pair in ci[:n])
            if len(lo) == n:
                bands[name] = (lo / psi0, hi / psi0)
    return NormalisedCurves(
        alpha_hat=alpha_hat,
        clean=clean / psi_c0,
        adversarial=adversarial / psi_a0,
        baseline=1.0 - removed,
        adversarial_by_clean=by_clean,
        note=note,
        bands=bands,
    )


def _ordered(values: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def _panel_title(sweep: SweepResult, attack_in_title: bool) -> str:
    head = sweep.filter + (f" · {sweep.attack}" if attack_in_title else "")
    if sweep.targeted:
        head += "  [targeted]"
    s = sweep.scores
    return (
        f"{head}\n"
        f"clean: {sweep.labels.clean}  φc {_fmt_score(s.clean)}\n"
        f"adv.: {sweep.labels.adversarial}  φa {_fmt_score(s.adversarial)}"
        f"  φΔ {_fmt_score(s.difference)}"
    )


def _fmt_score(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.3f}"


def _y_top(curves: Iterable[NormalisedCurves]) -> float:
    peak = 1.0
    for c in curves:
        for arr in (c.clean, c.adversarial):
            finite = arr[np.isfinite(arr)]
            if finite.size:
                peak = max(peak, float(finite.max()))
    return max(1.15, peak * 1.06)


@dataclass
class _Panel:
    """The artists of one filter panel that change from one scope to the next."""

    ax: Any
    baseline: Any
    clean: Any
    adversarial: Any
    note: Any
    fills: list[Any]


@dataclass
class _Frame:
    """A figure laid out for one (attacks × filters) grid, redrawn for every scope."""

    fig: Any
    panels: dict[tuple[str, str], _Panel]
    title: Any


def _build_frame(attacks: Sequence[str], filters: Sequence[str]) -> _Frame:
    nrows, ncols = len(attacks), len(filters)
    width = _LEFT + ncols * _AXES_W + (ncols - 1) * _GAP_W + _RIGHT
    height = _TOP + nrows * (_TITLE_H + _AXES_H) + _BOTTOM
    grid = {
        "left": _LEFT / width,
        "right": 1.0 - _RIGHT / width,
        "top": 1.0 - (_TOP + _TITLE_H) / height,
        "bottom": _BOTTOM / height,
        "wspace": _GAP_W / _AXES_W,
        "hspace": _TITLE_H / _AXES_H,
    }
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True, gridspec_kw=grid)
    panels = {}
    for row, attack in enumerate(attacks):
        for col, name in enumerate(filters):
            ax = axes[row][col]
            # Above 1 the scope gains from filtering (antifragile); the span is clipped to
            # the axes, so it needs no update when the y range changes.
            ax.axhspan(1.0, 1.0e3, color=COLOURS["antifragile"], alpha=0.13, lw=0)
            ax.axhline(1.0, color="#888888", lw=0.5)
            baseline = ax.plot([], [], color=COLOURS["baseline"], lw=1.0, ls=":")[0]
            clean = ax.plot([], [], color=COLOURS["clean"], ls="-")[0]
            adversarial = ax.plot([], [], color=COLOURS["adversarial"], ls="--")[0]
            # Top right, in the band above 1 that only antifragile curves reach.
            note = ax.text(
                0.98,
                0.98,
                "",
                ha="right",
                va="top",
                transform=ax.transAxes,
                fontsize=6.5,
                color="#444444",
                parse_math=False,
                visible=False,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.0},
            )
            ax.set_xlim(0.0, 1.0)
            ax.set_xticks([0.0, 0.5, 1.0], ["0", "0.5", "1"])
            ax.yaxis.set_major_locator(MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
            if row == nrows - 1:
                ax.set_xlabel("normalised threshold α̂", labelpad=1)
            if col == 0:
                ax.set_ylabel("normalised response r", labelpad=2)
            panels[(attack, name)] = _Panel(ax, baseline, clean, adversarial, note, [])
    title = fig.text(
        _LEFT / width,
        1.0 - 0.07 / height,
        "",
        ha="left",
        va="top",
        fontsize=8.5,
        fontweight="bold",
        parse_math=False,
    )
    return _Frame(fig, panels, title)


def _update_panel(
    panel: _Panel,
    sweep: SweepResult | None,
    curves: NormalisedCurves | None,
    *,
    attack_in_title: bool,
) -> None:
    ax = panel.ax
    for artist in panel.fills:
        artist.remove()
    panel.fills.clear()
    if sweep is None or curves is None:
        ax.set_visible(False)
        return
    ax.set_visible(True)
    x = curves.alpha_hat
    # Between the baseline and 1 the response degrades no faster than parameters are
    # removed (robust); below the baseline it degrades faster (fragile).
    panel.fills.append(
        ax.fill_between(x, curves.baseline, 1.0, color=COLOURS["robust"], alpha=0.13, lw=0)
    )
    panel.fills.append(
        ax.fill_between(x, 0.0, curves.baseline, color=COLOURS["fragile"], alpha=0.10, lw=0)
    )
    for name, line in (("clean", panel.clean), ("adversarial", panel.adversarial)):
        if curves.bands is not None and name in curves.bands:
            lo, hi = curves.bands[name]
            band = ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
            panel.fills.append(band)
    panel.baseline.set_data(x, curves.baseline)
    panel.clean.set_data(x, curves.clean)
    panel.adversarial.set_data(x, curves.adversarial)
    panel.note.set_text(curves.note or "")
    panel.note.set_visible(bool(curves.note))
    # A fixed y skips matplotlib's title placement, which measures every tick per draw.
    ax.set_title(_panel_title(sweep, attack_in_title), loc="left", y=1.0, pad=3, parse_math=False)


class CurvePlotter:
    """Draws response-curve SVGs, reusing one figure per panel layout.

    A report draws one figure per scope, often dozens with the same grid, and the first
    draw of a new matplotlib figure costs about twice a redraw; so the frame (axes, ticks,
    labels) is built once per grid and only the data and titles change. Not thread-safe:
    use one plotter per thread (``rc_context`` changes matplotlib's global rcParams while
    a figure is drawn).
    """

    def __init__(self) -> None:
        self._frames: dict[tuple[tuple[str, ...], tuple[str, ...]], _Frame] = {}

    def svg(
        self,
        model: ModelResult,
        sweeps: Sequence[SweepResult],
        *,
        title: str,
        id_prefix: str,
    ) -> str:
        """Small multiples for one scope: a panel per filter, a row per attack.

        ``title`` may be any text (layer names come from user models); it is drawn as
        plain text, never parsed as mathtext, and escaped by matplotlib's SVG writer.
        ``id_prefix`` must be unique on the page and a valid id (letters, digits, ``-``).
        """
        if not sweeps:
            raise ValueError("response curves need at least one sweep")
        if not _ID_PREFIX_RE.fullmatch(id_prefix):
            raise ValueError(f"id_prefix {id_prefix!r}: use letters, digits and '-'")
        filters = tuple(_ordered((s.filter for s in sweeps), FILTER_ORDER))
        attacks = tuple(_ordered(s.attack for s in sweeps))
        by_key = {(s.attack, s.filter): s for s in sweeps}
        curves = {key: normalise_sweep(model, s) for key, s in by_key.items()}
        if len(title) > _MAX_TITLE:
            title = title[: _MAX_TITLE - 1] + "…"
        rc: dict[RcKeyType, Any] = {**_RC, "svg.hashsalt": id_prefix}
        with matplotlib.rc_context(rc):
            frame = self._frames.get((attacks, filters))
            if frame is None:
                frame = self._frames[(attacks, filters)] = _build_frame(attacks, filters)
            for key, panel in frame.panels.items():
                _update_panel(
                    panel, by_key.get(key), curves.get(key), attack_in_title=len(attacks) > 1
                )
            next(iter(frame.panels.values())).ax.set_ylim(0.0, _y_top(curves.values()))
            frame.title.set_text(title)
            buffer = io.StringIO()
            frame.fig.savefig(buffer, format="svg", metadata={"Date": None})
        return _inline_svg(buffer.getvalue(), id_prefix)


def response_curves_svg(
    model: ModelResult,
    sweeps: Sequence[SweepResult],
    *,
    title: str,
    id_prefix: str,
) -> str:
    """One scope's response curves as inline SVG (see :meth:`CurvePlotter.svg`)."""
    return CurvePlotter().svg(model, sweeps, title=title, id_prefix=id_prefix)


_PROLOG_RE = re.compile(r"\A.*?(?=<svg\b)", re.S)
_METADATA_RE = re.compile(r"\s*<metadata>.*?</metadata>", re.S)
_STYLE_RE = re.compile(r"\s*<style[^>]*>.*?</style>", re.S)
_EMPTY_DEFS_RE = re.compile(r"\s*<defs>\s*</defs>")
# matplotlib escapes < and > in drawn text, so every "<…>" span is a tag: attribute edits are
# confined to tags and never touch text (a layer may well be named 'x="1.5"').
_TAG_RE = re.compile(r"<[^<>]+>")
_FONT_FAMILY_RE = re.compile(r"font-family:[^;\"]*;?\s*")
_ID_RE = re.compile(r'\sid="([^"]+)"')
_URL_REF_RE = re.compile(r"url\(#([^)]+)\)")
_HREF_RE = re.compile(r'((?:xlink:)?href)="#([^"]+)"')
_GEOMETRY_RE = re.compile(r'\s(d|x|y|transform)="([^"]*)"')
_IDENTITY_ROTATE_RE = re.compile(r'\stransform="rotate\(-?0 [^)]*\)"')
_NUMBER_RE = re.compile(r"-?\d+\.\d+")
_BETWEEN_TAGS_RE = re.compile(r">\s+<")
_ROOT_RE = re.compile(r"<svg\b[^>]*>")
_ID_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_VIEWBOX_RE = re.compile(r'viewBox="([^"]+)"')


def _round(match: re.Match[str]) -> str:
    text = f"{float(match.group(0)):.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _compact(value: str) -> str:
    """Geometry to 0.01 pt on one line: a third of the bytes, no visible change."""
    return " ".join(_NUMBER_RE.sub(_round, value).split())


def _inline_svg(svg: str, prefix: str) -> str:
    """Turn a standalone matplotlib SVG into a fragment that can live beside others."""
    svg = _PROLOG_RE.sub("", svg, count=1)
    svg = _METADATA_RE.sub("", svg, count=1)
    # matplotlib's ``*{stroke-linejoin…}`` rule would apply page-wide; the page sets it once.
    svg = _STYLE_RE.sub("", svg)
    svg = _EMPTY_DEFS_RE.sub("", svg)
    tags = _TAG_RE.findall(svg)
    referenced = {ref for tag in tags for ref in _URL_REF_RE.findall(tag)}
    referenced |= {m.group(2) for tag in tags for m in _HREF_RE.finditer(tag)}

    def rewrite(match: re.Match[str]) -> str:
        tag = match.group(0)
        if tag.startswith("<svg"):
            return tag
        # The page's CSS sets the font once instead of a ten-family list on every <text>.
        tag = _FONT_FAMILY_RE.sub("", tag)
        tag = _IDENTITY_ROTATE_RE.sub("", tag)
        tag = _GEOMETRY_RE.sub(lambda m: f' {m.group(1)}="{_compact(m.group(2))}"', tag)
        # Group ids (figure_1, line2d_3, …) are never referenced: drop them, prefix the rest
        # so that several plots on one page never share an id.
        tag = _ID_RE.sub(
            lambda m: f' id="{prefix}-{m.group(1)}"' if m.group(1) in referenced else "", tag
        )
        tag = _URL_REF_RE.sub(lambda m: f"url(#{prefix}-{m.group(1)})", tag)
        return _HREF_RE.sub(lambda m: f'{m.group(1)}="#{prefix}-{m.group(2)}"', tag)

    svg = _TAG_RE.sub(rewrite, svg)
    # Indentation between tags is insignificant in SVG (text sits inside <text> elements).
    svg = _BETWEEN_TAGS_RE.sub("><", svg)
    root = _ROOT_RE.search(svg)
    assert root is not None, "matplotlib wrote no <svg> element"
    viewbox = _VIEWBOX_RE.search(root.group(0))
    new_root = (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'version="1.1" class="plot" id="{prefix}"'
        + (f' viewBox="{viewbox.group(1)}"' if viewbox else "")
        + ' preserveAspectRatio="xMinYMin meet" aria-hidden="true" focusable="false">'
    )
    return svg[: root.start()] + new_root + svg[root.end() :].rstrip() + "\n"
