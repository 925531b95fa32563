"""compare: several models in one result, label consistency and transferability."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from example_audits.digits import DigitsCNN
from inferlink_audit.audit import run_audit
from inferlink_audit.data import load_dataset
from inferlink_audit.errors import SpecError
from inferlink_audit.results import AuditResult
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
def compare_dir(tmp_path_factory) -> Path:
    """The bundled digits CNN's spec, comparing it with a noisy copy of its checkpoint."""
    folder = tmp_path_factory.mktemp("compare")
    model = dict(digits_spec()["model"])  # type: ignore[arg-type]
    model["checkpoint"] = _noisy_checkpoint(folder / "noisy.safetensors", 0.05)
    write_spec(folder, "other.yaml", name="digits-noisy", model=model, filtering=SMALL)
    write_spec(folder, filtering=SMALL, compare=["other.yaml"])
    return folder


@pytest.fixture(scope="module")
def compared(compare_dir: Path) -> AuditResult:
    result, _, _ = run_audit(load_spec(compare_dir / "audit.yaml"))
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
    # Every row's labels, and the agreement, from the two models' own sweeps.
    a, b = compared.models
    by_hand = {}
    for sweep in a.sweeps:
        (other,) = [
            s
            for s in b.sweeps
            if (s.layer, s.filter, s.attack) == (sweep.layer, sweep.filter, sweep.attack)
        ]
        for response in ("clean", "adversarial"):
            by_hand[sweep.layer, sweep.filter, sweep.attack, response] = {
                "digits-small": getattr(sweep.labels, response),
                "digits-noisy": getattr(other.labels, response),
            }
    assert {(r["layer"], r["filter"], r["attack"], r["response"]): r["labels"] for r in rows} == (
        by_hand
    )
    agree = [len(set(labels.values())) == 1 for labels in by_hand.values()]
    assert consistency["agreement"] == pytest.approx(sum(agree) / len(agree), abs=1e-12)
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


def _by_hand(checkpoint: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The digits CNN behind the spec's (x − 0.5) / 0.5, built without the library."""
    net = DigitsCNN(num_classes=10)
    net.load_state_dict(load_file(checkpoint))
    net.eval()
    return lambda x: net((x - 0.5) / 0.5)


def _fgsm_by_hand(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float
) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def test_transfer_accuracy_is_the_targets_accuracy_on_the_sources_examples(compared, compare_dir):
    transfer = compared.consistency["transfer"]
    assert {(t["source"], t["target"]) for t in transfer} == {
        ("digits-small", "digits-small"),
        ("digits-small", "digits-noisy"),
        ("digits-noisy", "digits-noisy"),
        ("digits-noisy", "digits-small"),
    }
    data = load_dataset(load_spec(compare_dir / "audit.yaml").data)
    models = {
        "digits-small": _by_hand(EXAMPLES / "digits_cnn.safetensors"),
        "digits-noisy": _by_hand(compare_dir / "noisy.safetensors"),
    }
    expected = {}
    for source, crafting in models.items():
        x_adv = _fgsm_by_hand(crafting, data.x, data.y, eps=0.1)
        for target, measuring in models.items():
            with torch.no_grad():
                correct = int((measuring(x_adv).argmax(1) == data.y).sum())
            expected[source, target] = correct / len(data)
    measured = {(t["source"], t["target"]): t["accuracy"] for t in transfer}
    assert measured == pytest.approx(expected, abs=1e-12)
    # The crafted examples do transfer only in part: the numbers differ per pair.
    assert expected["digits-noisy", "digits-small"] != expected["digits-small", "digits-small"]
    white = {t["source"]: t for t in transfer if t["white_box"]}
    assert set(white) == {"digits-small", "digits-noisy"}
    assert all(t["source"] == t["target"] for t in white.values())
    assert white["digits-small"]["accuracy"] == pytest.approx(
        compared.models[0].attacks[0].accuracy
    )


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
