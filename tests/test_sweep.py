"""The engine's curves equal a naive re-implementation (deep copy per threshold), exactly."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from inferlink_audit.attacks import FGSM
from inferlink_audit.scores import score_curves
from inferlink_audit.spec import FGSMSpec
from inferlink_audit.sweep import (
    EvalData,
    Evaluator,
    ScopeWorkingCopy,
    frozen_parameters,
    sweep_scope,
)

from .naive_reference import naive_scores, naive_sweep

EPS = 0.1


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 6, 6, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.rand(64, generator=gen) < 0.25
    y = torch.where(flip, (y + 1) % 4, y)
    return model, x, y


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


SCOPES = {"conv": ["conv.weight"], "fc": ["fc.weight"], "global": ["conv.weight", "fc.weight"]}


@pytest.mark.parametrize("filter_name", ["low_pass", "high_pass", "pulse"])
@pytest.mark.parametrize("scope", list(SCOPES))
@pytest.mark.parametrize("source", ["filtered", "original"])
def test_engine_equals_naive_reference(tiny, filter_name, scope, source):
    model, x, y = tiny
    before = _digest(model)
    names = SCOPES[scope]
    naive_clean, naive_adv, naive_removed, naive_grid = naive_sweep(
        model, names, filter_name, 11, x, y, EPS, original=(source == "original")
    )
    params = dict(model.named_parameters())
    with frozen_parameters(model):
        evaluator = Evaluator(model, EvalData(x, y, 16), FGSM(FGSMSpec(eps=EPS), (0, 1), 0), source)
        unfiltered = evaluator.evaluate()
        curves = sweep_scope(
            [params[n] for n in names],
            filter_name,
            thresholds=11,
            values="signed",
            evaluator=evaluator,
            unfiltered=unfiltered,
        )
    assert curves.clean_accuracy == pytest.approx(naive_clean.tolist(), abs=1e-12)
    assert curves.adversarial_accuracy == pytest.approx(naive_adv.tolist(), abs=1e-12)
    assert curves.removed_fraction == pytest.approx(naive_removed.tolist(), abs=1e-12)
    assert curves.thresholds == pytest.approx(naive_grid.tolist(), rel=1e-12)
    assert 0 < curves.evaluated_variants <= 11
    assert _digest(model) == before  # restored bit-exactly

    scored = score_curves(
        curves.clean_accuracy,
        curves.adversarial_accuracy,
        curves.removed_fraction,
        clean_reference=unfiltered[0],
        adversarial_reference=unfiltered[1],
        tolerance=0.05,
    )
    naive = naive_scores(naive_clean, naive_adv, naive_removed, unfiltered[0], unfiltered[1], 0.05)
    assert scored.scores.clean == pytest.approx(naive["clean"][0], abs=1e-12)
    assert scored.scores.adversarial == pytest.approx(naive["adversarial"][0], abs=1e-12)
    assert scored.scores.difference == pytest.approx(naive["difference"], abs=1e-12)
    assert scored.labels.clean == naive["clean"][1]
    assert scored.labels.adversarial == naive["adversarial"][1]


def test_magnitude_mode_equals_naive(tiny):
    model, x, y = tiny
    naive_clean, naive_adv, naive_removed, _ = naive_sweep(
        model, ["fc.weight"], "low_pass", 9, x, y, EPS, magnitude=True
    )
    with frozen_parameters(model):
        evaluator = Evaluator(
            model, EvalData(x, y, 64), FGSM(FGSMSpec(eps=EPS), (0, 1), 0), "filtered"
        )
        curves = sweep_scope(
            [model.fc.weight],
            "low_pass",
            thresholds=9,
            values="magnitude",
            evaluator=evaluator,
            unfiltered=evaluator.evaluate(),
        )
    assert curves.clean_accuracy == pytest.approx(naive_clean.tolist(), abs=1e-12)
    assert curves.adversarial_accuracy == pytest.approx(naive_adv.tolist(), abs=1e-12)
    assert curves.removed_fraction == pytest.approx(naive_removed.tolist(), abs=1e-12)


def test_duplicate_masks_are_evaluated_once(tiny):
    model, x, y = tiny
    calls = []
    with frozen_parameters(model):
        evaluator = Evaluator(
            model, EvalData(x, y, 64), FGSM(FGSMSpec(eps=EPS), (0, 1), 0), "filtered"
        )
        curves = sweep_scope(
            [model.conv.bias],
            "pulse",
            thresholds=50,
            values="signed",
            evaluator=evaluator,
            unfiltered=(1.0, 1.0),
            on_variant=lambda: calls.append(1),
        )
    # 3 biases, 50 pulses: most pulses select nothing (reuse the unfiltered result), and no
    # non-empty mask is evaluated twice
    assert len(calls) == curves.evaluated_variants <= 3
    assert sum(1 for r in curves.removed_fraction if r == 0) >= 47
    assert all(
        c == 1.0
        for c, r in zip(curves.clean_accuracy, curves.removed_fraction, strict=True)
        if r == 0
    )


def test_interrupted_sweep_still_restores_weights(tiny):
    model, x, y = tiny
    before = _digest(model)

    class Boom(Exception):
        pass

    def explode() -> None:
        raise Boom

    with frozen_parameters(model):
        evaluator = Evaluator(
            model, EvalData(x, y, 64), FGSM(FGSMSpec(eps=EPS), (0, 1), 0), "filtered"
        )
        with pytest.raises(Boom):
            sweep_scope(
                [model.fc.weight],
                "high_pass",
                thresholds=7,
                values="signed",
                evaluator=evaluator,
                unfiltered=(1.0, 1.0),
                on_variant=explode,
            )
    assert _digest(model) == before
    assert all(p.requires_grad for p in model.parameters())


def test_sweep_never_writes_the_models_own_tensors(tiny):
    """The sweep edits working copies; the model's own storage keeps its address and bits."""
    model, x, y = tiny
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    with frozen_parameters(model):
        evaluator = Evaluator(
            model, EvalData(x, y, 64), FGSM(FGSMSpec(eps=EPS), (0, 1), 0), "filtered"
        )
        sweep_scope(
            [model.conv.weight, model.fc.weight],
            "low_pass",
            thresholds=7,
            values="signed",
            evaluator=evaluator,
            unfiltered=evaluator.evaluate(),
        )
    for name, p in model.named_parameters():
        pointer, values = before[name]
        assert p.data_ptr() == pointer, name
        assert torch.equal(p.detach(), values), name


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=8))
def test_moving_between_runs_leaves_exactly_the_new_run_zeroed(runs):
    """Whatever the previous run, after ``move`` exactly ``order[new]`` is zero."""
    a, b = torch.arange(1.0, 13.0).reshape(3, 4), torch.arange(13.0, 31.0).reshape(2, 9)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(len(runs)))
    scope = ScopeWorkingCopy([a, b])
    try:
        previous = None
        for lo, hi in runs:
            new = (min(lo, hi), max(lo, hi))
            scope.move(order, previous, new)
            previous = new
            expected = torch.arange(1.0, 31.0)
            expected[order[new[0] : new[1]]] = 0
            assert torch.equal(torch.cat([a.reshape(-1), b.reshape(-1)]), expected)
    finally:
        scope.restore_all()
    assert torch.equal(a.reshape(-1), torch.arange(1.0, 13.0))
    assert torch.equal(b.reshape(-1), torch.arange(13.0, 31.0))


