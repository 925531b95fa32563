"""Prefix reuse gives bit-identical curves, on residual networks too, and falls back safely."""

from __future__ import annotations

import operator
from functools import partial

import pytest
import torch
from torch import fx, nn

from inferlink_audit.attacks import FGSM, GaussianNoise
from inferlink_audit.prefix import NetworkSplitter
from inferlink_audit.spec import FGSMSpec, GaussianSpec
from inferlink_audit.sweep import EvalData, Evaluator, frozen_parameters, sweep_scope

from .naive_reference import naive_sweep


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
    clean, adv, removed, _ = naive_sweep(
        model, ["conv2.weight"], "low_pass", 9, data.x, data.y, 0.1
    )
    assert curves.clean_accuracy == clean.tolist()
    assert curves.adversarial_accuracy == adv.tolist()
    assert curves.removed_fraction == pytest.approx(removed.tolist(), abs=1e-12)


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


# ---------------------------------------------------------------- where the cut may go
class TiedFirst(nn.Module):
    """``b`` holds ``a``'s weight and runs before ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.stem = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        return self.fc(torch.tanh(self.a(torch.tanh(self.b(h)))))


class ReadThroughPartner(nn.Module):
    """``fc.weight`` is read functionally, under the name of a partner registered first."""

    def __init__(self) -> None:
        super().__init__()
        self.partner = nn.Linear(6, 6)
        self.stem = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 6)
        self.fc.weight = self.partner.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        g = torch.tanh(torch.nn.functional.linear(h, self.partner.weight))
        return self.head(self.fc(g) + g)


class WritesLiveValue(nn.Module):
    """After the cut before ``conv2``, the live ``h`` (or a view of it) is written in place."""

    def __init__(self, write: str) -> None:
        super().__init__()
        self.write = write
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3 * 36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        y = self.conv2(torch.tanh(h))
        s = torch.sigmoid(h)  # reads h after the cut, before the write
        if self.write == "mul_":
            h.mul_(0.5)
        elif self.write == "relu_module":
            self.act(h)
        elif self.write == "relu_functional":
            torch.nn.functional.relu(h, True)
        elif self.write == "torch.relu_":
            torch.relu_(h)
        elif self.write == "view":
            h.flatten(1).sub_(1.0)
        return self.fc((y + h + s).flatten(1))


def _tensors(model: nn.Module, layer: str) -> list[torch.Tensor]:
    return [dict(model.named_modules())[layer].weight]


def _prefix_stays_valid(model: nn.Module, layer: str, x: torch.Tensor) -> None:
    """Run the prefix once, then change the scope as a sweep does (its ``.data`` pointed at
    ever sparser copies): every suffix pass on the cached values equals the whole network."""
    tensors = _tensors(model, layer)
    split = NetworkSplitter(model).split(layer, tensors)
    assert split is not None
    originals = [t.data for t in tensors]
    try:
        with torch.no_grad():
            live = split.prefix(x)
            for step in range(4):
                for t, orig in zip(tensors, originals, strict=True):
                    copy = orig.clone()
                    copy.view(-1)[: step * orig.numel() // 4] = 0
                    t.data = copy
                assert torch.equal(split.suffix(*live), model(x)), f"step {step}"
    finally:
        for t, orig in zip(tensors, originals, strict=True):
            t.data = orig


@pytest.mark.parametrize(
    ("build", "layer", "shape"),
    [
        (TiedFirst, "a", (5, 6)),
        (TiedFirst, "b", (5, 6)),
        (ReadThroughPartner, "fc", (5, 6)),
        *[
            (partial(WritesLiveValue, w), "conv2", (5, 1, 6, 6))
            for w in ("mul_", "relu_module", "relu_functional", "torch.relu_", "view")
        ],
    ],
)
def test_cached_prefix_stays_valid_while_the_scope_changes(build, layer, shape):
    torch.manual_seed(0)
    model = build().eval()
    _prefix_stays_valid(model, layer, torch.rand(*shape))


def test_cut_goes_before_the_first_reader_of_a_tied_weight():
    model = TiedFirst().eval()
    for layer in ("a", "b"):
        split = NetworkSplitter(model).split(layer, _tensors(model, layer))
        assert split is not None
        assert split.live == ("tanh",)  # stem's output: the cut is before b, which runs first


def test_a_live_value_written_in_place_is_recomputed_by_the_suffix():
    model = WritesLiveValue("mul_").eval()
    assert NetworkSplitter(model).split("conv2", _tensors(model, "conv2")).live == ("x",)
    clean = WritesLiveValue("none").eval()
    assert NetworkSplitter(clean).split("conv2", _tensors(clean, "conv2")).live == (
        "conv1",
        "tanh",
    )


def test_a_hook_that_may_read_the_scope_moves_the_cut_before_its_module():
    model = TiedFirst().eval()
    model.a.register_forward_hook(lambda m, i, out: out + model.fc.weight.sum())
    split = NetworkSplitter(model).split("fc", _tensors(model, "fc"))
    # The hook might also write a's input in place, so that input is recomputed too.
    assert split is not None and split.live == ("b",)
    _prefix_stays_valid(model, "fc", torch.rand(5, 6))


def test_a_hook_the_trace_does_not_see_prevents_the_split():
    model = TiedFirst().eval()
    model.register_forward_hook(lambda m, i, out: out * 2)  # on the root: not in the graph
    assert NetworkSplitter(model).split("fc", _tensors(model, "fc")) is None


class _TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)


@pytest.mark.parametrize(
    "write",
    [
        lambda g, h: g.call_function(operator.iadd, (h, 1.0)),
        lambda g, h: g.call_function(operator.setitem, (h, 0, 0.0)),
        lambda g, h: g.call_method("__imul__", (h, 2.0)),
        lambda g, h: g.call_function(torch.mul, (h, 2.0), {"out": h}),
    ],
    ids=["iadd", "setitem", "__imul__", "out="],
)
def test_writes_symbolic_trace_cannot_record_are_recognised(write):
    """``h += 1`` and ``h[0] = 0`` do not trace, but a graph built by hand (or by another
    tracer) may hold them: the written live value is still recomputed on every pass."""
    torch.manual_seed(0)
    root = _TwoConvs().eval()
    graph = fx.Graph()
    x = graph.placeholder("x")
    h = graph.call_module("conv1", (x,))
    y = graph.call_module("conv2", (graph.call_function(torch.tanh, (h,)),))
    s = graph.call_function(torch.sigmoid, (h,))
    write(graph, h)
    graph.output(graph.call_function(operator.add, (graph.call_function(operator.add, (y, h)), s)))
    model = fx.GraphModule(root, graph)
    splitter = NetworkSplitter(root)
    splitter.model, splitter.graph_module = model, model
    split = splitter.split("conv2", [root.conv2.weight])
    assert split is not None and split.live == ("x",)
    inputs = torch.rand(2, 1, 6, 6)
    with torch.no_grad():
        live = split.prefix(inputs)
        for _ in range(3):
            assert torch.equal(split.suffix(*live), model(inputs))
