"""Layer selection and the global threshold range, on the bundled digits CNN: ``layers.exclude``,
``layers.parameters``, ``filtering.range`` and the "selects no layer" error, each against an
independent computation (a deep copy of the model per threshold, as in ``naive_reference``)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from example_audits.digits import DigitsCNN
from inferlink_audit.audit import AuditSession
from inferlink_audit.errors import AuditError
from inferlink_audit.layers import select_layers
from inferlink_audit.spec import LayerSelectionSpec
from inferlink_audit.spec_loader import load_spec

from .naive_reference import accuracies, naive_sweep, zeroed
from .specs import write_spec

EPS = 0.1
ATTACK = f"fgsm_eps{EPS}"
N = 5
DATA = {
    "source": "sklearn_digits",
    "limit": 64,
    "batch_size": 32,
    "normalize": {"mean": [0.5], "std": [0.5]},
}
ALL_LAYERS = ["conv1", "conv2", "fc1", "fc2"]


def _session(folder: Path, **filtering: object) -> AuditSession:
    spec = write_spec(folder, data=DATA, filtering={"thresholds": N, **filtering})
    return AuditSession(load_spec(spec))


def _inputs(session: AuditSession) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    p = session.prepared
    return p.loaded.module, p.data.x, p.data.y


def _assert_curves(sweep: object, clean: np.ndarray, adv: np.ndarray, removed: np.ndarray) -> None:
    assert sweep.clean_accuracy == clean.tolist()  # type: ignore[attr-defined]
    assert sweep.adversarial_accuracy == adv.tolist()  # type: ignore[attr-defined]
    assert sweep.removed_fraction == pytest.approx(removed.tolist(), abs=1e-12)  # type: ignore[attr-defined]


def _naive_range_sweep(
    model: nn.Module,
    names: list[str],
    filter_name: str,
    value_range: tuple[float, float],
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The literal definition with thresholds over a given range instead of [min θ, max θ]:
    ``n`` thresholds linspace(lo, hi), δ = (hi − lo)/(2n), a deep copy per threshold."""
    lo, hi = value_range
    grid = np.linspace(lo, hi, N)
    grid = grid[::-1] if filter_name == "low_pass" else grid
    delta = (hi - lo) / (2 * N)
    state = model.state_dict()
    values = np.concatenate([state[n].double().numpy().ravel() for n in names])
    clean, adv, removed = [], [], []
    for alpha in grid:
        variant = copy.deepcopy(model)
        sd = variant.state_dict()
        for name in names:
            sd[name][
                torch.from_numpy(zeroed(sd[name].double().numpy(), filter_name, alpha, delta))
            ] = 0
        variant.load_state_dict(sd)
        c, a = accuracies(variant, x, y, EPS, 0.0, 1.0)
        clean.append(c)
        adv.append(a)
        removed.append(zeroed(values, filter_name, alpha, delta).mean())
    return np.array(clean), np.array(adv), np.array(removed), grid


@pytest.mark.parametrize("filter_name", ["low_pass", "pulse"])
def test_filtering_range_sets_the_global_thresholds_and_leaves_local_ones(
    tmp_path: Path, filter_name: str
) -> None:
    value_range = (-0.2, 0.15)  # inside the weights' span, so both tails are cut off
    session = _session(tmp_path, range=list(value_range), filters=[filter_name])
    model, x, y = _inputs(session)
    sweeps = {s.layer: s for s in session.sweeps(filter_name, ATTACK)}
    names = [f"model.{layer}.weight" for layer in ALL_LAYERS]
    clean, adv, removed, grid = _naive_range_sweep(model, names, filter_name, value_range, x, y)
    glob = sweeps[None]
    assert glob.thresholds == grid.tolist()
    _assert_curves(glob, clean, adv, removed)
    values = np.concatenate([model.state_dict()[n].numpy().ravel() for n in names])
    assert values.min() < value_range[0] and values.max() > value_range[1]
    # A local scope's thresholds still span its own weights (DESIGN §1.2).
    conv1 = model.state_dict()["model.conv1.weight"].double().numpy()
    assert sweeps["conv1"].thresholds[0] == (
        conv1.max() if filter_name == "low_pass" else conv1.min()
    )
    assert sweeps["conv1"].thresholds[-1] == (
        conv1.min() if filter_name == "low_pass" else conv1.max()
    )


