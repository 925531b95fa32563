"""Attacks against closed forms and their contracts (batched, clipped, model untouched)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inferlink_audit.attacks import EXAMPLE_CHUNK, FGSM, PGD, BoxLBFGS, GaussianNoise, build_attack
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


def test_gaussian_is_seeded_per_example(linear):
    model, x, y = linear
    a = GaussianNoise(GaussianSpec(sigma=0.1), (0.0, 1.0), 7)
    assert torch.equal(
        a(model, x, y, offset=128).adversarial, a(model, x, y, offset=128).adversarial
    )
    assert not torch.equal(
        a(model, x, y, offset=64).adversarial, a(model, x, y, offset=128).adversarial
    )


@pytest.mark.parametrize(
    "spec",
    [
        GaussianSpec(sigma=0.1),
        PGDSpec(eps=0.1, steps=2, random_start=True),
        PGDSpec(eps=0.5, steps=2, random_start=True, norm="l2"),
        LBFGSSpec(target="random", max_iter=5),
    ],
    ids=lambda s: s.id,
)
def test_numbers_do_not_depend_on_the_batch_size(linear, spec):
    """An example gets the same random draw (and L-BFGS the same joint problems) whether the
    data is attacked in one batch or in batches of any multiple of EXAMPLE_CHUNK; Gaussian
    noise and PGD in batches of any size."""
    model, x, y = linear
    x, y = torch.cat([x] * 3)[:150], torch.cat([y] * 3)[:150]
    attack = build_attack(spec, (0.0, 1.0), 3)
    whole = attack(model, x, y).adversarial
    sizes = [EXAMPLE_CHUNK, 2 * EXAMPLE_CHUNK]
    if not isinstance(spec, LBFGSSpec):
        sizes += [1, 7, 100]
    for size in sizes:
        parts = [
            attack(model, x[s : s + size], y[s : s + size], offset=s).adversarial
            for s in range(0, len(y), size)
        ]
        assert torch.allclose(torch.cat(parts), whole, rtol=0, atol=1e-6), size


def _reachable_in_box(model: nn.Linear, target: int) -> bool:
    """Whether some x in [0, 1]^d makes ``target`` the strict argmax (a linear program)."""
    from scipy.optimize import linprog

    w, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    others = [k for k in range(w.shape[0]) if k != target]
    # maximise t subject to (w_k - w_target)·x + t <= b_target - b_k, 0 <= x <= 1
    a_ub = [[*(w[k] - w[target]), 1.0] for k in others]
    b_ub = [b[target] - b[k] for k in others]
    res = linprog(
        c=[0.0] * w.shape[1] + [-1.0],
        A_ub=a_ub,
        b_ub=b_ub,
        bounds=[(0, 1)] * w.shape[1] + [(None, 1.0)],
    )
    return bool(res.status == 0 and -res.fun > 1e-3)


@pytest.mark.parametrize("target", ["next", "random", 2])
def test_lbfgs_reaches_its_target_inside_the_box_with_small_distortion(linear, target):
    model, x, y = linear
    attack = build_attack(LBFGSSpec(target=target, max_iter=30), (0.0, 1.0), 0)
    assert isinstance(attack, BoxLBFGS)
    out = attack(model, x, y)
    assert out.adversarial.min() >= 0 and out.adversarial.max() <= 1
    with torch.no_grad():
        pred = model(out.adversarial).argmax(1)
    wanted = attack._targets(y, 3, 0)
    assert (wanted != y).all() if target != 2 else (wanted == 2).all()
    hit = pred == wanted
    reachable = torch.tensor([_reachable_in_box(model, int(t)) for t in wanted])
    assert not (hit & ~reachable).any()  # never claims a target the box cannot give
    # Szegedy's objective minimises cross-entropy, whose minimiser in the box need not make
    # the target win even when a linear program says it can: most, not all, are reached.
    assert hit.float().mean() >= 0.6
    # examples that missed their target come back unchanged
    assert torch.equal(out.adversarial[~hit], x[~hit])
    # the c search keeps the smallest successful perturbation: well inside the box's diameter
    assert (out.adversarial - x).flatten(1).norm(dim=1).max() < 6**0.5


def test_lbfgs_target_class_must_exist(linear):
    model, x, y = linear
    with pytest.raises(UnsupportedError, match="target class 7 does not exist; the model has 3"):
        build_attack(LBFGSSpec(target=7), (0.0, 1.0), 0)(model, x, y)
