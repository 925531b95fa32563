"""The Square attack: its ε, its box and its query budget, its schedule, and its reach on a
linear model whose worst case is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inferlink_audit.apgd import APGD
from inferlink_audit.data import load_dataset
from inferlink_audit.errors import UnsupportedError
from inferlink_audit.spec import APGDSpec, DataSourceSpec, SquareSpec
from inferlink_audit.square import Square, eta, square_fraction

from .test_apgd import WIDE_BOX, inputs, linear_model, predicted_correct, robust_by_closed_form


class Counting(nn.Module):
    """Counts the examples every forward pass sees (one query each) and refuses gradients."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled(), "a black-box attack asked for a gradient"
        self.rows += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.05), ("l2", 0.5)])
def test_square_respects_its_eps_box_and_query_budget(norm, eps):
    model = Counting(linear_model(5))
    x, y = inputs(60), torch.arange(60) % 5
    attack = Square(SquareSpec(eps=eps, norm=norm, queries=40), (0.0, 1.0), 0)
    with torch.no_grad():
        active = model(x).argmax(1) == y
    model.rows = 0
    adversarial, used = attack.perturb(model, x, y, active, offset=0)
    delta = (adversarial - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert used.max() <= 40 and model.rows == int(used.sum())
    assert torch.equal(adversarial[~active], x[~active]) and used[~active].eq(0).all()
    assert (size[active] > 0).all()  # every attacked example was moved
    # Through the attack interface: one clean pass more, nothing else.
    model.rows = 0
    attack(model, x, y)
    assert model.rows == 60 + int(used.sum())


def test_square_finds_the_worst_case_of_a_binary_linear_model():
    model, x = linear_model(2), inputs(100) - 0.5
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.06
    robust, worst = robust_by_closed_form(model, x, y, eps, "linf")
    assert 0 < robust.sum() < len(y)
    clear = worst.abs() > 1e-3
    adversarial = Square(SquareSpec(eps=eps, queries=300), WIDE_BOX, 0)(model, x, y).adversarial
    assert torch.equal(predicted_correct(model, adversarial, y)[clear], robust[clear])


def test_square_schedule_halves_the_window_at_the_published_iterations():
    assert square_fraction(0.8, 0, 10_000) == 0.8
    assert square_fraction(0.8, 11, 10_000) == 0.4
    assert square_fraction(0.8, 9000, 10_000) == 0.8 / 512
    # Rescaled to the budget: step 100 of 1000 is step 1000 of 10 000, the last at p/16.
    assert square_fraction(0.8, 100, 1000) == 0.8 / 16
    assert square_fraction(0.8, 101, 1000) == 0.8 / 32


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.5)])
def test_square_example_is_the_same_in_any_batch(norm, eps):
    model, x = linear_model(5), inputs(100)
    y = torch.arange(100) % 5
    attack = Square(SquareSpec(eps=eps, norm=norm, queries=30), (0.0, 1.0), 2)
    whole = attack(model, x, y).adversarial
    parts = torch.cat(
        [
            attack(model, x[i : i + 33], y[i : i + 33], offset=i).adversarial
            for i in range(0, 100, 33)
        ]
    )
    assert torch.allclose(whole, parts, atol=1e-6)


def test_square_l2_pattern_is_the_published_eta():
    # Side 3, by hand from the authors' rectangles: the upper row holds one ring around its
    # centre (weights 1/(k+1)²: [1/4, 1 + 1/4, 1/4]), the lower 2×3 block the same rings,
    # negated; each half has unit norm, then the whole.
    top = torch.tensor([[1.0, 5.0, 1.0]])
    bottom = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0]])
    expected = torch.cat([top / top.norm(), -bottom / bottom.norm()]) / 2**0.5
    assert torch.allclose(eta(3, like=torch.zeros(1)), expected)


def test_square_l2_breaks_digits_examples_apgd_l2_also_breaks(repo_root):
    from .test_apgd import digits_model

    model = digits_model(repo_root)
    data = load_dataset(DataSourceSpec(source="sklearn_digits", split="test", limit=60))
    adversarial = Square(SquareSpec(eps=0.5, norm="l2", queries=200), (0.0, 1.0), 0)(
        model, data.x, data.y
    ).adversarial
    # Square's points are allowed ones: within ε = 0.5 in L2 of the input and in the box.
    assert (adversarial - data.x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    clean = predicted_correct(model, data.x, data.y)
    square_broken = clean & ~predicted_correct(model, adversarial, data.y)
    # Measured on these 60 digits (seed 0): Square breaks 20, APGD 36 including all of them.
    assert square_broken.sum() >= 10
    apgd = APGD(APGDSpec(eps=0.5, norm="l2"), (0.0, 1.0), 0)(model, data.x, data.y).adversarial
    assert (apgd - data.x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    apgd_broken = clean & ~predicted_correct(model, apgd, data.y)
    assert (apgd_broken | ~square_broken).all()  # APGD breaks every example Square breaks
    assert apgd_broken.sum() > square_broken.sum()


def test_square_needs_images():
    model = nn.Linear(6, 3)
    with pytest.raises(UnsupportedError, match=r"images \[N, C, H, W\]"):
        Square(SquareSpec(eps=0.1), (0.0, 1.0), 0)(
            model, torch.rand(4, 6), torch.zeros(4, dtype=torch.long)
        )
