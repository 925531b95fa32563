"""``data.batch_size: auto`` and the promise behind it: the numbers do not depend on the size."""

from __future__ import annotations

import pytest

from inferlink_audit import batching
from inferlink_audit.attacks import EXAMPLE_CHUNK
from inferlink_audit.audit import AuditSession, run_audit
from inferlink_audit.errors import SpecError
from inferlink_audit.results import result_to_dict
from inferlink_audit.spec_loader import load_spec

from .specs import write_spec


def _spec(folder, batch_size, name="audit.yaml"):
    return load_spec(
        write_spec(
            folder,
            filename=name,
            data={
                "source": "sklearn_digits",
                "limit": 200,
                "batch_size": batch_size,
                "normalize": {"mean": [0.5], "std": [0.5]},
            },
            filtering={"filters": ["low_pass", "pulse"], "thresholds": 5},
            attacks=[
                {"fgsm": {"eps": 0.1}},
                {"gaussian": {"sigma": 0.2}},
                {"pgd": {"eps": 0.1, "steps": 2, "random_start": True}},
            ],
        )
    )


def _numbers(spec):
    result, _, _ = run_audit(spec)
    d = result_to_dict(result)
    for model in d["models"]:
        model.pop("spec_path")  # the only field that differs: each spec is its own file
    return d["models"], d["meta"]["batch_size"]


def test_results_are_identical_whatever_the_batch_size(tmp_path):
    """FGSM, Gaussian noise and PGD with a random start, every sweep of two filters: the
    same numbers in batches of 64, of 17 and with ``auto`` (all 200 digits in one batch)."""
    reference, size = _numbers(_spec(tmp_path, 64))
    assert size.startswith("64 (from the spec)")
    assert _numbers(_spec(tmp_path, 17, "b.yaml"))[0] == reference
    automatic, size = _numbers(_spec(tmp_path, "auto", "c.yaml"))
    assert size.startswith("200 (auto: 200 (")
    assert automatic == reference


def test_auto_fits_the_budget_in_whole_chunks(tmp_path, monkeypatch):
    session = AuditSession(_spec(tmp_path, 64))
    p = session.prepared
    per_example = batching.bytes_per_example(
        p.loaded.module, p.data.x[:4], p.data.y[:4], (0.0, 1.0)
    )
    assert per_example > 0
    # the digits CNN keeps conv activations of 32x8x8 floats and more per example
    assert per_example >= 32 * 8 * 8 * 4
    monkeypatch.setattr(batching, "memory_budget", lambda device: 150 * per_example)
    choice = batching.auto_batch_size(p.loaded.module, p.data.x, p.data.y, (0.0, 1.0))
    assert choice.batch_size == 2 * EXAMPLE_CHUNK  # 150 rounded down to whole chunks
    monkeypatch.setattr(batching, "memory_budget", lambda device: 10 * per_example)
    assert (
        batching.auto_batch_size(p.loaded.module, p.data.x, p.data.y, (0.0, 1.0)).batch_size == 10
    )
    monkeypatch.setattr(batching, "memory_budget", lambda device: 1)
    assert batching.auto_batch_size(p.loaded.module, p.data.x, p.data.y, (0.0, 1.0)).batch_size == 1


def test_a_batch_size_that_is_neither_a_number_nor_auto_is_a_located_error(tmp_path):
    with pytest.raises(SpecError) as info:
        _spec(tmp_path, "big")
    message = str(info.value)
    assert "audit.yaml:" in message and "batch_size" in message and "auto" in message
