"""Exact masks of each filter on hand-made tensors (DESIGN §1.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inferlink_audit.filters import (
    SortedScope,
    filter_mask,
    filter_values,
    pulse_half_width,
    threshold_grid,
)

W = torch.tensor([[-0.5, 0.0, 0.25], [0.25, 1.0, -1.0]])


def test_grid_order_and_end_points():
    low = threshold_grid(-1.0, 1.0, 5, "low_pass")
    high = threshold_grid(-1.0, 1.0, 5, "high_pass")
    assert low.tolist() == [1.0, 0.5, 0.0, -0.5, -1.0]
    assert high.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert threshold_grid(-1.0, 1.0, 5, "pulse").tolist() == high.tolist()
    assert pulse_half_width(-1.0, 1.0, 5) == pytest.approx(0.2)


def test_low_pass_zeroes_values_at_or_above_alpha_with_ties():
    values = filter_values(W, "signed")
    assert filter_mask(values, "low_pass", 0.25).tolist() == [False, False, True, True, True, False]
    assert filter_mask(values, "low_pass", 1.0).tolist() == [
        False,
        False,
        False,
        False,
        True,
        False,
    ]
    assert filter_mask(values, "low_pass", -1.0).all()


def test_high_pass_zeroes_values_at_or_below_alpha_with_ties():
    values = filter_values(W, "signed")
    assert filter_mask(values, "high_pass", 0.25).tolist() == [True, True, True, True, False, True]
    assert filter_mask(values, "high_pass", -1.0).tolist() == [
        False,
        False,
        False,
        False,
        False,
        True,
    ]
    assert filter_mask(values, "high_pass", 1.0).all()


def test_pulse_is_half_open_band():
    values = filter_values(W, "signed")
    # band [0.25 - 0.25, 0.25 + 0.25) = [0, 0.5): 0.0, 0.25, 0.25
    assert filter_mask(values, "pulse", 0.25, 0.25).tolist() == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]
    # the upper edge is excluded: [0.5, 1.0) does not take 1.0
    assert not filter_mask(values, "pulse", 0.75, 0.25)[4]


def test_magnitude_mode_filters_on_absolute_values():
    values = filter_values(W, "magnitude")
    assert values.tolist() == [0.5, 0.0, 0.25, 0.25, 1.0, 1.0]
    assert filter_mask(values, "low_pass", 1.0).tolist() == [False, False, False, False, True, True]


def test_constant_tensor_every_threshold_is_the_same_value():
    values = filter_values(torch.full((4,), 0.3), "signed")
    grid = threshold_grid(0.3, 0.3, 5, "low_pass")
    assert set(grid.tolist()) == {0.3}
    assert all(filter_mask(values, "low_pass", a).all() for a in grid)
    assert pulse_half_width(0.3, 0.3, 5) == 0.0
    # a zero-width pulse [α, α) selects nothing
    assert not filter_mask(values, "pulse", 0.3, 0.0).any()


@pytest.mark.parametrize("filter_name", ["low_pass", "high_pass", "pulse"])
@pytest.mark.parametrize("mode", ["signed", "magnitude"])
def test_sorted_intervals_equal_elementwise_masks(filter_name, mode):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(200, generator=gen)
    w[::7] = w[3]  # ties
    w[::11] = 0.0
    values = filter_values(w, mode)
    scope = SortedScope.from_values(values)
    vmin, vmax = float(values.min()), float(values.max())
    delta = pulse_half_width(vmin, vmax, 25)
    for alpha in threshold_grid(vmin, vmax, 25, filter_name):
        start, stop = scope.interval(filter_name, float(alpha), delta)
        from_interval = torch.zeros(200, dtype=torch.bool)
        from_interval[scope.order[start:stop]] = True
        expected = filter_mask(values, filter_name, float(alpha), delta)
        assert torch.equal(from_interval, expected), alpha


def test_removed_fraction_of_full_sweep():
    values = filter_values(torch.arange(10, dtype=torch.float32), "signed")
    scope = SortedScope.from_values(values)
    fractions = [
        (stop - start) / 10
        for start, stop in (
            scope.interval("high_pass", a) for a in threshold_grid(0, 9, 10, "high_pass")
        )
    ]
    assert np.allclose(fractions, np.arange(1, 11) / 10)
