"""Attacks against closed forms and their contracts (batched, clipped, model untouched), and
the attack table's numbers (accuracy, success rate, distortion) against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from inferlink_audit.attack_builder import build_attack
from inferlink_audit.attacks import EXAMPLE_CHUNK, FGSM, PGD, BoxLBFGS, GaussianNoise
from inferlink_audit.audit import AuditSession, run_audit
from inferlink_audit.errors import UnsupportedError
from inferlink_audit.report import report_html
from inferlink_audit.results import result_to_dict
from inferlink_audit.spec import FGSMSpec, GaussianSpec, LBFGSSpec, PGDSpec
from inferlink_audit.spec_loader import load_spec


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
    # The single gradient step of the whole budget, written out: FGSM (x + ε·sign g) under
    # L∞, FGM (x + ε·g/‖g‖) under L2, clamped to the box.
    point = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(model(point), y, reduction="sum"), point)
    step = grad.sign() if norm == "linf" else grad / grad.norm(dim=1, keepdim=True)
    single = (x + eps * step).clamp(0.0, 1.0)
    with torch.no_grad():
        assert loss(model(single), y) > loss(model(x), y)
        assert loss(model(out.adversarial), y) >= loss(model(single), y) - 1e-6


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
    """An example gets the same random draw (and L-BFGS the same problem) whether the data is
    attacked in one batch or in batches of any size."""
    model, x, y = linear
    x, y = torch.cat([x] * 3)[:150], torch.cat([y] * 3)[:150]
    attack = build_attack(spec, (0.0, 1.0), 3)
    whole = attack(model, x, y).adversarial
    for size in [EXAMPLE_CHUNK, 2 * EXAMPLE_CHUNK, 1, 7, 100]:
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


def _rows_do_not_see_each_other(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the network's batched forward and backward give every row bit for bit what it
    gets alone (true of this small nn.Linear on the CPU; not of every BLAS kernel)."""
    whole = x.clone().requires_grad_(True)
    out = model(whole)
    (grad,) = torch.autograd.grad(out.square().sum(), whole)
    for i in range(x.shape[0]):
        one = x[i : i + 1].clone().requires_grad_(True)
        out_one = model(one)
        (grad_one,) = torch.autograd.grad(out_one.square().sum(), one)
        if not (torch.equal(out_one[0], out[i]) and torch.equal(grad_one[0], grad[i])):
            return False
    return True


@pytest.mark.parametrize("max_iter", [5, 50])
def test_lbfgs_example_is_the_same_alone_or_with_63_neighbours(linear, max_iter):
    """Each example is its own problem: max_iter, the tolerances and the line search are its
    own, so its adversarial input is identical whether it is attacked alone or in a batch."""
    model, _, _ = linear
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(EXAMPLE_CHUNK, 6, generator=gen)
    y = torch.randint(0, 3, (EXAMPLE_CHUNK,), generator=gen)
    assert _rows_do_not_see_each_other(model, x)  # so any difference is the attack's own
    attack = build_attack(LBFGSSpec(target="next", max_iter=max_iter), (0.0, 1.0), 0)
    together = attack(model, x, y).adversarial
    for i in range(0, EXAMPLE_CHUNK, 4):
        alone = attack(model, x[i : i + 1], y[i : i + 1], offset=i).adversarial
        assert torch.equal(alone[0], together[i]), i


class _Mixed(nn.Module):
    """Dropout, batch norm (running statistics) and a submodule left in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


def test_lbfgs_leaves_the_model_unchanged(linear):
    _, x, y = linear
    torch.manual_seed(0)
    model = _Mixed()
    model.train()
    model.norm.eval()  # a mode the attack must give back as it found it
    model.fc2.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    build_attack(LBFGSSpec(target="next", max_iter=10), (0.0, 1.0), 0)(model, x, y)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # weights and running statistics
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- attack table
NET = """
from torch import nn


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x)
"""


@pytest.fixture
def linear_audit(
    tmp_path: Path, linear
) -> tuple[AuditSession, nn.Linear, torch.Tensor, torch.Tensor]:
    """An audit of the ``linear`` fixture's model on 48 examples, most labelled as it predicts."""
    model, _, _ = linear
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(48, 6, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:12] = torch.randint(0, 3, (12,), generator=gen)  # some examples wrong before any attack
    (tmp_path / "lin.py").write_text(NET)
    save_file(
        {f"fc.{k}": v.contiguous() for k, v in model.state_dict().items()},
        tmp_path / "w.safetensors",
    )
    torch.save({"x": x, "y": y}, tmp_path / "test.pt")
    spec = {
        "version": 1,
        "name": "lin",
        "model": {"factory": "lin.py:Lin", "checkpoint": "w.safetensors"},
        "data": {"source": "tensors", "path": str(tmp_path / "test.pt"), "batch_size": 16},
        "device": "cpu",
        "filtering": {"thresholds": 3, "filters": ["low_pass"]},
        "attacks": [{"fgsm": {"eps": 0.15}}, {"lbfgs": {"target": "next", "max_iter": 20}}],
    }
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return AuditSession(load_spec(tmp_path / "audit.yaml")), model, x, y