def test_layers_exclude_leaves_out_the_matching_layers(tmp_path: Path) -> None:
    session = _session(tmp_path, layers={"exclude": ["conv*"]}, filters=["low_pass"])
    model, x, y = _inputs(session)
    assert [layer.name for layer in session.prepared.layers] == ["fc1", "fc2"]
    sweeps = session.sweeps("low_pass", ATTACK)
    assert [s.layer for s in sweeps] == ["fc1", "fc2", None]
    glob = sweeps[-1]
    assert glob.layers == ["fc1", "fc2"]
    names = ["model.fc1.weight", "model.fc2.weight"]
    clean, adv, removed, grid = naive_sweep(model, names, "low_pass", N, x, y, EPS)
    assert glob.thresholds == grid.tolist()
    _assert_curves(glob, clean, adv, removed)
    state = model.state_dict()
    assert glob.numel == sum(state[n].numel() for n in names)


def test_layers_parameters_filters_weight_and_bias_as_one_scope(tmp_path: Path) -> None:
    session = _session(tmp_path, layers={"parameters": ["weight", "bias"]}, filters=["pulse"])
    model, x, y = _inputs(session)
    inner = session.prepared.loaded.inner
    conv1 = session.prepared.layers[0]
    assert conv1.name == "conv1"
    assert conv1.parameters[0] is inner.conv1.weight and conv1.parameters[1] is inner.conv1.bias
    sweeps = {s.layer: s for s in session.sweeps("pulse", ATTACK)}
    for layer in ALL_LAYERS:
        names = [f"model.{layer}.weight", f"model.{layer}.bias"]
        clean, adv, removed, grid = naive_sweep(model, names, "pulse", N, x, y, EPS)
        assert sweeps[layer].thresholds == grid.tolist(), layer
        _assert_curves(sweeps[layer], clean, adv, removed)
        state = model.state_dict()
        assert sweeps[layer].numel == sum(state[n].numel() for n in names)


class _WithBiasOnlyModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=False)
        self.norm = nn.LayerNorm(3)


def test_a_missing_parameter_is_skipped_per_layer() -> None:
    """``parameters: [weight, bias]`` on a layer without bias filters its weight alone."""
    model = _WithBiasOnlyModule()
    layers = select_layers(model, LayerSelectionSpec(parameters=["weight", "bias"]))
    assert [(la.name, la.tensor_names) for la in layers] == [("fc", ["weight"])]


def _no_layer_message() -> str:
    return (
        "filtering.layers selects no layer (types ['Conv1d'], include ['*'], exclude []). "
        "The model's module types with parameters are: Conv2d, Linear; adjust filtering.layers."
    )


def test_selecting_no_layer_is_an_audit_error_naming_the_candidates(tmp_path: Path) -> None:
    with pytest.raises(AuditError) as caught:
        select_layers(DigitsCNN(), LayerSelectionSpec(types=["Conv1d"]))
    assert type(caught.value) is AuditError
    assert str(caught.value) == _no_layer_message()

    spec = load_spec(write_spec(tmp_path, data=DATA, filtering={"layers": {"types": ["Conv1d"]}}))
    with pytest.raises(AuditError) as caught:
        AuditSession(spec).prepared  # noqa: B018 - preparing is what raises
    assert type(caught.value) is AuditError
    line = spec.line_of("filtering", "layers")
    assert str(caught.value) == f"{tmp_path / 'audit.yaml'}:{line}: {_no_layer_message()}"