def _sweep(evaluator, unfiltered, tensors, filter_name):
    return sweep_scope(
        tensors,
        filter_name,
        thresholds=9,
        values="signed",
        evaluator=evaluator,
        unfiltered=unfiltered,
    )


def test_variants_met_again_are_taken_from_the_memo_with_the_same_numbers(tiny):
    """Low- and high-pass both end by zeroing the whole layer, and a global sweep's first
    low-pass threshold zeroes the same single weight as the local one of the layer holding the
    largest weight: each is evaluated once, and the numbers equal a fresh evaluation's."""
    model, x, y = tiny
    attack = FGSM(FGSMSpec(eps=EPS), (0, 1), 0)
    holder = max([model.conv.weight, model.fc.weight], key=lambda t: float(t.detach().max()))
    runs = [
        ([holder], "low_pass"),
        ([holder], "high_pass"),
        ([model.conv.weight, model.fc.weight], "low_pass"),
    ]
    with frozen_parameters(model):
        shared = Evaluator(model, EvalData(x, y, 64), attack, "filtered")
        unfiltered = shared.evaluate()
        calls = []
        plain = shared.evaluate

        def counted():
            calls.append(1)
            return plain()

        shared.evaluate = counted
        remembered = [_sweep(shared, unfiltered, t, f) for t, f in runs]
        fresh = [
            _sweep(Evaluator(model, EvalData(x, y, 64), attack, "filtered"), unfiltered, t, f)
            for t, f in runs
        ]
    assert shared.memo_hits >= 2
    assert len(calls) == sum(c.evaluated_variants for c in remembered) - shared.memo_hits
    for got, expected in zip(remembered, fresh, strict=True):
        assert got.clean_accuracy == expected.clean_accuracy
        assert got.adversarial_accuracy == expected.adversarial_accuracy
        assert got.evaluated_variants == expected.evaluated_variants


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_torchscript_model_sees_the_working_copy(tiny):
    """A scripted module holds its parameters in C++: the sweep's working copies must reach
    it, or every threshold would silently measure the unfiltered network."""
    model, x, y = tiny
    scripted = torch.jit.script(model)
    curves = {}
    for name, m in (("eager", model), ("scripted", scripted)):
        with frozen_parameters(m):
            evaluator = Evaluator(
                m, EvalData(x, y, 64), FGSM(FGSMSpec(eps=EPS), (0, 1), 0), "filtered"
            )
            c = sweep_scope(
                [m.conv.weight, m.fc.weight],
                "pulse",
                thresholds=9,
                values="signed",
                evaluator=evaluator,
                unfiltered=evaluator.evaluate(),
            )
        curves[name] = (c.clean_accuracy, c.adversarial_accuracy)
    assert curves["scripted"] == curves["eager"]
    assert len(set(curves["eager"][0])) > 2  # the filter changes what is measured
