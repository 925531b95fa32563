"""The audit session end to end on the bundled model: agreement, integrity, determinism."""

from __future__ import annotations

import hashlib

import pytest
import torch

from inferlink_audit.audit import AuditSession, run_audit
from inferlink_audit.results import result_to_dict
from inferlink_audit.spec_loader import load_spec

from .naive_reference import naive_scores, naive_sweep
from .specs import RUN_DEPENDENT_META, write_spec


def _state_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(value.cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit")
    return load_spec(
        write_spec(
            folder,
            data={
                "source": "sklearn_digits",
                "limit": 64,
                "batch_size": 32,
                "normalize": {"mean": [0.5], "std": [0.5]},
            },
        )
    )


@pytest.mark.parametrize("filter_name", ["low_pass", "high_pass", "pulse"])
def test_session_sweeps_equal_the_naive_reference(spec, filter_name):
    session = AuditSession(spec)
    sweeps = session.sweeps(filter_name, "fgsm_eps0.1")
    model = session.prepared.loaded.module
    x, y = session.prepared.data.x, session.prepared.data.y
    assert [s.layer for s in sweeps] == ["conv1", "conv2", "fc1", "fc2", None]
    clean0 = session.clean_accuracy()
    adv0 = session.attack_result("fgsm_eps0.1").accuracy
    for sweep in sweeps:
        names = (
            [f"model.{sweep.layer}.weight"]
            if sweep.layer
            else [f"model.{name}.weight" for name in ("conv1", "conv2", "fc1", "fc2")]
        )
        clean, adv, removed, thresholds = naive_sweep(model, names, filter_name, 5, x, y, 0.1)
        assert sweep.clean_accuracy == pytest.approx(clean.tolist(), abs=1e-12)
        assert sweep.adversarial_accuracy == pytest.approx(adv.tolist(), abs=1e-12)
        assert sweep.removed_fraction == pytest.approx(removed.tolist(), abs=1e-12)
        assert sweep.thresholds == pytest.approx(thresholds.tolist(), rel=1e-12)
        naive = naive_scores(clean, adv, removed, clean0, adv0, 0.05)
        assert sweep.scores.clean == pytest.approx(naive["clean"][0], abs=1e-9)
        assert sweep.scores.adversarial == pytest.approx(naive["adversarial"][0], abs=1e-9)
        assert (sweep.labels.clean, sweep.labels.adversarial) == (
            naive["clean"][1],
            naive["adversarial"][1],
        )


def test_model_is_bit_identical_after_a_full_audit(spec):
    session = AuditSession(spec)
    before = _state_digest(session.prepared.loaded.module)
    for f in spec.filtering.filters:
        session.sweeps(f, "fgsm_eps0.1")
    assert _state_digest(session.prepared.loaded.module) == before
    assert all(p.requires_grad for p in session.prepared.loaded.module.parameters())


def test_two_runs_give_identical_numbers(spec):
    first, _, _ = run_audit(spec)
    second, _, _ = run_audit(spec)
    a, b = result_to_dict(first), result_to_dict(second)
    for d in (a, b):
        d["meta"] = {k: v for k, v in d["meta"].items() if k not in RUN_DEPENDENT_META}
    assert a == b


def test_a_model_that_changes_itself_voids_the_results(tmp_path):
    """The digest taken at load is checked after every piece of work: state drift is an error.
    (A model that drifts from its first pass is refused on the first batch already:
    tests/test_unusual_models.py; this one starts after the checks' few passes.)"""
    from inferlink_audit.errors import IntegrityError

    (tmp_path / "drift.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Drift(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(64, 10)\n"
        "        self.passes = 0\n"
        "        self.register_buffer('calls', torch.zeros(()))\n"
        "    def forward(self, x):\n"
        "        self.passes += 1\n"
        "        if self.passes > 4:\n"
        "            self.calls += 1  # a forward pass that edits the model's own state\n"
        "        return self.fc(x.flatten(1))\n"
    )
    spec = load_spec(
        write_spec(
            tmp_path,
            model={"factory": "drift.py:Drift"},
            filtering={"thresholds": 3, "filters": ["pulse"], "scopes": ["global"]},
        )
    )
    session = AuditSession(spec)
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        session.attack_result("fgsm_eps0.1")
