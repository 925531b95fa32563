"""The benchmark compares like with like: the notebook reference and the engine agree exactly.

``benchmarks/bench_sweep.py`` only means something if the re-implemented notebook algorithm
computes the very curves the engine computes; these tests check that on a tiny residual
network (every filter, local and global scopes, both adversarial sources), and that the
benchmark's ``--quick`` mode runs end to end. Nothing here is timed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from inferlink_audit.models import NormalizedModel

from .specs import write_spec

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_sweep  # noqa: E402
import notebook_reference as ref  # noqa: E402

SPEEDUP_LINE = re.compile(
    r"^speedup: \d+(\.\d+)?x exact, \d+(\.\d+)?x adversarial_source=original, "
    r"\d+(\.\d+)?x of the 3-pass limit$"
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and stay fast when xdist workers share the CPU
    (two-thread OpenMP regions stall badly on an oversubscribed machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TinyResidual(nn.Module):
    """Conv, a residual conv with BatchNorm, and a linear head: skip tensors cross the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.bn(self.conv2(h)) + h)
        return self.fc(h.flatten(1))


def _tiny_workload(filters: list[ref.FilterName]) -> bench_sweep.Workload:
    torch.manual_seed(0)
    net = TinyResidual()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    model = NormalizedModel(net, [0.5], [0.25]).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 6, 6, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    y = torch.where(torch.rand(40, generator=gen) < 0.3, (y + 1) % 5, y)
    layers = ["conv1", "conv2", "fc"]
    return bench_sweep.Workload(
        name="tiny",
        model=model,
        inner=net,
        preprocess=model.normalize,
        state_prefix="model.",
        x=x,
        y=y,
        layers=layers,
        global_layers=layers,
        filters=filters,
        thresholds=9,
        eps=0.1,
        batch_sizes=[16],
        repeats=1,
    )


@pytest.mark.parametrize("source", ["filtered", "original"])
@pytest.mark.parametrize("filter_name", ["low_pass", "high_pass", "pulse"])
def test_reference_and_engine_give_identical_curves(filter_name: str, source: str) -> None:
    workload = _tiny_workload([filter_name])  # type: ignore[list-item]
    reference = bench_sweep.run_reference(workload, source, batch_size=16)  # type: ignore[arg-type]
    engine = bench_sweep.run_engine(workload, source, batch_size=16)  # type: ignore[arg-type]

    bench_sweep.assert_agree(reference, engine, f"{filter_name} {source}")
    assert engine.prefix_hits == len(workload.layers)  # the fast path was the one compared
    assert reference.evaluated_variants == 1 + 4 * workload.thresholds  # no dedup on that side
    curves = reference.curves[("global", filter_name)]
    assert 0.0 < min(curves.clean_accuracy) < max(curves.clean_accuracy)  # the sweep bites
    assert reference.unfiltered[0] not in (0.0, 1.0)


def test_reference_keeps_the_notebooks_costs() -> None:
    """Full backward: the variant's weights get gradients, as ``loss.backward()`` gives them."""
    workload = _tiny_workload(["low_pass"])
    model = ref.prepare(workload.model)
    ref.fgsm_notebook(model, workload.x[:8], workload.y[:8], 0.1, 0.0, 1.0)
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.requires_grad for p in workload.model.parameters())  # caller's model untouched


def test_reference_masks_follow_design() -> None:
    """DESIGN §1.2 boundaries: low-pass θ ≥ α, high-pass θ ≤ α, pulse α − δ ≤ θ < α + δ."""
    values = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    assert ref.zero_mask(values, "low_pass", 0.5, 0.0).tolist() == [0, 0, 0, 1, 1]
    assert ref.zero_mask(values, "high_pass", -0.5, 0.0).tolist() == [1, 1, 0, 0, 0]
    assert ref.zero_mask(values, "pulse", 0.0, 0.5).tolist() == [0, 1, 1, 0, 0]
    assert ref.thresholds(values.numpy(), "low_pass", 3).tolist() == [1.0, 0.0, -1.0]


def test_quick_benchmark_runs_and_prints_the_speedup_line() -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_sweep.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    assert SPEEDUP_LINE.match(lines[-1]), lines[-1]
    assert completed.stdout.count("results agree") >= 4  # both workloads, both sources


def test_benchmark_runs_on_the_model_of_an_audit_spec(tmp_path: Path) -> None:
    """``--spec``: a model the benchmark was not written for, loaded as the audit loads it,
    with the spec's filters and magnitude values; both sides agree and the line is printed."""
    spec = write_spec(
        tmp_path,
        data={
            "source": "sklearn_digits",
            "limit": 48,
            "batch_size": 48,
            "normalize": {"mean": [0.5], "std": [0.5]},
        },
        filtering={"filters": ["high_pass", "pulse"], "thresholds": 4, "values": "magnitude"},
        attacks=[{"fgsm": {"eps": 0.2}}],
    )
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_sweep.py"), "--spec", str(spec), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = completed.stdout
    assert "digits-small: 48 examples of 1×8×8" in out and "magnitude values" in out
    assert out.count("results agree") == 2
    assert SPEEDUP_LINE.match(out.strip().splitlines()[-1])
