"""Attacks against closed forms and their contracts (batched, clipped, model untouched)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inferlink_audit.attacks import FGSM, PGD, GaussianNoise, build_attack
from inferlink_audit.errors import UnsupportedError
from inferlink_audit.spec import FGSMSpec, GaussianSpec, LBFGSSpec, PGDSpec


@pytest.fixture
def linear():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x = torch.rand(10, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    return model, x, y


def test_fgsm_matches_closed_form_on_linear_model(linear):
    model, x, y = linear
    # ∇ₓ CE(Wx + b, y) = Wᵀ(softmax(Wx + b) − onehot(y)), per example
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
        grad = (p - nn.functional.one_hot(y, 3).float()) @ model.weight
    expected = (x + 0.05 * grad.sign()).clamp(0, 1)
    out = FGSM(FGSMSpec(eps=0.05), (0.0, 1.0), 0)(model, x, y)
    assert torch.equal(out.adversarial, expected)
    assert torch.allclose(out.clean_logits, model(x).detach())


def test_fgsm_does_not_depend_on_batch_size(linear):
    model, x, y = linear
    attack = FGSM(FGSMSpec(eps=0.05), (0.0, 1.0), 0)
    whole = attack(model, x, y).adversarial
    parts = torch.cat(
        [attack(model, x[i : i + 3], y[i : i + 3]).adversarial for i in range(0, 10, 3)]
    )
    assert torch.equal(whole, parts)


def test_attacks_never_change_the_model(linear):
    model, x, y = linear
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for attack in (
        FGSM(FGSMSpec(eps=0.1), (0.0, 1.0), 0),
        PGD(PGDSpec(eps=0.1, steps=5, random_start=True), (0.0, 1.0), 0),
        GaussianNoise(GaussianSpec(sigma=0.2), (0.0, 1.0), 0),
    ):
        attack(model, x, y)
        assert model.training  # mode restored
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert model.weight.grad is None


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_box_and_beats_fgsm(linear, norm):
    model, x, y = linear
    eps = 0.3
    out = PGD(PGDSpec(eps=eps, steps=20, norm=norm, random_start=True), (0.0, 1.0), 0)(model, x, y)
    delta = (out.adversarial - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    assert out.adversarial.min() >= 0 and out.adversarial.max() <= 1
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(out.adversarial), y) > loss(model(x), y)


def test_pgd_without_random_start_first_step_is_fgsm_sized(linear):
    model, x, y = linear
    one = PGD(PGDSpec(eps=0.05, steps=1, step_size=0.05), (0.0, 1.0), 0)(model, x, y)
    fgsm = FGSM(FGSMSpec(eps=0.05), (0.0, 1.0), 0)(model, x, y)
    assert torch.allclose(one.adversarial, fgsm.adversarial)
    assert one.clean_logits is not None


def test_gaussian_is_seeded_per_batch(linear):
    model, x, y = linear
    a = GaussianNoise(GaussianSpec(sigma=0.1), (0.0, 1.0), 7)
    assert torch.equal(
        a(model, x, y, batch_index=2).adversarial, a(model, x, y, batch_index=2).adversarial
    )
    assert not torch.equal(
        a(model, x, y, batch_index=1).adversarial, a(model, x, y, batch_index=2).adversarial
    )


def test_lbfgs_is_reported_unsupported_by_name():
    with pytest.raises(UnsupportedError, match=r"lbfgs_next.*not supported yet"):
        build_attack(LBFGSSpec(), (0.0, 1.0), 0)
