"""Models the project has never seen: every local curve equals a naive deep-copy evaluation.

Each model here breaks an assumption a faster engine might make: a weight tied into a module
that runs first (registered first, called second), a tied partner that is not analysed, a
weight read functionally before its layer, in-place operations after the cut, concatenating
and stacking branches, ``torch.add(..., alpha=2)``, BatchNorm after convolutions. The audit
runs end to end (prefix reuse, the variant memo and all) and each sweep is compared with
``naive_reference.naive_sweep``: a ``copy.deepcopy`` of the model per threshold with the
filter's mask applied, FGSM crafted afresh, nothing shared with the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from inferlink_audit.audit import AuditSession
from inferlink_audit.checks import PlannedCheck
from inferlink_audit.results import SweepResult
from inferlink_audit.scores import fragile_fraction
from inferlink_audit.spec_loader import load_spec

from .naive_reference import naive_sweep

EPS = 0.1
THRESHOLDS = 7
FILTERS = ["low_pass", "pulse"]


class TiedOutOfOrder(nn.Module):
    """``a`` is registered first but called second; ``b`` shares its weight and runs first."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(3 * 36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        h = torch.tanh(self.b(h))
        h = torch.tanh(self.a(h))
        return self.fc(h.flatten(1))


class Mix(nn.Module):
    """Not a Conv or Linear, so never analysed; it reads a weight it shares with ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3 * 36) / 10)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class TiedPartnerNotAnalysed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = Mix()  # registered first: the tied tensor's first name is mix.weight
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * 36, 4)
        self.head.weight = self.mix.weight
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        g = torch.tanh(self.mix(h))
        return self.fc(g) + self.head(h)


class FunctionalBeforeLayer(nn.Module):
    """The weight of ``fc`` is read by ``F.linear`` before ``fc`` itself runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(72, 72)
        self.head = nn.Linear(72, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        g = torch.tanh(F.linear(h, self.fc.weight))
        return self.head(torch.tanh(self.fc(g)) + g)


class InPlaceAfterCut(nn.Module):
    """``h`` is live at the cut before ``conv2`` and written in place after it."""

    def __init__(self, kind: str = "mul_") -> None:
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3 * 36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        y = self.conv2(torch.tanh(h))
        s = torch.sigmoid(h)  # reads h after the cut, before it is written
        if self.kind == "mul_":
            h.mul_(0.5)
        elif self.kind == "relu_module":
            h = self.act(h)
        else:
            h = F.relu(h, inplace=True)
        return self.fc((y + h + s).flatten(1))


class Branches(nn.Module):
    """Two branches joined by ``torch.cat`` and ``torch.stack``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 2, 3, padding=1)
        self.conv_b = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(6 * 36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.conv_a(x))
        b = torch.tanh(self.conv_b(x))
        joined = torch.cat([a, b], dim=1)
        stacked = torch.stack([a, b]).sum(0)
        return self.fc(torch.cat([joined.flatten(1), stacked.flatten(1)], 1))


class AddAlpha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        h = torch.add(a, self.conv2(torch.tanh(a)), alpha=2)
        return self.fc(torch.tanh(h).flatten(1))


class BatchNormAfterConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(h.flatten(1))


MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "tied_out_of_order": ("TiedOutOfOrder", {}),
    "tied_partner_not_analysed": ("TiedPartnerNotAnalysed", {}),
    "functional_before_layer": ("FunctionalBeforeLayer", {}),
    "inplace_mul": ("InPlaceAfterCut", {"kind": "mul_"}),
    "inplace_relu_module": ("InPlaceAfterCut", {"kind": "relu_module"}),
    "inplace_relu_functional": ("InPlaceAfterCut", {"kind": "relu_functional"}),
    "cat_stack": ("Branches", {}),
    "add_alpha": ("AddAlpha", {}),
    "batchnorm": ("BatchNormAfterConvs", {}),
}


def _build(name: str) -> nn.Module:
    """A seeded model whose predictions move when its weights are filtered."""
    cls, kwargs = MODELS[name]
    torch.manual_seed(0)
    model: nn.Module = globals()[cls](**kwargs)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters come once
            p.mul_(3.0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def _write_audit(folder: Path, name: str, source: str) -> Path:
    """A checkpoint, a labelled test set and a spec for the model ``name``."""
    model = _build(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(48, 1, 6, 6, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    y = torch.where(torch.rand(48, generator=gen) < 0.25, (y + 1) % 4, y)
    torch.save(model.state_dict(), folder / "model.pt")
    torch.save({"x": x, "y": y}, folder / "test.pt")
    cls, kwargs = MODELS[name]
    spec = {
        "version": 1,
        "name": name.replace("_", "-"),
        "model": {
            "factory": f"tests.test_hostile_models:{cls}",
            "kwargs": kwargs,
            "checkpoint": "model.pt",
        },
        "data": {"source": "tensors", "path": "test.pt", "batch_size": 16},
        "device": "cpu",
        "filtering": {
            "thresholds": THRESHOLDS,
            "filters": FILTERS,
            "scopes": ["local", "global"],
            "adversarial_source": source,
        },
        "attacks": [{"fgsm": {"eps": EPS}}],
    }
    path = folder / "audit.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _distinct_names(model: nn.Module, names: list[str]) -> list[str]:
    """Parameter names with a tensor tied under several names kept once."""
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: dict[int, str] = {}
    for name in names:
        seen.setdefault(id(params[name]), name)
    return list(seen.values())


@pytest.mark.parametrize("source", ["filtered", "original"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_curve_equals_a_naive_deep_copy_evaluation(tmp_path, name, source):
    session = AuditSession(load_spec(_write_audit(tmp_path, name, source)))
    model = session.prepared.loaded.module
    x, y = session.prepared.data.x, session.prepared.data.y
    layers = [layer.name for layer in session.prepared.layers]
    for filter_name in FILTERS:
        sweeps = session.sweeps(filter_name, f"fgsm_eps{EPS}")
        assert [s.layer for s in sweeps] == [*layers, None]
        for sweep in sweeps:
            wanted = [sweep.layer] if sweep.layer else layers
            names = _distinct_names(model, [f"model.{layer}.weight" for layer in wanted])
            clean, adv, removed, _ = naive_sweep(
                model, names, filter_name, THRESHOLDS, x, y, EPS, original=source == "original"
            )
            where = f"{name} {filter_name} {sweep.layer or 'global'}"
            assert sweep.clean_accuracy == clean.tolist(), where
            assert sweep.adversarial_accuracy == adv.tolist(), where
            assert sweep.removed_fraction == pytest.approx(removed.tolist(), abs=1e-12), where
            params = dict(model.named_parameters(remove_duplicate=False))
            expected_numel = sum(params[n].numel() for n in names)
            assert sweep.numel == expected_numel, where


def _local(sweeps: list[SweepResult]) -> list[SweepResult]:
    return [s for s in sweeps if s.scope == "local"]


def test_a_tied_weight_counts_once_in_the_global_scope_and_the_fragile_fraction(tmp_path):
    from inferlink_audit.scores import scope_members  # new here: the curve tests run without it

    session = AuditSession(load_spec(_write_audit(tmp_path, "tied_out_of_order", "original")))
    inner = session.prepared.loaded.inner
    sweeps = session.sweeps("pulse", f"fgsm_eps{EPS}")
    shared = inner.a.weight.numel()
    distinct = sum(p.numel() for p in inner.parameters() if p.dim() > 1)  # weights, tied once
    assert {s.layer: s.numel for s in sweeps} == {
        "a": shared,
        "stem": inner.stem.weight.numel(),
        "b": shared,
        "fc": inner.fc.weight.numel(),
        None: distinct,
    }
    members = scope_members(inner, session.prepared.layers)
    assert members["a"] == members["b"] == [("a.weight", shared)]
    local = _local(sweeps)
    # On this seeded model the tied pair is labelled fragile on clean data: the shared weight
    # is then 81 of the 540 distinct weights, not 162 of 621.
    assert {s.layer for s in local if s.labels.clean == "fragile"} == {"a", "b"}
    for response in ("clean", "adversarial"):
        fragile = {s.layer for s in local if getattr(s.labels, response) == "fragile"}
        expected = sum(
            p.numel()
            for p, holders in ((inner.a.weight, {"a", "b"}), (inner.stem.weight, {"stem"}))
            if holders & fragile
        ) + (inner.fc.weight.numel() if "fc" in fragile else 0)
        fraction, _ = fragile_fraction(local, response, members=members)
        assert fraction == pytest.approx(expected / distinct, abs=1e-15)
    # The check item reads the same de-duplicated fraction.
    planned = PlannedCheck(
        "pulse-fgsm-max_fragile_fraction",
        "max_fragile_fraction",
        "pulse",
        f"fgsm_eps{EPS}",
        1.0,
        None,
        "pulse fgsm",
        response="clean",
    )
    assert session.evaluate(planned).measured == pytest.approx(81 / 540, abs=1e-15)
