"""compare: several models in one result, label consistency and transferability."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from inferlink_audit.audit import run_audit
from inferlink_audit.errors import SpecError
from inferlink_audit.spec_loader import load_spec

from .specs import EXAMPLES, digits_spec, write_spec

SMALL = {"thresholds": 5, "filters": ["low_pass", "pulse"], "scopes": ["local"]}


def _noisy_checkpoint(path, scale: float) -> str:
    torch.manual_seed(1)
    state = {
        k: v + scale * torch.randn_like(v)
        for k, v in load_file(EXAMPLES / "digits_cnn.safetensors").items()
    }
    save_file(state, path)
    return str(path)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    model = dict(digits_spec()["model"])  # type: ignore[arg-type]
    model["checkpoint"] = _noisy_checkpoint(folder / "noisy.safetensors", 0.05)
    write_spec(folder, "other.yaml", name="digits-noisy", model=model, filtering=SMALL)
    spec = load_spec(write_spec(folder, filtering=SMALL, compare=["other.yaml"]))
    result, _, _ = run_audit(spec)
    return result


def test_every_model_gets_an_entry_with_its_own_sweeps(compared):
    assert [m.name for m in compared.models] == ["digits-small", "digits-noisy"]
    a, b = compared.models
    assert a.checkpoint_sha256 != b.checkpoint_sha256
    assert len(a.sweeps) == len(b.sweeps) == 8  # 4 layers × 2 filters


def test_consistency_counts_agreeing_labels(compared):
    consistency = compared.consistency
    rows = consistency["layers"]
    assert len(rows) == 4 * 2 * 1 * 2  # layers × filters × attacks × responses
    assert {tuple(sorted(r["labels"])) for r in rows} == {("digits-noisy", "digits-small")}
    expected = sum(len(set(r["labels"].values())) == 1 for r in rows) / len(rows)
    assert consistency["agreement"] == pytest.approx(expected)
    a, b = compared.models
    sweep_a = next(s for s in a.sweeps if s.layer == "fc1" and s.filter == "pulse")
    row = next(
        r
        for r in rows
        if r["layer"] == "fc1" and r["filter"] == "pulse" and r["response"] == "clean"
    )
    sweep_b = next(s for s in b.sweeps if s.layer == "fc1" and s.filter == "pulse")
    assert row["labels"] == {
        "digits-small": sweep_a.labels.clean,
        "digits-noisy": sweep_b.labels.clean,
    }


def test_transfer_matrix_on_the_same_examples(compared):
    transfer = compared.consistency["transfer"]
    assert {(t["source"], t["target"]) for t in transfer} == {
        ("digits-small", "digits-small"),
        ("digits-small", "digits-noisy"),
        ("digits-noisy", "digits-noisy"),
        ("digits-noisy", "digits-small"),
    }
    a = compared.models[0]
    white = next(t for t in transfer if t["source"] == t["target"] == "digits-small")
    assert white["white_box"] and white["accuracy"] == pytest.approx(a.attacks[0].accuracy)
    black = next(
        t for t in transfer if t["source"] == "digits-noisy" and t["target"] == "digits-small"
    )
    assert 0.0 <= black["accuracy"] <= 1.0 and not black["white_box"]


def test_different_architectures_have_no_agreement(tmp_path):
    mlp = tmp_path / "mlp.py"
    mlp.write_text(
        "import torch.nn as nn\n"
        "def Net():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
    )
    write_spec(tmp_path, "other.yaml", name="mlp", model={"factory": f"{mlp}:Net"}, filtering=SMALL)
    spec = load_spec(write_spec(tmp_path, filtering=SMALL, compare=["other.yaml"]))
    result, _, _ = run_audit(spec)
    assert result.consistency["agreement"] is None
    assert "nothing to compare" in result.consistency["note"]


def test_duplicate_names_are_refused(tmp_path):
    write_spec(tmp_path, "other.yaml", filtering=SMALL)
    spec = load_spec(write_spec(tmp_path, filtering=SMALL, compare=["other.yaml"]))
    with pytest.raises(SpecError, match="different names"):
        run_audit(spec)
