"""Accuracy against ε for the report: one panel per budget (ε in L∞, ε in L2, σ of noise),
one series per attack that lists several values, with its Wilson band when the spec asks for
statistics. Drawn like ``plots`` draws the response curves: on a bare ``Figure`` (no pyplot
state), as inline SVG with ids prefixed so several plots share a page.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.typing import RcKeyType

from .plots import _RC, _inline_svg
from .results import EpsCurve

__all__ = ["eps_curve_figure", "eps_curves_svg", "panel_title"]

_SERIES = ("#1f4e79", "#c0501f", "#2e7d32", "#6a3d9a", "#b8860b", "#00838f", "#ad1457")
_PANEL_W, _PANEL_H = 3.3, 2.2
_NORMS = {"linf": "L∞", "l2": "L2"}


def panel_title(curve: EpsCurve) -> str:
    """The quantity on a panel's x axis: curves share a panel only when it is the same."""
    if curve.parameter == "sigma":
        return "noise σ"
    return f"ε ({_NORMS.get(curve.norm, curve.norm)})"


def eps_curve_figure(curves: Sequence[EpsCurve], clean_accuracy: float) -> Figure:
    """The figure: a panel per x-axis quantity; each attack a line through its measured
    points (nothing interpolated or added), its band the Wilson interval of each point."""
    if not curves:
        raise ValueError("an ε plot needs at least one curve")
    panels: dict[str, list[EpsCurve]] = {}
    for curve in curves:
        panels.setdefault(panel_title(curve), []).append(curve)
    fig = Figure(figsize=(0.3 + _PANEL_W * len(panels), _PANEL_H))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    fig.subplots_adjust(left=0.3 / fig.get_figwidth() + 0.06, right=0.98, bottom=0.2, top=0.88)
    colour = 0
    for ax, (title, members) in zip(axes, panels.items(), strict=True):
        ax.axhline(clean_accuracy, color="#888888", lw=0.8, ls=":", label="clean accuracy")
        for curve in members:
            tint = _SERIES[colour % len(_SERIES)]
            colour += 1
            ax.plot(
                curve.values,
                curve.accuracy,
                marker="o",
                ms=3,
                color=tint,
                label=curve.label,
                gid=f"eps-{curve.sweep_attack}",
            )
            if curve.accuracy_ci is not None:
                lo = [pair[0] for pair in curve.accuracy_ci]
                hi = [pair[1] for pair in curve.accuracy_ci]
                ax.fill_between(curve.values, lo, hi, color=tint, alpha=0.15, lw=0)
        ax.set_title(f"accuracy against {title}", loc="left", parse_math=False)
        ax.set_xlabel(title, labelpad=1)
        ax.set_xlim(left=0.0)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.set_ylim(0.0, 1.02)
        ax.legend(loc="upper right", fontsize=6.5, frameon=False)
    axes[0].set_ylabel("accuracy", labelpad=2)
    return fig


def eps_curves_svg(curves: Sequence[EpsCurve], clean_accuracy: float, *, id_prefix: str) -> str:
    """The figure as an inline SVG fragment (``id_prefix`` unique on the page)."""
    rc: dict[RcKeyType, Any] = {**_RC, "svg.hashsalt": id_prefix}
    with matplotlib.rc_context(rc):
        fig = eps_curve_figure(curves, clean_accuracy)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return _inline_svg(buffer.getvalue(), id_prefix)
