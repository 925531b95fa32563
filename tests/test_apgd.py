"""APGD against closed-form worst cases of linear models, against PGD on the digits example,
and its contracts (batch-independent, in the ε-ball and the box, model untouched)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from inferlink_audit.apgd import APGD, checkpoints, dlr_loss
from inferlink_audit.attack_builder import build_attack
from inferlink_audit.data import load_dataset
from inferlink_audit.errors import UnsupportedError
from inferlink_audit.models import NormalizedModel
from inferlink_audit.spec import APGDSpec, DataSourceSpec, PGDSpec

WIDE_BOX = (-100.0, 100.0)  # a box that never binds, so the closed forms hold exactly


def linear_model(classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, classes))


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def closed_form_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str):
    """Per example and class j ≠ y, the smallest margin (w_y − w_j)·x′ + b_y − b_j over the
    ε-ball: the clean margin minus ε times the dual norm of w_y − w_j (L1 for L∞, L2 for L2)."""
    linear = model[1]
    w, b = linear.weight.detach(), linear.bias.detach()
    flat = x.flatten(1)
    diff = w[y][:, None, :] - w[None, :, :]  # [n, classes, features]
    margins = (diff * flat[:, None, :]).sum(2) + (b[y][:, None] - b[None, :])
    dual = diff.abs().sum(2) if norm == "linf" else diff.norm(dim=2)
    worst = margins - eps * dual
    worst[torch.arange(len(y)), y] = float("inf")
    return worst


def robust_by_closed_form(model, x, y, eps, norm) -> tuple[torch.Tensor, torch.Tensor]:
    worst = closed_form_margins(model, x, y, eps, norm).amin(1)
    return worst > 0, worst


def halving_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str) -> float:
    """An ε between two examples' closed-form breaking radii, near the median: about half the
    examples are robust, and none sits on the fence."""
    margins = closed_form_margins(model, x, y, 0.0, norm)
    unit = closed_form_margins(model, x, y, 1.0, norm)
    radius = (margins / (margins - unit)).nan_to_num(float("inf"))  # the label's column: ∞/∞
    radius = radius.amin(1).sort().values  # per example, the ε that breaks it
    middle = len(radius) // 2
    return float((radius[middle] + radius[middle + 1]) / 2)


def predicted_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_ce_finds_the_worst_case_of_a_binary_linear_model(norm):
    model, x = linear_model(2), inputs(200) - 0.5
    with torch.no_grad():
        y = model(x).argmax(1)  # every example starts correct
    eps = halving_eps(model, x, y, norm)
    robust, worst = robust_by_closed_form(model, x, y, eps, norm)
    assert 0 < robust.sum() < len(y)  # the test has examples of both kinds
    clear = worst.abs() > 1e-3  # examples not on the fence (float rounding decides those)
    attack = APGD(APGDSpec(eps=eps, norm=norm, loss="ce", steps=50), WIDE_BOX, 0)
    adversarial = attack(model, x, y).adversarial
    assert torch.equal(predicted_correct(model, adversarial, y)[clear], robust[clear])
    # Unbroken examples come back at the highest-loss point: the closed-form worst case.
    with torch.no_grad():
        logits = model(adversarial)
    reached = (logits.gather(1, y[:, None]) - logits.gather(1, (1 - y)[:, None]))[:, 0]
    assert torch.allclose(reached[robust], worst[robust], atol=1e-3)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_targeted_apgd_over_all_classes_breaks_exactly_the_breakable_examples(norm):
    model, x = linear_model(5), inputs(300) - 0.5
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = halving_eps(model, x, y, norm)
    robust, worst = robust_by_closed_form(model, x, y, eps, norm)
    assert 0 < robust.sum() < len(y)
    clear = worst.abs() > 1e-3
    spec = APGDSpec(eps=eps, norm=norm, loss="dlr", steps=50, targeted=True, target_classes=4)
    adversarial = APGD(spec, WIDE_BOX, 0)(model, x, y).adversarial
    assert torch.equal(predicted_correct(model, adversarial, y)[clear], robust[clear])


def test_checkpoints_follow_the_published_schedule():
    # w₁ = 22, then the gap shrinks by 3 per checkpoint down to 6 (Croce & Hein 2020, §3.2).
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_is_invariant_to_shifting_and_scaling_the_logits():
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8)
    assert torch.allclose(dlr_loss(logits, y, None), dlr_loss(7 * logits + 3, y, None), atol=1e-5)
    target = (y + 1) % 10
    assert torch.allclose(
        dlr_loss(logits, y, target), dlr_loss(7 * logits + 3, y, target), atol=1e-5
    )


def test_apgd_stays_in_its_ball_and_the_box_and_leaves_the_model_alone():
    model, x = linear_model(5), inputs(40)
    y = torch.arange(40) % 5
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        adversarial = APGD(APGDSpec(eps=eps, norm=norm, steps=10), (0.0, 1.0), 0)(model, x, y)
        delta = (adversarial.adversarial - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert size.max() <= eps + 1e-6
        assert adversarial.adversarial.min() >= 0 and adversarial.adversarial.max() <= 1
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "spec",
    [
        APGDSpec(eps=0.1, steps=10),
        APGDSpec(eps=0.1, steps=10, loss="dlr", targeted=True, target_classes=2, restarts=2),
    ],
)
def test_apgd_example_is_the_same_alone_or_in_any_batch(spec):
    model, x = linear_model(5), inputs(150)
    y = torch.arange(150) % 5
    attack = APGD(spec, (0.0, 1.0), 3)
    whole = attack(model, x, y).adversarial
    parts = torch.cat(
        [
            attack(model, x[i : i + 37], y[i : i + 37], offset=i).adversarial
            for i in range(0, 150, 37)
        ]
    )
    assert torch.allclose(whole, parts, atol=1e-6)


def test_dlr_needs_three_classes():
    model, x = linear_model(2), inputs(4)
    with pytest.raises(UnsupportedError, match="DLR loss needs at least 3 classes"):
        APGD(APGDSpec(eps=0.1, loss="dlr"), (0.0, 1.0), 0)(
            model, x, torch.zeros(4, dtype=torch.long)
        )


# --------------------------------------------------------------------------- digits
def digits_model(repo_root: Path) -> nn.Module:
    module_spec = importlib.util.spec_from_file_location(
        "digits_example", repo_root / "example_audits" / "digits.py"
    )
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    net = module.DigitsCNN(num_classes=10)
    net.load_state_dict(load_file(repo_root / "example_audits" / "digits_cnn.safetensors"))
    return NormalizedModel(net, [0.5], [0.5]).eval()


@pytest.fixture(scope="module")
def digits(repo_root: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    data = load_dataset(DataSourceSpec(source="sklearn_digits", split="test", limit=200))
    return digits_model(repo_root), data.x, data.y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(predicted_correct(model, x, y).float().mean())


def test_apgd_ce_is_not_weaker_than_pgd_with_the_same_budget_on_digits(digits):
    model, x, y = digits
    eps, steps = 0.1, 50
    pgd = build_attack(PGDSpec(eps=eps, steps=steps, random_start=True), (0.0, 1.0), 0)
    apgd = build_attack(APGDSpec(eps=eps, steps=steps), (0.0, 1.0), 0)
    pgd_accuracy = accuracy(model, pgd(model, x, y).adversarial, y)
    apgd_accuracy = accuracy(model, apgd(model, x, y).adversarial, y)
    assert apgd_accuracy <= pgd_accuracy
    assert apgd_accuracy < accuracy(model, x, y)
