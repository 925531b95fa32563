"""Prefix reuse gives bit-identical curves, on residual networks too, and falls back safely."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from inferlink_audit.attacks import FGSM, GaussianNoise
from inferlink_audit.prefix import NetworkSplitter
from inferlink_audit.spec import FGSMSpec, GaussianSpec
from inferlink_audit.sweep import EvalData, Evaluator, frozen_parameters, sweep_scope


class Residual(nn.Module):
    """The skip tensor bypasses conv2: it must be cached alongside conv2's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.bn(self.conv2(h)) + h)
        return self.fc(h.flatten(1))


class Untraceable(Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 1.0
        return super().forward(x)


def _data(model: nn.Module) -> EvalData:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(48, 1, 6, 6, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    y = torch.where(torch.rand(48, generator=gen) < 0.3, (y + 1) % 5, y)
    return EvalData(x, y, 16)


def _curves(model, data, attack, source, layer, budget, splitter):
    with frozen_parameters(model):
        evaluator = Evaluator(model, data, attack, source, splitter=splitter, prefix_budget=budget)
        unfiltered = evaluator.evaluate()
        with evaluator.focus(layer):
            curves = sweep_scope(
                [dict(model.named_modules())[layer].weight],
                "low_pass",
                thresholds=9,
                values="signed",
                evaluator=evaluator,
                unfiltered=unfiltered,
            )
    return curves, evaluator.prefix_hits


@pytest.mark.parametrize("layer", ["conv1", "conv2", "fc"])
@pytest.mark.parametrize("source", ["filtered", "original"])
@pytest.mark.parametrize("attack", ["fgsm", "gaussian"])
def test_prefix_reuse_is_bit_identical(layer, source, attack):
    torch.manual_seed(0)
    model = Residual().eval()
    model.bn.running_mean.uniform_(-0.1, 0.1)
    data = _data(model)
    atk = (
        FGSM(FGSMSpec(eps=0.1), (0, 1), 0)
        if attack == "fgsm"
        else GaussianNoise(GaussianSpec(sigma=0.2), (0, 1), 0)
    )
    splitter = NetworkSplitter(model)
    whole, hits_whole = _curves(model, data, atk, source, layer, 0, splitter)
    reused, hits = _curves(model, data, atk, source, layer, 1 << 30, splitter)
    assert hits_whole == 0 and hits == 1
    assert reused.clean_accuracy == whole.clean_accuracy
    assert reused.adversarial_accuracy == whole.adversarial_accuracy


def test_skip_tensor_is_part_of_the_cut():
    split = NetworkSplitter(Residual().eval()).split("conv2")
    assert split is not None
    assert len(split.live) == 1  # relu(conv1) feeds both conv2 and the skip add
    x = torch.rand(2, 1, 6, 6)
    model = Residual().eval()
    split = NetworkSplitter(model).split("bn")
    assert split is not None and len(split.live) == 2  # conv2's output and the skip tensor
    with torch.no_grad():
        assert torch.equal(split.suffix(*split.prefix(x)), model(x))


def test_untraceable_model_runs_whole_with_same_results():
    torch.manual_seed(0)
    model = Untraceable().eval()
    splitter = NetworkSplitter(model)
    assert not splitter.traceable
    data = _data(model)
    atk = FGSM(FGSMSpec(eps=0.1), (0, 1), 0)
    curves, hits = _curves(model, data, atk, "filtered", "conv2", 1 << 30, splitter)
    assert hits == 0
    assert len(curves.clean_accuracy) == 9


def test_budget_too_small_falls_back_to_whole_network():
    torch.manual_seed(0)
    model = Residual().eval()
    data = _data(model)
    atk = FGSM(FGSMSpec(eps=0.1), (0, 1), 0)
    _, hits = _curves(model, data, atk, "original", "fc", 1024, NetworkSplitter(model))
    assert hits == 0


@pytest.mark.parametrize("layer", ["conv1", "conv2", "fc"])
def test_fast_mode_vmaps_thresholds_and_matches_exact(layer):
    torch.manual_seed(0)
    model = Residual().eval()
    data = _data(model)
    atk = FGSM(FGSMSpec(eps=0.1), (0, 1), 0)
    splitter = NetworkSplitter(model)
    weight = dict(model.named_modules())[layer].weight
    results = {}
    for fast in (False, True):
        calls: list[int] = []
        with frozen_parameters(model):
            ev = Evaluator(
                model, data, atk, "original", splitter=splitter, prefix_budget=1 << 30, fast=fast
            )
            with ev.focus(layer):
                assert ev.batched_evaluation([weight]) is None  # on CPU it measured slower
            ev.batching_devices = ("cpu",)  # so that the vmap path is tested here
            unfiltered = ev.evaluate()
            with ev.focus(layer):
                assert (ev.batched_evaluation([weight]) is not None) == fast
                results[fast] = sweep_scope(
                    [weight],
                    "pulse",
                    thresholds=9,
                    values="signed",
                    evaluator=ev,
                    unfiltered=unfiltered,
                    on_variant=partial(calls.append, 1),
                )
        assert len(calls) == results[fast].evaluated_variants
    # measured on this network: no accuracy changes (the documented error of fast mode)
    assert results[True].clean_accuracy == results[False].clean_accuracy
    assert results[True].adversarial_accuracy == results[False].adversarial_accuracy
