"""AutoAttack: the worst case per example over its components, the specs that name the new
attacks, and those attacks inside an audit (attack table and filtering sweep)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from inferlink_audit import autoattack
from inferlink_audit.attack_builder import build_attack
from inferlink_audit.audit import AuditSession
from inferlink_audit.autoattack import AutoAttack, components
from inferlink_audit.data import load_dataset
from inferlink_audit.errors import SpecError
from inferlink_audit.spec import APGDSpec, AutoAttackSpec, DataSourceSpec, SquareSpec
from inferlink_audit.spec_loader import load_spec

from .naive_reference import naive_sweep
from .specs import write_spec
from .test_apgd import digits_model, inputs, linear_model, predicted_correct


@pytest.fixture
def short_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The published budgets (100 steps, 5000 queries) cut down so the tests stay quick; the
    properties tested do not depend on them."""
    monkeypatch.setattr(autoattack, "STEPS", 20)
    monkeypatch.setattr(autoattack, "SQUARE_QUERIES", 300)


@pytest.fixture(scope="module")
def digits(repo_root: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    data = load_dataset(DataSourceSpec(source="sklearn_digits", split="test", limit=48))
    return digits_model(repo_root), data.x, data.y


@pytest.mark.parametrize("version", ["standard", "fast"])
def test_autoattack_robust_examples_are_those_every_component_leaves(
    digits, version, short_budgets
):
    model, x, y = digits
    spec = AutoAttackSpec(eps=0.1, version=version)
    ensemble = AutoAttack(spec, (0.0, 1.0), 0)
    adversarial, _, firsts = ensemble.worst_case(model, x, y, offset=0)
    robust = predicted_correct(model, adversarial, y)
    # Each component alone, on every example: an example is robust to the ensemble exactly
    # when it is robust to each of them (each runs per example, from the same seed).
    alone = [
        predicted_correct(model, attack(model, x, y).adversarial, y)
        for attack in components(spec, (0.0, 1.0), 0)
    ]
    for each in alone:
        assert robust.float().mean() <= each.float().mean()
    assert torch.equal(robust, torch.stack(alone).all(0))
    # Every example the ensemble breaks (and the model got right) is claimed by one component.
    clean = predicted_correct(model, x, y)
    assert torch.equal(torch.stack(firsts).sum(0), (clean & ~robust).long())
    assert (adversarial - x).abs().max() <= 0.1 + 1e-6
    assert 0 < robust.sum() < clean.sum()  # the ensemble broke some examples, not all


def test_autoattack_on_three_classes_replaces_targeted_apgd_by_untargeted_dlr(short_budgets):
    model, x = linear_model(3), inputs(20)
    y = torch.arange(20) % 3
    ensemble = AutoAttack(AutoAttackSpec(eps=0.1), (0.0, 1.0), 0)
    used = ensemble.usable(3)
    assert [type(a).__name__ for a in used] == ["APGD", "APGD", "Square"]
    assert not used[1].spec.targeted and used[1].spec.loss == "dlr"
    assert ensemble(model, x, y).adversarial.shape == x.shape


def test_spec_names_the_new_attacks_with_stable_ids(tmp_path: Path):
    path = write_spec(
        tmp_path,
        attacks=[
            {"apgd": {"eps": 0.03}},
            {"apgd": {"eps": 0.03, "loss": "dlr", "targeted": True, "norm": "l2"}},
            {"square": {"eps": 0.03, "queries": 500}},
            {"autoattack": {"eps": 0.03, "version": "fast"}},
        ],
    )
    spec = load_spec(path)
    assert [a.id for a in spec.attack_specs] == [
        "apgd_ce_linf_eps0.03_steps100",
        "apgd_dlr_l2_eps0.03_steps100_t9",
        "square_linf_eps0.03_q500",
        "autoattack_linf_eps0.03_fast",
    ]
    assert isinstance(build_attack(spec.attack_specs[2], (0.0, 1.0), 0).spec, SquareSpec)


def test_spec_rejects_an_unknown_apgd_key(tmp_path: Path):
    path = write_spec(tmp_path, attacks=[{"apgd": {"eps": 0.03, "step_size": 0.1}}])
    with pytest.raises(SpecError, match="step_size"):
        load_spec(path)


def test_apgd_runs_as_the_stress_of_a_filtering_sweep(tmp_path: Path):
    spec = {"eps": 0.1, "steps": 5}
    path = write_spec(
        tmp_path,
        attacks=[{"apgd": spec}],
        # pulse: each variant keeps most of the network, so APGD crafted against it differs
        # from APGD crafted against the unfiltered network
        filtering={"thresholds": 5, "filters": ["pulse"], "scopes": ["global"]},
    )
    session = AuditSession(load_spec(path))
    attack_id = APGDSpec(**spec).id
    result = session.attack_result(attack_id)
    assert result.kind == "apgd" and result.accuracy < session.clean_accuracy()
    (sweep,) = session.sweeps("pulse", attack_id)
    # APGD is crafted against every filtered network: the curves equal the naive reference's,
    # which deep-copies each variant, zeroes its weights and runs APGD on it.
    model = session.prepared.loaded.module
    x, y = session.prepared.data.x, session.prepared.data.y
    names = [f"model.{layer}.weight" for layer in ("conv1", "conv2", "fc1", "fc2")]
    apgd = build_attack(APGDSpec(**spec), (0.0, 1.0), session.spec.seed)
    clean, adversarial, _, _ = naive_sweep(
        model, names, "pulse", 5, x, y, 0.1, attack=lambda m, x, y: apgd(m, x, y).adversarial
    )
    assert sweep.clean_accuracy == pytest.approx(clean.tolist(), abs=1e-12)
    assert sweep.adversarial_accuracy == pytest.approx(adversarial.tolist(), abs=1e-12)
    assert sweep.adversarial_accuracy[0] < sweep.clean_accuracy[0]
