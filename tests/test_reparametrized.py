"""Re-parametrised weights are filtered where the forward pass reads them, or refused; and a
filter that leaves every logit bit-identical is reported as inert, never as a silent point."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from pytest_inferlink.ci import finding_lines
from torch import nn
from torch.nn.utils import parametrizations, prune

from inferlink_audit.attacks import FGSM
from inferlink_audit.audit import AuditSession, run_audit
from inferlink_audit.errors import UnsupportedError
from inferlink_audit.filters import pulse_half_width, threshold_grid
from inferlink_audit.layers import AnalysedLayer, select_layers
from inferlink_audit.prefix import NetworkSplitter
from inferlink_audit.report import report_html
from inferlink_audit.results import read_results, write_results
from inferlink_audit.spec import FGSMSpec, LayerSelectionSpec
from inferlink_audit.spec_loader import load_spec
from inferlink_audit.summary import INERT_EXPLANATION, text_summary
from inferlink_audit.sweep import Curves, EvalData, Evaluator, frozen_parameters, sweep_scope

from .naive_reference import naive_sweep
from .test_sweep import TinyCNN

EPS = 0.1
THRESHOLDS = 9


def _data(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 6, 6, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.rand(64, generator=gen) < 0.25
    return x, torch.where(flip, (y + 1) % 4, y)


def _settle(model: nn.Module) -> nn.Module:
    """A few training-mode passes (spectral norm's power iteration converges), then eval; the
    last pass runs without autograd so a hook-based weight_norm model can be deep-copied."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(5):
            model.train()(torch.rand(8, 1, 6, 6, generator=gen))
        model.eval()(torch.rand(8, 1, 6, 6, generator=gen))
    return model


REPARAMETRISED: dict[str, tuple[Callable[[nn.Module], object], str]] = {
    "parametrize weight_norm": (parametrizations.weight_norm, "parametrizations.weight.original1"),
    "parametrize spectral_norm": (
        parametrizations.spectral_norm,
        "parametrizations.weight.original",
    ),
    "hook weight_norm": (nn.utils.weight_norm, "weight_v"),
    "hook spectral_norm": (nn.utils.spectral_norm, "weight_orig"),
}


def _reparametrised(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN()
    apply, _ = REPARAMETRISED[kind]
    apply(model.conv)
    apply(model.fc)
    return _settle(model)


def _engine_curves(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layer: AnalysedLayer,
    filter_name: str,
    *,
    split: bool,
    source: str = "filtered",
    values: str = "signed",
) -> Curves:
    with frozen_parameters(model):
        evaluator = Evaluator(
            model,
            EvalData(x, y, 16),
            FGSM(FGSMSpec(eps=EPS), (0, 1), 0),
            source,  # type: ignore[arg-type]
            splitter=NetworkSplitter(model) if split else None,
            prefix_budget=1 << 30 if split else 0,
        )
        unfiltered = evaluator.evaluate()
        with evaluator.focus(layer.name):
            return sweep_scope(
                layer.parameters,
                filter_name,  # type: ignore[arg-type]
                thresholds=THRESHOLDS,
                values=values,  # type: ignore[arg-type]
                evaluator=evaluator,
                unfiltered=unfiltered,
            )


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
@pytest.mark.parametrize("split", [True, False], ids=["prefix", "whole"])
@pytest.mark.parametrize("filter_name", ["low_pass", "high_pass", "pulse"])
@pytest.mark.parametrize("kind", list(REPARAMETRISED))
def test_reparametrised_layer_curve_equals_a_deep_copy_that_zeroes_its_stored_tensor(
    kind: str, filter_name: str, split: bool
) -> None:
    """The hook-based forms rebuild ``weight`` on every call (filtering it did nothing: a flat
    curve while ρ rose); the parametrize forms were dropped as ``Parametrized…`` types."""
    model = _reparametrised(kind)
    x, y = _data(model)
    layers = select_layers(model, LayerSelectionSpec())
    stored = REPARAMETRISED[kind][1]
    assert [(la.name, la.type, la.tensor_names) for la in layers] == [
        ("conv", "Conv2d", [stored]),
        ("fc", "Linear", [stored]),
    ]
    for layer in layers:
        clean, adv, removed, grid = naive_sweep(
            model, [f"{layer.name}.{stored}"], filter_name, THRESHOLDS, x, y, EPS
        )
        curves = _engine_curves(model, x, y, layer, filter_name, split=split)
        assert curves.thresholds == pytest.approx(grid.tolist(), abs=0)
        assert curves.removed_fraction == pytest.approx(removed.tolist(), abs=1e-12)
        assert curves.clean_accuracy == pytest.approx(clean.tolist(), abs=1e-12)
        assert curves.adversarial_accuracy == pytest.approx(adv.tolist(), abs=1e-12)
        assert len(set(curves.clean_accuracy)) > 1, "the filter must change what is measured"
        assert curves.inert_thresholds == []


def test_parametrized_types_match_the_class_before_parametrization() -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    parametrizations.weight_norm(model.fc)
    only_linear = select_layers(model, LayerSelectionSpec(types=["Linear"]))
    assert [(la.name, la.type) for la in only_linear] == [("fc", "Linear")]
    assert only_linear[0].parameters[0] is model.fc.parametrizations.weight.original1


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_scripted_modules_match_their_original_class() -> None:
    """A TorchScript module's type is ``RecursiveScriptModule``; its ``original_name`` is what
    the user wrote (``Conv2d``), so default types select it as in the eager model."""
    torch.manual_seed(0)
    scripted = torch.jit.script(TinyCNN().eval())
    layers = select_layers(scripted, LayerSelectionSpec())
    params = dict(scripted.named_parameters())
    assert [(la.name, la.type) for la in layers] == [("conv", "Conv2d"), ("fc", "Linear")]
    assert all(la.parameters[0] is params[f"{la.name}.weight"] for la in layers)


def _expected_refusal(layer: str, what: str, fix: str) -> str:
    return (
        f"filtering.layers selects {layer}.weight, which {what}: zeroing it would not change "
        "the weight the forward pass uses, so its curves would not measure that layer. "
        f"{fix}, or leave the layer out with filtering.layers.exclude: ['{layer}']."
    )


def test_orthogonal_parametrization_is_refused_naming_the_layer() -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    parametrizations.orthogonal(model.fc)
    with pytest.raises(UnsupportedError) as caught:
        select_layers(model, LayerSelectionSpec())
    assert str(caught.value) == _expected_refusal(
        "fc",
        "is rebuilt on every call by the parametrization _Orthogonal (torch.nn.utils.parametrize)",
        "Only a single weight_norm or spectral_norm parametrization is filtered (on its stored "
        "tensor); bake the weight in the model factory with torch.nn.utils.parametrize."
        'remove_parametrizations(module, "weight")',
    )
    # Excluding it, as the message says, selects the rest.
    rest = select_layers(model, LayerSelectionSpec(exclude=["fc"]))
    assert [la.name for la in rest] == ["conv"]


def test_pruning_hook_is_refused_naming_the_layer() -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    prune.l1_unstructured(model.conv, "weight", amount=0.3)
    with pytest.raises(UnsupportedError) as caught:
        select_layers(model, LayerSelectionSpec())
    assert str(caught.value) == _expected_refusal(
        "conv",
        "is rebuilt from weight_orig × weight_mask by torch.nn.utils.prune on every call",
        "Make the pruning permanent in the model factory with "
        'torch.nn.utils.prune.remove(module, "weight")',
    )
    prune.remove(model.conv, "weight")
    assert [la.name for la in select_layers(model, LayerSelectionSpec())] == ["conv", "fc"]


def test_weight_that_is_not_a_registered_tensor_is_refused() -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    weight = model.fc.weight.detach().clone()
    del model.fc.weight
    model.fc.weight = weight  # a plain attribute: a hook could rebuild it on every call
    with pytest.raises(UnsupportedError) as caught:
        select_layers(model, LayerSelectionSpec())
    assert str(caught.value) == _expected_refusal(
        "fc",
        "is not a registered parameter or buffer of the module (a hook or the forward pass may "
        "rebuild it on every call)",
        "Register it with nn.Parameter or register_buffer",
    )


# --------------------------------------------------------------------------- the inert guard
class WithBypassedHead(TinyCNN):
    """``aux`` is computed but multiplied by zero: filtering it cannot change any logit. tanh
    instead of ReLU, so that no weight of ``conv`` or ``fc`` is read only by a dead unit (a
    weight fed by a channel that is zero on every input is inert too, rightly)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(torch.tanh(self.conv(x)).flatten(1))
        return logits + 0.0 * torch.tanh(self.aux(logits))


def _bypassed() -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, AnalysedLayer]]:
    torch.manual_seed(0)
    model = WithBypassedHead().eval()
    x, y = _data(model)
    layers = {la.name: la for la in select_layers(model, LayerSelectionSpec())}
    return model, x, y, layers


def _inert_thresholds(
    tensors: list[torch.Tensor], filter_name: str, bypassed: list[bool] | None = None
) -> list[float]:
    """Thresholds whose filter zeroes at least one element, all of them in ``bypassed``
    tensors (by default all), computed independently of the engine."""
    values = np.concatenate([t.detach().double().numpy().ravel() for t in tensors])
    flags = bypassed or [True] * len(tensors)
    inside = np.concatenate([np.full(t.numel(), b) for t, b in zip(tensors, flags, strict=True)])
    grid = threshold_grid(values.min(), values.max(), THRESHOLDS, filter_name)  # type: ignore[arg-type]
    delta = pulse_half_width(values.min(), values.max(), THRESHOLDS)
    picked = []
    for alpha in grid:
        if filter_name == "low_pass":
            mask = values >= alpha
        elif filter_name == "high_pass":
            mask = values <= alpha
        else:
            mask = (values >= alpha - delta) & (values < alpha + delta)
        if mask.any() and not (mask & ~inside).any():
            picked.append(float(alpha))
    return picked


@pytest.mark.parametrize("source", ["filtered", "original"])
@pytest.mark.parametrize("split", [True, False], ids=["prefix", "whole"])
@pytest.mark.parametrize("filter_name", ["low_pass", "high_pass", "pulse"])
def test_inert_guard_flags_every_variant_of_a_bypassed_layer(
    filter_name: str, split: bool, source: str
) -> None:
    model, x, y, layers = _bypassed()
    curves = _engine_curves(model, x, y, layers["aux"], filter_name, split=split, source=source)
    expected = _inert_thresholds(layers["aux"].parameters, filter_name)
    assert expected  # the sweep does zero weights of aux
    assert curves.inert_thresholds == expected
    assert len(set(curves.clean_accuracy)) == 1  # the flat curve the guard explains


@pytest.mark.parametrize("split", [True, False], ids=["prefix", "whole"])
@pytest.mark.parametrize("filter_name", ["low_pass", "high_pass", "pulse"])
def test_inert_guard_is_silent_on_a_layer_that_is_used(filter_name: str, split: bool) -> None:
    model, x, y, layers = _bypassed()
    for name in ("conv", "fc"):
        curves = _engine_curves(model, x, y, layers[name], filter_name, split=split)
        assert curves.inert_thresholds == []


def test_inert_guard_ignores_variants_that_zero_only_zeros() -> None:
    """Zeroing a weight that is already 0.0 changes nothing by construction: not a finding.
    Under ``values: magnitude`` a pruned layer's first high-pass threshold is |θ| ≤ 0."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    with torch.no_grad():
        w = model.fc.weight
        w[:, : w.shape[1] // 2] = 0.0  # half the layer's weights are exact zeros
    x, y = _data(model)
    layer = {la.name: la for la in select_layers(model, LayerSelectionSpec())}["fc"]
    curves = _engine_curves(model, x, y, layer, "high_pass", split=False, values="magnitude")
    assert curves.thresholds[0] == 0.0
    assert curves.removed_fraction[0] == 0.5  # that variant zeroes exactly the zeros
    assert curves.inert_thresholds == []


# --------------------------------------------------------------------------- end to end
class ReparametrisedCNN(TinyCNN):
    """A model factory for the audit: ``TinyCNN`` with ``kind`` applied to both layers."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        apply, _ = REPARAMETRISED[kind]
        apply(self.conv)
        apply(self.fc)


def _write_audit(folder: Path, factory: str, model: nn.Module, kwargs: dict[str, Any]) -> Path:
    x, y = _data(model)
    torch.save(model.state_dict(), folder / "model.pt")
    torch.save({"x": x, "y": y}, folder / "test.pt")
    spec = {
        "version": 1,
        "name": "reparametrised",
        "model": {"factory": f"tests.test_reparametrized:{factory}", "kwargs": kwargs},
        "data": {"source": "tensors", "path": "test.pt", "batch_size": 16},
        "device": "cpu",
        "filtering": {"thresholds": THRESHOLDS, "filters": ["low_pass", "pulse"]},
        "attacks": [{"fgsm": {"eps": EPS}}],
    }
    spec["model"]["checkpoint"] = "model.pt"  # type: ignore[index]
    path = folder / "audit.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
@pytest.mark.parametrize("kind", list(REPARAMETRISED))
def test_audit_of_a_reparametrised_model_equals_deep_copy_evaluations(
    tmp_path: Path, kind: str
) -> None:
    """End to end (checkpoint, prefix reuse, memo, global scope): every curve is the one a deep
    copy gives when the stored tensor's entries are zeroed."""
    path = _write_audit(tmp_path, "ReparametrisedCNN", _reparametrised(kind), {"kind": kind})
    session = AuditSession(load_spec(path))
    model = session.prepared.loaded.module
    x, y = session.prepared.data.x, session.prepared.data.y
    stored = REPARAMETRISED[kind][1]
    for filter_name in ("low_pass", "pulse"):
        sweeps = session.sweeps(filter_name, f"fgsm_eps{EPS}")
        with torch.no_grad():
            model(x[:1])  # a hook-based weight_norm model deep-copies only after such a pass
        assert [s.layer for s in sweeps] == ["conv", "fc", None]
        for sweep in sweeps:
            layers = [sweep.layer] if sweep.layer else ["conv", "fc"]
            names = [f"model.{layer}.{stored}" for layer in layers]
            clean, adv, removed, _ = naive_sweep(model, names, filter_name, THRESHOLDS, x, y, EPS)
            where = f"{filter_name} {sweep.layer or 'global'}"
            assert sweep.clean_accuracy == clean.tolist(), where
            assert sweep.adversarial_accuracy == adv.tolist(), where
            assert sweep.removed_fraction == pytest.approx(removed.tolist(), abs=1e-12), where
            assert sweep.inert_thresholds == [], where


def test_inert_filtering_is_reported_in_results_report_and_summary(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = _write_audit(tmp_path, "WithBypassedHead", WithBypassedHead().eval(), {})
    result, _, session = run_audit(load_spec(path))
    inert = {
        (s.layer, s.filter): s.inert_thresholds
        for s in result.models[0].sweeps
        if s.inert_thresholds
    }
    layers = session.prepared.layers
    assert [la.name for la in layers] == ["conv", "fc", "aux"]
    everything = [t for la in layers for t in la.parameters]
    aux_only = [la.name == "aux" for la in layers for _ in la.parameters]
    expected = {
        key: thresholds
        for f in ("low_pass", "pulse")
        for key, thresholds in (
            # the aux head: every threshold that zeroes a weight of it
            (("aux", f), _inert_thresholds(layers[-1].parameters, f)),
            # the global scope: the thresholds that zero weights of aux alone
            ((None, f), _inert_thresholds(everything, f, aux_only)),
        )
        if thresholds
    }
    assert ("aux", "low_pass") in expected and (None, "low_pass") in expected
    assert inert == expected

    write_results(result, tmp_path / "results.json")
    data = json.loads((tmp_path / "results.json").read_text())
    written = {
        (s["layer"], s["filter"]): s["inert_thresholds"]
        for s in data["models"][0]["sweeps"]
        if s["inert_thresholds"]
    }
    assert written == expected
    assert read_results(tmp_path / "results.json") == result

    lines = [
        f"{s.layer or 'global'} · {s.filter} · {s.attack}: "
        f"{len(expected[(s.layer, s.filter)])} of {THRESHOLDS} thresholds"
        for s in result.models[0].sweeps
        if (s.layer, s.filter) in expected
    ]
    html = report_html(result)
    banner = (
        '<div class="note inert" role="note"><strong>Inert filtering</strong> in '
        f"{len(expected)} sweeps: "
        + "; ".join(f"<code>{line}</code>" for line in lines)
        + f". {INERT_EXPLANATION}</div>"
    )
    assert banner.replace("'", "&#39;") in html
    summary = text_summary(result).splitlines()
    warning = summary.index(f"   WARNING inert filtering: {'; '.join(lines)}.")
    assert summary[warning + 1] == f"   {INERT_EXPLANATION}"
    # The pytest plugin prints the same finding in its terminal section.
    assert finding_lines(result) == [
        f"WARNING {result.models[0].name}: inert filtering: {'; '.join(lines)}.",
        f"  {INERT_EXPLANATION}",
    ]


def test_results_without_inert_thresholds_still_read(tmp_path: Path) -> None:
    """results.json written before the guard existed has no ``inert_thresholds`` key."""
    torch.manual_seed(0)
    path = _write_audit(tmp_path, "WithBypassedHead", WithBypassedHead().eval(), {})
    spec = load_spec(path)
    result, _, _ = run_audit(
        spec.model_copy(
            update={
                "filtering": spec.filtering.model_copy(
                    update={"filters": ["low_pass"], "scopes": ["global"]}
                )
            }
        )
    )
    write_results(result, tmp_path / "results.json")
    data = json.loads((tmp_path / "results.json").read_text())
    for sweep in data["models"][0]["sweeps"]:
        del sweep["inert_thresholds"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = read_results(tmp_path / "old.json")
    assert [s.inert_thresholds for s in old.models[0].sweeps] == [[]]
