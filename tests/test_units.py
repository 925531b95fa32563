"""Unit semantics (analysis.units; Szegedy et al. 2014, §3): the top-k test examples of units
and of random directions, checked against numpy, and their place in the audit and report."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from inferlink_audit.audit import AuditSession
from inferlink_audit.checks import UNITS_ONLY, is_check, plan_checks
from inferlink_audit.errors import AuditError, UnsupportedError
from inferlink_audit.report import report_html
from inferlink_audit.results import (
    AuditResult,
    ModelResult,
    UnitSemanticsResult,
    read_results,
    write_results,
)
from inferlink_audit.spec_loader import load_spec
from inferlink_audit.sweep import state_digest
from inferlink_audit.units import random_directions, unit_semantics

from .specs import write_spec

UNITS = {"layer": "fc1", "units": 3, "directions": 2, "k": 5}


def numpy_top_k(values: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """The k largest of a 1-D array, largest first, ties to the lower index (independently)."""
    order = np.lexsort((np.arange(values.size), -values))[:k]
    return order.tolist(), values[order].tolist()


def linear_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))


def run(net: nn.Module, layer: str, x: torch.Tensor, **kw: object) -> UnitSemanticsResult:
    options: dict[str, object] = {
        "batch_size": 7,  # does not divide the 50 examples: top-k merged across batches
        "units": 2,
        "directions": 3,
        "k": 5,
        "seed": 0,
        "input_range": (0.0, 1.0),
    }
    options.update(kw)
    y = torch.arange(x.shape[0]) % 3
    return unit_semantics(net, net, layer, x, y, **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the computation
def test_units_and_directions_get_the_true_top_k_of_a_linear_layer() -> None:
    net = linear_net()
    x = torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    result = run(net, "1", x)
    w = net[1].weight.detach().double().numpy()
    b = net[1].bias.detach().double().numpy()
    acts = x.reshape(50, 16).double().numpy() @ w.T + b  # the layer by hand
    by_variance = np.lexsort((np.arange(6), -acts.var(0)))[:2]
    assert [u.index for u in result.units] == by_variance.tolist()
    for unit in result.units:
        examples, values = numpy_top_k(acts[:, unit.index], 5)
        assert unit.examples == examples
        np.testing.assert_allclose(unit.values, values, rtol=1e-6)
        assert unit.variance == pytest.approx(acts[:, unit.index].var(), rel=1e-6)
    vectors = np.asarray(result.direction_vectors)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-12)
    for direction, v in zip(result.directions, vectors, strict=True):
        examples, values = numpy_top_k(acts @ v, 5)
        assert direction.examples == examples
        np.testing.assert_allclose(direction.values, values, rtol=1e-6)
    assert (result.reduction, result.dimensions, result.activation_shape) == ("none", 6, [6])


def test_ties_go_to_the_lower_example_index_across_batches() -> None:
    # After the ReLU most activations of this layer are exactly 0: the top-k must still be the
    # same examples whatever the batch size.
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        net[0].bias.zero_()
    x = torch.tensor([[-1.0, 0.5]] * 6 + [[2.0, 0.5]] + [[-1.0, 0.5]] * 5)
    expected = [6, 0, 1, 2]  # the one positive value, then the zeros in example order
    for batch_size in (1, 5, 12):
        result = run(net, "1", x, batch_size=batch_size, units=1, k=4, input_range=(-1.0, 2.0))
        assert result.units[0].index == 0  # unit 1 is constant: variance 0
        assert result.units[0].examples == expected
        assert result.units[0].values == [2.0, 0.0, 0.0, 0.0]


def test_a_conv_output_is_averaged_over_positions() -> None:
    # A 1x1 convolution's output averaged over positions is W · (input averaged) + b.
    conv = nn.Conv2d(3, 4, kernel_size=1)
    net = nn.Sequential(conv)
    x = torch.rand(30, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    result = run(net, "0", x, units=4, directions=2, k=3)
    w = conv.weight.detach().double().numpy()[:, :, 0, 0]
    pooled = x.double().numpy().mean(axis=(2, 3)) @ w.T + conv.bias.detach().double().numpy()
    assert result.reduction == "spatial_mean"
    assert result.activation_shape == [4, 5, 5]
    for unit in result.units:
        assert unit.examples == numpy_top_k(pooled[:, unit.index], 3)[0]
    for direction, v in zip(result.directions, result.direction_vectors, strict=True):
        assert direction.examples == numpy_top_k(pooled @ np.asarray(v), 3)[0]


def test_directions_are_seeded_and_reproducible() -> None:
    net = linear_net()
    x = torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    first, again = run(net, "1", x, seed=3), run(net, "1", x, seed=3, batch_size=50)
    other = run(net, "1", x, seed=4)
    assert first.direction_vectors == again.direction_vectors
    assert [d.examples for d in first.directions] == [d.examples for d in again.directions]
    assert first.direction_vectors != other.direction_vectors
    assert first.seed == 3
    expected = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected /= expected.norm(dim=1, keepdim=True)
    assert first.direction_vectors == expected.tolist()
    assert random_directions(3, 6, 3).tolist() == expected.tolist()


def test_the_model_is_unchanged_and_keeps_its_mode() -> None:
    # In train mode, batch norm would update its running statistics and dropout would draw.
    net = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    net.train()
    x = torch.rand(40, 16, generator=torch.Generator().manual_seed(5))
    before = state_digest(net)
    result = run(net, "2", x)
    assert state_digest(net) == before
    assert all(m.training for m in net.modules())
    assert not any(m._forward_hooks for m in net.modules())
    net.eval()  # the top-k were computed in eval mode: dropout off, running statistics used
    acts = net[:3](x).detach().double().numpy()
    assert result.units[0].examples == numpy_top_k(acts[:, result.units[0].index], 5)[0]


def test_a_module_called_twice_is_refused() -> None:
    relu = nn.ReLU()
    net = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu)
    with pytest.raises(UnsupportedError, match=r"'1' is called 2 times per forward pass"):
        run(net, "1", torch.rand(10, 4))


# --------------------------------------------------------------------------- in an audit
@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> AuditSession:
    folder = tmp_path_factory.mktemp("units")
    path = write_spec(folder, analysis={"units": UNITS}, checks={"min_clean_accuracy": 0.5}, seed=7)
    return AuditSession(load_spec(path))


def test_an_unknown_layer_is_a_spec_error_naming_the_key_and_the_candidates(
    tmp_path: Path,
) -> None:
    path = write_spec(tmp_path, analysis={"units": {"layer": "fc3"}})
    line = next(
        i for i, text in enumerate(path.read_text().splitlines(), 1) if "layer: fc3" in text
    )
    session = AuditSession(load_spec(path))
    with pytest.raises(AuditError) as excinfo:
        session.prepared  # noqa: B018 - nothing runs before the layer is known
    assert excinfo.type is AuditError
    assert excinfo.value.key == "analysis.units.layer"
    assert str(excinfo.value) == (
        f"{path}:{line}: analysis.units.layer 'fc3' is not a module of the model. Did you "
        "mean 'fc2' or 'fc1'? Its modules are: conv1, conv2, pool, fc1, fc2, relu; give a "
        "name as model.named_modules() writes it."
    )


def test_the_audit_item_passes_and_records_the_result(session: AuditSession) -> None:
    planned = [p for p in plan_checks(session.spec) if p.check == UNITS_ONLY]
    assert [(p.id, is_check(p)) for p in planned] == [("unit_semantics", False)]
    assert session.evaluate(planned[0]).passed
    result = session.computed_units
    assert result is not None
    assert (result.layer, result.k, result.seed) == ("fc1", 5, 7)
    assert (len(result.units), len(result.directions)) == (3, 2)
    # Independently: fc1's output over the test set, through the model's own pieces.
    p = session.prepared
    net = p.loaded.inner
    with torch.no_grad():
        h = net.pool(net.relu(net.conv2(net.relu(net.conv1(p.loaded.module.normalize(p.data.x))))))
        acts = net.fc1(torch.flatten(h, 1)).double().numpy()
    for unit in result.units:
        assert unit.examples == numpy_top_k(acts[:, unit.index], 5)[0]
    assert state_digest(p.loaded.module) == p.digest
    shown = {i for row in [*result.units, *result.directions] for i in row.examples}
    assert result.labels == {str(i): int(p.data.y[i]) for i in sorted(shown)}
    for row in [*result.units, *result.directions]:
        classes = [int(p.data.y[i]) for i in row.examples]
        top = max(sorted(set(classes)), key=classes.count)  # the smaller class on a tie
        assert (row.majority_class, row.majority_share) == (top, classes.count(top) / 5)


def test_the_plugin_report_gets_the_units_from_the_items(session: AuditSession) -> None:
    from .plugin_items import assembled_from_items

    result = assembled_from_items(session, session_id="units", computed=False)
    assert result.models[0].units == session.computed_units
    assert [c.id for c in result.models[0].checks] == ["min_clean_accuracy"]


def test_results_json_keeps_the_units(session: AuditSession, tmp_path: Path) -> None:
    units = session.unit_semantics()
    assert units is not None
    model = ModelResult("m", "", 120, 1.0, [], [], None, None, [], units=units)
    path = write_results(AuditResult(meta={}, models=[model]), tmp_path / "results.json")
    data = json.loads(path.read_text())["models"][0]["units"]
    assert data["units"][0]["examples"] == units.units[0].examples
    assert data["directions"][1]["values"] == units.directions[1].values
    assert read_results(path).models[0].units == units
    plain = ModelResult("m", "", 120, 1.0, [], [], None, None, [])
    path = write_results(AuditResult(meta={}, models=[plain]), tmp_path / "plain.json")
    assert "units" not in json.loads(path.read_text())["models"][0]


# --------------------------------------------------------------------------- the report
def _report(units: UnitSemanticsResult) -> str:
    model = ModelResult("m", "", 10, 1.0, [], [], None, None, [], units=units)
    return report_html(AuditResult(meta={}, models=[model]))


def _pngs(html: str) -> list[np.ndarray]:
    found = re.findall(r'<img class="unit-img" src="data:image/png;base64,([^"]+)"', html)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in found]


def test_the_report_shows_a_grid_of_the_digits(session: AuditSession) -> None:
    units = session.unit_semantics()
    assert units is not None
    html = _report(units)
    images = _pngs(html)
    assert len(images) == (3 + 2) * 5  # one per example of each unit's and direction's row
    assert "individual units carry no special meaning" in html
    mean = {
        kind: sum(r.majority_share or 0.0 for r in rows) / len(rows)
        for kind, rows in (("units", units.units), ("directions", units.directions))
    }
    assert (
        f"on average: units {100 * mean['units']:.1f}%, "
        f"random directions {100 * mean['directions']:.1f}%." in html
    )
    assert 'id="units"' in html
    first = units.units[0].examples[0]
    x = session.prepared.data.x[first, 0].double().numpy()  # input units in [0, 1]
    np.testing.assert_array_equal(images[0], np.rint(x * 255).astype(np.uint8))
    assert f"#{first} · class {units.labels[str(first)]}" in html


def test_rgb_images_are_shown_in_the_input_range() -> None:
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    x = torch.rand(12, 3, 6, 6, generator=torch.Generator().manual_seed(6)) * 2 - 1
    result = run(net, "0", x, units=1, directions=1, k=2, input_range=(-1.0, 1.0))
    images = _pngs(_report(result))
    assert len(images) == 4
    assert images[0].shape == (6, 6, 3)
    expected = np.rint((x[result.units[0].examples[0]].permute(1, 2, 0).numpy() + 1) / 2 * 255)
    np.testing.assert_array_equal(images[0], expected.astype(np.uint8))


def test_inputs_that_are_not_images_show_indices_only() -> None:
    net = nn.Sequential(nn.Linear(10, 4))
    result = run(net, "0", torch.rand(20, 10), units=2, directions=2, k=3)
    html = _report(result)
    assert _pngs(html) == []
    assert "inputs of shape 10 are not images" in result.image_note
    assert html.count('<figure class="unit-ex"') == (2 + 2) * 3