def _table_by_hand(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor):
    """Accuracy, success count and rate, and distortions over the successful examples, with
    plain Python arithmetic per example."""
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).tolist()
        adv = (model(x_adv).argmax(1) == y).tolist()
    rows = x.double().tolist(), x_adv.double().tolist()
    rms, linf, l2 = [], [], []
    for i, (a, b) in enumerate(zip(*rows, strict=True)):
        if clean[i] and not adv[i]:
            d = [bj - aj for aj, bj in zip(a, b, strict=True)]
            rms.append(math.sqrt(sum(v * v for v in d) / len(d)))
            linf.append(max(abs(v) for v in d))
            l2.append(math.sqrt(sum(v * v for v in d)))
    successes = len(rms)
    return {
        "accuracy": sum(adv) / len(adv),
        "successes": successes,
        "success_rate": successes / sum(clean),
        "distortion_rms": sum(rms) / successes,
        "distortion_linf": sum(linf) / successes,
        "distortion_l2": sum(l2) / successes,
    }


def test_fgsm_table_matches_a_hand_computation_on_a_linear_model(linear_audit):
    session, model, x, y = linear_audit
    # ∇ₓ CE(Wx + b, y) = Wᵀ(softmax(Wx + b) − onehot(y)), so x′ is known in closed form.
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
        x_adv = x + 0.15 * ((p - nn.functional.one_hot(y, 3).float()) @ model.weight).sign()
    expected = _table_by_hand(model, x, x_adv.clamp(0, 1), y)
    assert 0 < expected["successes"] < 36  # some flip, some do not: the mean has a choice
    result = session.attack_result("fgsm_eps0.15")
    for key in ("accuracy", "success_rate", "distortion_rms", "distortion_linf", "distortion_l2"):
        assert getattr(result, key) == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
    assert result.successes == expected["successes"]
    assert result.distortion_over == "successful"


def test_lbfgs_distortion_counts_only_successful_examples(linear_audit):
    """Examples L-BFGS cannot flip come back unchanged; they must not pull the mean to 0."""
    session, model, x, y = linear_audit
    attack = build_attack(LBFGSSpec(target="next", max_iter=20), (0.0, 1.0), 0)
    x_adv = attack(model, x, y).adversarial
    expected = _table_by_hand(model, x, x_adv, y)
    unchanged = (x_adv == x).all(1)
    assert unchanged.any() and expected["successes"] > 0
    result = session.attack_result("lbfgs_next")
    for key in ("accuracy", "success_rate", "distortion_rms", "distortion_linf", "distortion_l2"):
        assert getattr(result, key) == pytest.approx(expected[key], rel=1e-9), key
    assert result.successes == expected["successes"]
    over_all = (x_adv - x).double().pow(2).mean(1).sqrt().mean()
    assert result.distortion_rms > float(over_all)  # what counting failures as 0 gave


def test_results_json_says_what_distortion_is_averaged_over(linear_audit):
    session, _, _, _ = linear_audit
    result, _, _ = run_audit(session.spec)
    attacks = {a["id"]: a for a in result_to_dict(result)["models"][0]["attacks"]}
    for attack_id in ("fgsm_eps0.15", "lbfgs_next"):
        assert attacks[attack_id]["distortion_over"] == "successful"
        assert attacks[attack_id]["successes"] == session.attack_result(attack_id).successes
    html = report_html(result)
    assert "Distortion rms (successful)" in html
    assert "mean over all examples" not in html  # only said of results from older versions
    successes = attacks["fgsm_eps0.15"]["successes"]
    assert f'title="{successes} successful examples"' in html
