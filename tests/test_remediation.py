"""Selective retraining (DESIGN §1.7): frozen layers stay bit-identical, the rest learn."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from inferlink_audit.audit import AuditSession
from inferlink_audit.checks import plan_checks
from inferlink_audit.fileio import sha256_file
from inferlink_audit.remediation import safe_file_stem
from inferlink_audit.spec_loader import load_spec

from .specs import EXAMPLES, write_spec


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remediation")
    spec = load_spec(
        write_spec(
            folder,
            name="../../<b>digits</b>",
            data={
                "source": "sklearn_digits",
                "limit": 120,
                "batch_size": 60,
                "normalize": {"mean": [0.5], "std": [0.5]},
                "train": {"source": "sklearn_digits", "split": "train", "limit": 240},
            },
            filtering={"thresholds": 5, "filters": ["low_pass"], "scopes": ["local"]},
            remediation={
                "selective_retrain": {
                    "epochs": 2,
                    "adversarial_mix": 0.5,
                    "min_adversarial_gain": -1.0,
                    "response": "clean",
                }
            },
        )
    )
    return AuditSession(spec, output_dir=folder / "out"), folder


def test_fragile_layers_are_frozen_and_the_others_trained(session):
    audit, folder = session
    before = sha256_file(EXAMPLES / "digits_cnn.safetensors")
    result = audit.remediation()
    fragile = {
        s.layer for s in audit.sweeps("low_pass", "fgsm_eps0.1") if s.labels.clean == "fragile"
    }
    assert set(result["frozen_layers"]) == fragile
    assert set(result["frozen_layers"]) | set(result["trained_layers"]) == {
        "conv1",
        "conv2",
        "fc1",
        "fc2",
    }
    written = folder / "out" / result["checkpoint"]
    assert written.parent == folder / "out" / "remediated"  # a hostile name cannot escape
    retrained = load_file(written)
    original = load_file(EXAMPLES / "digits_cnn.safetensors")
    assert retrained.keys() == original.keys()
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        same = torch.equal(retrained[f"{layer}.weight"], original[f"{layer}.weight"])
        assert same == (layer in fragile), layer
    assert sha256_file(EXAMPLES / "digits_cnn.safetensors") == before
    for run in ("selective", "control"):
        scores = result[run]
        assert scores["clean_before"] == audit.clean_accuracy()
        assert 0.0 <= scores["adversarial_after"] <= 1.0
    # the audited model in memory is untouched
    inner = audit.prepared.loaded.inner.state_dict()
    assert all(torch.equal(inner[k].cpu(), v) for k, v in original.items())


def test_gain_check_is_planned_at_its_line_and_evaluated(session):
    audit, _ = session
    (planned,) = [p for p in plan_checks(audit.spec) if p.check == "min_adversarial_gain"]
    assert planned.line == audit.spec.line_of(
        "remediation", "selective_retrain", "min_adversarial_gain"
    )
    result = audit.evaluate(planned)
    remediation = audit.remediation()
    gain = (
        remediation["selective"]["adversarial_after"]
        - remediation["selective"]["adversarial_before"]
    )
    assert result.measured == pytest.approx(gain)
    assert result.passed and "control:" in result.detail


@pytest.mark.parametrize(
    "name,stem",
    [
        ("digits-cnn", "digits-cnn"),
        ("../../etc/passwd", "etc_passwd"),
        ("<script>", "script"),
        ("...", "model"),
    ],
)
def test_safe_file_stem(name, stem):
    assert safe_file_stem(name) == stem
