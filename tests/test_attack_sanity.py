"""Attack-failure indicators: each fires on a model (or attack) built to trigger it, stays
quiet on the digits example, and reaches the audit as check items."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from inferlink_audit import attack_sanity, autoattack
from inferlink_audit.attack_sanity import SanityRunner, applicable
from inferlink_audit.audit import AuditSession
from inferlink_audit.checks import SANITY_LIMITS, evaluate_check, plan_checks
from inferlink_audit.data import load_dataset
from inferlink_audit.spec import APGDSpec, AutoAttackSpec, DataSourceSpec, FGSMSpec, PGDSpec
from inferlink_audit.spec_loader import load_spec

from .specs import write_spec
from .test_apgd import digits_model, predicted_correct


@pytest.fixture(scope="module")
def digits(repo_root: Path) -> tuple[nn.Module, SimpleNamespace]:
    data = load_dataset(DataSourceSpec(source="sklearn_digits", split="test", limit=100))
    return digits_model(repo_root), SimpleNamespace(x=data.x, y=data.y, batch_size=64)


class Saturated(nn.Module):
    """The digits CNN with its logits scaled by 1000: the softmax saturates, so the CE
    gradient underflows to exactly zero, while the predictions are unchanged."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1000 * self.inner(x)


class RandomisedInEval(nn.Module):
    """Dropout on the input that stays active in eval mode: a randomised model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(nn.functional.dropout(x, 0.3, training=True))


class Periodic(nn.Module):
    """Two classes scored ±Σ cos(2π x / period): a step of exactly one period in every pixel
    (FGSM at ε = period) lands where it started, half a period flips the score."""

    def __init__(self, period: float) -> None:
        super().__init__()
        self.period = period

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = torch.cos(2 * math.pi * x / self.period).flatten(1).sum(1)
        return torch.stack([score, -score], dim=1)


def reading(model: nn.Module, data: SimpleNamespace, name: str, spec=None):
    runner = SanityRunner(model, data, (0.0, 1.0), 0)
    return runner.measure(name, spec, SANITY_LIMITS[name])


@pytest.fixture
def short_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Smaller budgets for the reference attacks, so the tests stay quick."""
    monkeypatch.setattr(autoattack, "STEPS", 20)
    monkeypatch.setattr(attack_sanity, "SQUARE_QUERIES", 300)


def test_every_indicator_stays_quiet_on_the_digits_example(digits, short_budgets):
    model, data = digits
    runner = SanityRunner(model, data, (0.0, 1.0), 0)
    assert runner.measure("unstable_predictions", None, 0.0).passed
    for spec in (
        FGSMSpec(eps=0.1),
        PGDSpec(eps=0.1, steps=10),
        APGDSpec(eps=0.1, steps=20),
        AutoAttackSpec(eps=0.1, version="fast"),
    ):
        for name in applicable(spec):
            indicator = runner.measure(name, spec, SANITY_LIMITS[name])
            assert indicator.passed, indicator.detail


def test_saturated_softmax_masks_gradients_and_the_black_box_attack_sees_through(
    digits, short_budgets
):
    model, data = digits
    saturated = Saturated(model)
    pgd = PGDSpec(eps=0.1, steps=10)
    masked = reading(saturated, data, "masked_gradients", pgd)
    assert not masked.passed and masked.measured == 1.0
    assert "gradients are masked" in masked.detail and "square" in masked.detail
    assert not reading(saturated, data, "unbounded_not_broken", pgd).passed
    black = reading(saturated, data, "black_box_stronger", pgd)
    assert not black.passed and "gradient masking" in black.detail
    # DLR ignores the logits' scale: APGD-DLR's gradient is not masked.
    assert reading(saturated, data, "masked_gradients", APGDSpec(eps=0.1, loss="dlr")).passed


def test_dropout_in_eval_makes_predictions_unstable(digits):
    model, data = digits
    randomised = RandomisedInEval(model)
    torch.manual_seed(0)
    unstable = reading(randomised, data, "unstable_predictions")
    assert not unstable.passed
    assert "expectation over the randomness (EOT" in unstable.detail
    # Measured: the share of examples whose two predictions differ, written out with the
    # same dropout draws (two passes per batch of 64, in order).
    torch.manual_seed(0)
    with torch.no_grad():
        differ = torch.cat(
            [
                randomised(data.x[i : i + 64]).argmax(1) != randomised(data.x[i : i + 64]).argmax(1)
                for i in range(0, len(data.y), 64)
            ]
        )
    assert 0 < differ.sum() < len(data.y)
    assert unstable.measured == pytest.approx(differ.double().mean().item(), abs=1e-6)
    assert unstable.examples == tuple(differ.nonzero()[:, 0].tolist())


def test_a_larger_eps_that_helps_the_model_is_flagged():
    x = 0.3 + 0.4 * torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    model = Periodic(period=0.1)
    with torch.no_grad():
        y = model(x).argmax(1)
    data = SimpleNamespace(x=x, y=y, batch_size=16)
    indicator = reading(model, data, "eps_not_monotone", FGSMSpec(eps=0.1))
    assert not indicator.passed and indicator.measured == 1.0
    assert reading(model, data, "eps_not_monotone", FGSMSpec(eps=0.05)).measured <= 0


