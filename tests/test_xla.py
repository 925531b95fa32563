"""``device: xla`` through torch_xla, compared with the CPU (``make test-xla``).

torch_xla pins its own torch release, so these tests run in their own environment
(``.venv-xla``, built by ``make test-xla``) on XLA's CPU backend (``PJRT_DEVICE=CPU``); where
torch_xla is not installed they are skipped with that reason. XLA compiles its own kernels,
so its float results may differ from eager CPU in the last bits: accuracies are compared
within one example of the test set, the inputs an attack draws exactly.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from inferlink_audit.attacks import FGSM, PGD, GaussianNoise
from inferlink_audit.spec import FGSMSpec, GaussianSpec, PGDSpec
from inferlink_audit.sweep import EvalData, Evaluator, frozen_parameters, sweep_scope

from .specs import write_spec
from .test_sweep import TinyCNN

os.environ.setdefault("PJRT_DEVICE", "CPU")
torch_xla = pytest.importorskip(
    "torch_xla", reason="torch_xla is not installed here (make test-xla builds .venv-xla with it)"
)

pytestmark = pytest.mark.xla


@pytest.fixture(scope="module")
def xla() -> torch.device:
    from inferlink_audit.devices import resolve_device

    return resolve_device("xla")


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 6, 6, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.rand(64, generator=gen) < 0.25
    return model, x, torch.where(flip, (y + 1) % 4, y)


def _sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    model = copy.deepcopy(model).to(device)
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    data = EvalData(x.to(device), y.to(device), 16)
    with frozen_parameters(model):
        evaluator = Evaluator(model, data, FGSM(FGSMSpec(eps=0.1), (0, 1), 0), "filtered")
        unfiltered = evaluator.evaluate()
        curves = sweep_scope(
            [model.conv.weight, model.fc.weight],
            "low_pass",
            thresholds=9,
            values="signed",
            evaluator=evaluator,
            unfiltered=unfiltered,
        )
    after = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored bit-exactly
    return unfiltered, curves


def test_sweep_on_xla_equals_the_cpu_sweep(tiny, xla):
    model, x, y = tiny
    one = 1 / len(y) + 1e-12
    cpu_unfiltered, cpu = _sweep(model, x, y, torch.device("cpu"))
    xla_unfiltered, on_xla = _sweep(model, x, y, xla)
    assert xla_unfiltered == pytest.approx(cpu_unfiltered, abs=one)
    assert on_xla.thresholds == pytest.approx(cpu.thresholds, rel=1e-6)
    assert on_xla.removed_fraction == cpu.removed_fraction
    assert on_xla.clean_accuracy == pytest.approx(cpu.clean_accuracy, abs=one)
    assert on_xla.adversarial_accuracy == pytest.approx(cpu.adversarial_accuracy, abs=one)
    assert on_xla.evaluated_variants == cpu.evaluated_variants


def test_a_variant_reads_the_device_once_not_once_per_batch(tiny, xla):
    import torch_xla.debug.metrics as met

    model, x, y = tiny
    model = copy.deepcopy(model).to(xla)
    data = EvalData(x.to(xla), y.to(xla), 8)  # 8 batches
    with frozen_parameters(model):
        evaluator = Evaluator(model, data, FGSM(FGSMSpec(eps=0.1), (0, 1), 0), "filtered")
        evaluator.evaluate()  # compiles
        met.clear_all()
        evaluator.evaluate()
    transfers = met.metric_data("TransferFromDeviceTime")
    count = 0 if transfers is None else transfers[0]
    assert 0 < count <= 3  # clean outcomes, adversarial outcomes, "unchanged": per variant


@pytest.mark.parametrize("attack", ["gaussian", "pgd"])
def test_attacks_on_xla_match_the_cpu(tiny, xla, attack):
    model, x, y = tiny
    if attack == "gaussian":
        # No torch.Generator on XLA: the noise is drawn on the CPU, so it is the CPU's (XLA
        # may fuse σ·noise + x into one rounding: equal within an ulp).
        made = GaussianNoise(GaussianSpec(sigma=0.2), (0, 1), 7)
        exact = True
    else:
        made = PGD(PGDSpec(eps=0.1, steps=3, random_start=True), (0, 1), 7)
        exact = False
    on_cpu = made(model, x, y, offset=5).adversarial
    on_xla = made(copy.deepcopy(model).to(xla), x.to(xla), y.to(xla), offset=5).adversarial
    if exact:
        assert torch.allclose(on_xla.cpu(), on_cpu, rtol=0, atol=1e-6)
    else:
        # A sign of a gradient that is 0 up to rounding may flip: compare where it matters.
        agree = torch.isclose(on_xla.cpu(), on_cpu, atol=1e-5).float().mean()
        assert agree > 0.99


def test_an_audit_on_xla_gives_the_cpu_audits_labels(tmp_path):
    from inferlink_audit.audit import run_audit
    from inferlink_audit.spec_loader import load_spec

    results = {}
    for device in ("cpu", "xla"):
        path = write_spec(tmp_path, f"{device}.yaml", device=device)
        results[device], _, _ = run_audit(load_spec(path))
    cpu, on_xla = results["cpu"].models[0], results["xla"].models[0]
    one = 1 / cpu.n_examples + 1e-12
    assert on_xla.clean_accuracy == pytest.approx(cpu.clean_accuracy, abs=one)
    assert len(on_xla.sweeps) == len(cpu.sweeps) > 0
    for a, b in zip(cpu.sweeps, on_xla.sweeps, strict=True):
        assert (a.scope, a.layer, a.filter, a.attack) == (b.scope, b.layer, b.filter, b.attack)
        assert b.clean_accuracy == pytest.approx(a.clean_accuracy, abs=one)
        assert b.adversarial_accuracy == pytest.approx(a.adversarial_accuracy, abs=one)
    assert "xla" in str(results["xla"].meta.get("device"))
