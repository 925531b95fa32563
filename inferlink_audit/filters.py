"""Synaptic filters (docs/method.md §2): which weights a threshold zeroes.

Every filter zeroes a contiguous run of the scope's values once they are sorted: low-pass a
suffix (θ ≥ α), high-pass a prefix (θ ≤ α), pulse an interval (α − δ ≤ θ < α + δ). The sweep
engine works with those runs as ``[start, stop)`` intervals on the sorted values, which makes
duplicate masks trivial to detect (equal intervals) and masking a cheap index operation.
``filter_mask`` is the plain element-wise definition, used by tests and the reference.

Comparisons are made in float64: the thresholds are float64 and float32 weights convert to
float64 exactly, so a weight equal to a threshold is treated the same on every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

FilterName = Literal["low_pass", "high_pass", "pulse"]
FILTERS: tuple[FilterName, ...] = ("low_pass", "high_pass", "pulse")


def threshold_grid(vmin: float, vmax: float, n: int, filter_name: FilterName) -> np.ndarray:
    """The ``n`` thresholds, linearly spaced over [vmin, vmax], in the filter's sweep order.

    Low-pass sweeps from max θ down to min θ; high-pass and pulse from min θ up to max θ.
    The end points are exactly ``vmin`` and ``vmax`` (``np.linspace`` guarantees both).
    """
    grid = np.linspace(float(vmin), float(vmax), int(n), dtype=np.float64)
    return grid[::-1].copy() if filter_name == "low_pass" else grid


def pulse_half_width(vmin: float, vmax: float, n: int) -> float:
    """δ = (max θ − min θ) / (2n): adjacent pulses tile the range without overlap."""
    return (float(vmax) - float(vmin)) / (2 * int(n))


def filter_values(weights: torch.Tensor, values: Literal["signed", "magnitude"]) -> torch.Tensor:
    """What the thresholds compare against: θ itself, or |θ| in magnitude mode (float64)."""
    flat = weights.detach().reshape(-1).to(torch.float64)
    return flat.abs() if values == "magnitude" else flat


def filter_mask(
    values: torch.Tensor, filter_name: FilterName, alpha: float, delta: float = 0.0
) -> torch.Tensor:
    """Element-wise definition: True where the filter zeroes the weight."""
    v = values.to(torch.float64)
    if filter_name == "low_pass":
        return v >= alpha
    if filter_name == "high_pass":
        return v <= alpha
    if filter_name == "pulse":
        return (v >= alpha - delta) & (v < alpha + delta)
    raise ValueError(f"unknown filter {filter_name!r}")


@dataclass(frozen=True)
class SortedScope:
    """A scope's values sorted once, so each threshold becomes an interval of that order."""

    order: torch.Tensor  # int64 permutation: sorted position -> flat index in the scope
    sorted_values: np.ndarray  # float64, ascending

    @classmethod
    def from_values(cls, values: torch.Tensor) -> SortedScope:
        sorted_values, order = torch.sort(values.to(torch.float64).cpu(), stable=True)
        return cls(order=order, sorted_values=sorted_values.numpy())

    @classmethod
    def of(cls, tensors: list[torch.Tensor], values: Literal["signed", "magnitude"]) -> SortedScope:
        """The sorted values of a scope's tensors (concatenated in order)."""
        return cls.from_values(torch.cat([filter_values(t, values).cpu() for t in tensors]))

    @property
    def value_range(self) -> tuple[float, float]:
        """[min θ, max θ] of the scope, the default span of its thresholds."""
        return float(self.sorted_values[0]), float(self.sorted_values[-1])

    @property
    def numel(self) -> int:
        return int(self.sorted_values.shape[0])

    def interval(
        self, filter_name: FilterName, alpha: float, delta: float = 0.0
    ) -> tuple[int, int]:
        """The ``[start, stop)`` run of sorted positions the filter zeroes at threshold α."""
        s = self.sorted_values
        if filter_name == "low_pass":
            return int(np.searchsorted(s, alpha, side="left")), self.numel
        if filter_name == "high_pass":
            return 0, int(np.searchsorted(s, alpha, side="right"))
        if filter_name == "pulse":
            start = int(np.searchsorted(s, alpha - delta, side="left"))
            stop = int(np.searchsorted(s, alpha + delta, side="left"))
            return start, max(start, stop)
        raise ValueError(f"unknown filter {filter_name!r}")