def _correct_under_sign_steps(
    model: nn.Module, data: SimpleNamespace, eps: float, steps: int, step: float
) -> torch.Tensor:
    """Per example, correct after ``steps`` signed-gradient steps of the summed cross-entropy
    kept within ε (L∞) of the input and in [0, 1], written out (FGSM: one step of ε)."""
    x, y = data.x, data.y
    point = x.clone()
    for _ in range(steps):
        point.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(point), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, point)
        moved = point.detach() + step * grad.sign()
        point = (x + (moved - x).clamp(-eps, eps)).clamp(0.0, 1.0)
    with torch.no_grad():
        return model(point).argmax(1) == y


def test_an_iterative_attack_that_cannot_move_is_weaker_than_fgsm(digits):
    model, data = digits
    stuck = PGDSpec(eps=0.1, steps=5, step_size=1e-4)
    indicator = reading(model, data, "iterative_weaker", stuck)
    assert not indicator.passed and "raise its steps or use apgd" in indicator.detail
    # Measured: the stuck attack's accuracy above FGSM's at the same ε, both written out;
    # the examples are those the stuck attack leaves correct and FGSM breaks.
    iterative = _correct_under_sign_steps(model, data, 0.1, 5, 1e-4)
    fgsm = _correct_under_sign_steps(model, data, 0.1, 1, 0.1)
    expected = float(iterative.double().mean() - fgsm.double().mean())
    assert expected > 0.2  # the test needs the stuck attack to be clearly weaker
    assert indicator.measured == pytest.approx(expected, abs=1e-6)  # float32 means
    assert indicator.examples == tuple((iterative & ~fgsm).nonzero()[:, 0].tolist())


class Recording(nn.Module):
    """Keeps the logits of every forward pass that builds a gradient (the attack's steps)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.logits: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if torch.is_grad_enabled():
            self.logits.append(out.detach())
        return out


def test_apgd_cut_short_is_not_converged(digits):
    model, data = digits
    one_batch = SimpleNamespace(x=data.x, y=data.y, batch_size=len(data.y))
    recording, steps = Recording(model), 3
    stuck = reading(recording, one_batch, "not_converged", APGDSpec(eps=0.1, steps=steps))
    assert not stuck.passed
    assert reading(model, data, "not_converged", APGDSpec(eps=0.1, steps=20)).passed
    # Measured, from the loss trajectory the model saw (start and 3 steps, one restart, on the
    # examples classified correctly): an example APGD left correct whose best CE loss rose over
    # the last step by more than 5 % of its total rise, as a share of those APGD left correct.
    active = predicted_correct(model, data.x, data.y).nonzero()[:, 0]
    passes = recording.logits[: steps + 1]
    losses = torch.stack(
        [nn.functional.cross_entropy(z, data.y[active], reduction="none") for z in passes]
    )
    broken = torch.stack([z.argmax(1) != data.y[active] for z in passes]).any(0)
    best = losses.cummax(0).values
    rising = ~broken & (best[-1] - best[-2] > 0.05 * (best[-1] - best[0])) & (best[-1] > best[0])
    assert 0 < rising.sum() < (~broken).sum()
    assert stuck.examples == tuple(active[rising].tolist())
    assert stuck.measured == pytest.approx(rising.sum().item() / (~broken).sum().item())


def test_indicators_are_planned_for_iterative_attacks_by_default(tmp_path: Path):
    fgsm_only = load_spec(write_spec(tmp_path, "a.yaml"))
    assert not [p for p in plan_checks(fgsm_only) if p.check in SANITY_LIMITS]
    pgd = {"pgd": {"eps": 0.1, "steps": 10}}
    spec = load_spec(write_spec(tmp_path, "b.yaml", attacks=[{"fgsm": {"eps": 0.1}}, pgd]))
    ids = [p.id for p in plan_checks(spec)]
    assert "unstable_predictions" in ids and "fgsm_eps0.1-masked_gradients" in ids
    assert "pgd_linf_eps0.1_steps10-black_box_stronger" in ids
    # Indicator items do not replace the sweep items of a spec without checks.
    assert "low_pass-pgd_linf_eps0.1_steps10" in ids
    off = load_spec(write_spec(tmp_path, "c.yaml", attacks=[pgd], checks={"attack_sanity": False}))
    assert not [p for p in plan_checks(off) if p.check in SANITY_LIMITS]


def test_indicator_items_pass_on_the_digits_audit(tmp_path: Path, short_budgets):
    spec = load_spec(
        write_spec(
            tmp_path, attacks=[{"pgd": {"eps": 0.1, "steps": 10}}], checks={"attack_sanity": True}
        )
    )
    session = AuditSession(spec)
    items = [p for p in plan_checks(spec) if p.check in SANITY_LIMITS]
    assert len(items) == 1 + len(applicable(spec.attack_specs[0]))
    for planned in items:
        result = evaluate_check(planned, session)
        assert result.passed, result.detail
        assert result.limit == SANITY_LIMITS[planned.check]
