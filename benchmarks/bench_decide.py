"""How much faster an audit reaches the same decisions: exact fp32, bf16 with fp32 confirmation,
and sequential rounds with bf16 and confirmation, on one realistic audit in one process.

The workload is made here (nothing is downloaded): scikit-learn's digits upsampled to 32x32
RGB, a CIFAR-shaped ResNet-18 (3x3 stem, no max-pool) trained for a few epochs on the digits
not in the test set, and an audit of several layers across its depth plus the global scope,
two filters, 13 thresholds and 1,024 test examples under FGSM, with checks on fragility,
targeted layers and accuracy. Each mode runs the whole audit (``run_audit``, no sweep cache)
and the benchmark prints its seconds and peak resident memory, its speedup over exact fp32, every
decision (check verdict, layer label, targeted flag) that differs from exact fp32, and a last
line ``decide: <x>x bf16+confirm, <y>x sequential+bf16, <n> decisions differ`` where ``n``
counts the differing decisions of bf16+confirm and the differing *certain* decisions of the
sequential run (a sweep it left undecided when the data ran out is listed, not counted).

Full size (exact fp32 should take about 15 minutes on 2 cores: at 1/16 of the examples on one
thread the same audit with conv1 added took 134 s of sweeps; run it on an otherwise idle machine):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_decide.py

``--quick`` is a smoke test of seconds (a narrow ResNet, 64 examples, 5 thresholds).
``--examples``/``--thresholds`` shrink the full size; with ``--prefix-cache-mb`` scaled by the
same factor as the examples (512 at 256 examples), the same local sweeps keep their prefix
cache as at full size, which is what the peak memory mostly depends on: each mode prints how
many local sweeps held one, per precision.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from inferlink_audit.audit import AuditSession, run_audit
from inferlink_audit.devices import bf16_unsupported_reason
from inferlink_audit.prefix import release_freed_memory
from inferlink_audit.results import AuditResult
from inferlink_audit.spec_loader import load_spec

# The model, written next to the specs so that ``model.factory: models.py:CifarResNet18``
# loads it: torchvision's ResNet-18 layout (same module names) with a width parameter, so
# that --quick can run a narrow one.
MODELS_PY = '''
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        skip = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + skip)


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), torchvision's module names."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        widths = [width, 2 * width, 4 * width, 8 * width]
        cin = width
        for i, cout in enumerate(widths, 1):
            stride = 1 if i == 1 else 2
            blocks = nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1))
            setattr(self, f"layer{i}", blocks)
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
'''

LAYERS = ["layer2.0.conv1", "layer3.1.conv2", "layer4.1.conv2"]
MODES = ("exact fp32", "bf16+confirm", "sequential+bf16+confirm")


@dataclass(frozen=True)
class Size:
    width: int
    examples: int
    thresholds: int
    epochs: int
    round: int
    batch_size: int


FULL = Size(width=64, examples=1024, thresholds=13, epochs=4, round=256, batch_size=128)
QUICK = Size(width=8, examples=64, thresholds=5, epochs=3, round=32, batch_size=64)


def digits_32(examples: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Digits as 3x32x32 images in [0, 1]: (x_train, y_train, x_test, y_test), the test set
    the first ``examples`` of a seeded permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:examples], order[examples:]
    return x[train], y[train], x[test].contiguous(), y[test].contiguous()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    """A few epochs of Adam, so that accuracies and labels mean something."""
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(y)).split(64):
            optimiser.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimiser.step()
    model.eval()


EPS_CANDIDATES = (0.002, 0.004, 0.008, 0.016, 0.03)


def pick_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The smallest FGSM ε that brings the unfiltered accuracy to at most 60 %: a model this
    little trained is not robust, and at a larger ε the adversarial accuracy is near zero,
    where every normalised adversarial curve is noise (ψa⁰ ≈ 0)."""
    for p in model.parameters():
        p.requires_grad_(False)
    signs = []
    for xb, yb in zip(x.split(128), y.split(128), strict=True):
        leaf = xb.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(leaf), yb, reduction="sum"), leaf)
        signs.append(grad.sign())
    sign = torch.cat(signs)
    for eps in EPS_CANDIDATES:
        with torch.inference_mode():
            adversarial = (x + eps * sign).clamp(0, 1)
            correct = sum(
                int((model(xb).argmax(1) == yb).sum())
                for xb, yb in zip(adversarial.split(128), y.split(128), strict=True)
            )
        accuracy = correct / len(y)
        if accuracy <= 0.6:
            break
    print(f"FGSM eps {eps}: unfiltered adversarial accuracy {accuracy:.3f}")
    return eps


def write_workload(
    folder: Path, size: Size, seed: int = 0, prefix_cache_mb: int | None = None
) -> dict[str, Path]:
    """The model file, its trained checkpoint, the test tensors and one spec per mode
    (``prefix_cache_mb``: filtering.prefix_cache_mb, default the spec's)."""
    (folder / "models.py").write_text(MODELS_PY)
    namespace: dict[str, Any] = {}
    exec(compile(MODELS_PY, str(folder / "models.py"), "exec"), namespace)
    torch.manual_seed(seed)
    model = namespace["CifarResNet18"](width=size.width)
    x_train, y_train, x_test, y_test = digits_32(size.examples, seed)
    t0 = time.perf_counter()
    train(model, x_train, y_train, size.epochs, seed)
    with torch.inference_mode():
        correct = sum(
            int((model(xb).argmax(1) == yb).sum())
            for xb, yb in zip(x_test.split(128), y_test.split(128), strict=True)
        )
    accuracy = correct / len(y_test)
    print(
        f"trained CifarResNet18(width={size.width}) on {len(y_train)} digits, {size.epochs} "
        f"epochs, {time.perf_counter() - t0:.0f} s: test accuracy {accuracy:.3f} "
        f"on {len(y_test)}"
    )
    eps = pick_eps(model, x_test, y_test)
    torch.save(model.state_dict(), folder / "model.pt")
    torch.save({"x": x_test, "y": y_test}, folder / "test.pt")
    base: dict[str, Any] = {
        "version": 1,
        "name": "resnet18-digits32",
        "model": {
            "factory": "models.py:CifarResNet18",
            "kwargs": {"width": size.width},
            "checkpoint": "model.pt",
        },
        "data": {"source": "tensors", "path": "test.pt", "batch_size": size.batch_size},
        "device": "cpu",
        "seed": seed,
        "filtering": {
            "scopes": ["local", "global"],
            "filters": ["low_pass", "high_pass"],
            "thresholds": size.thresholds,
            "layers": {"include": LAYERS},
        }
        | ({} if prefix_cache_mb is None else {"prefix_cache_mb": prefix_cache_mb}),
        "attacks": [{"fgsm": {"eps": eps}}],
        "checks": {
            "min_clean_accuracy": 0.8,
            "max_fragile_fraction": {"value": 0.4, "on": "adversarial"},
            "max_targeted_layers": 2,
        },
    }
    extra: dict[str, dict[str, Any]] = {
        "exact fp32": {},
        "bf16+confirm": {"compute": {"precision": "bf16"}},
        "sequential+bf16+confirm": {
            "compute": {"precision": "bf16"},
            "statistics": {"sequential": {"round": size.round}},
        },
    }
    paths = {}
    for mode in MODES:
        path = folder / f"{mode.replace('+', '_').replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(base | extra[mode], sort_keys=False))
        paths[mode] = path
    return paths


class PeakRss:
    """Peak resident memory of this process while the block runs (sampled every 20 ms), so
    that modes run one after another in one process each get their own peak."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    @contextmanager
    def watch(self) -> Iterator[PeakRss]:
        self.peak = self._rss()
        self._stop.clear()

        def sample() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, self._rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, self._rss())


@dataclass
class ModeRun:
    mode: str
    seconds: float
    sweep_seconds: float
    peak_mib: float
    result: AuditResult
    prefix_reuse: dict[str, int]  # per precision, local sweeps that reused a cached prefix


def prefix_reuse(session: AuditSession) -> dict[str, int]:
    """Per precision, the local sweeps whose prefix cache fitted filtering.prefix_cache_mb (the
    peak memory depends on it: a bf16 cache is half an fp32 one, so more of them fit)."""
    # The session's evaluators: the whole test set's and, under sequential, each round's.
    tables = [session._evaluators, *(e for e, _ in session._round_states.values())]
    hits: dict[str, int] = {}
    for table in tables:
        for evaluator, _ in table.values():
            hits[evaluator.precision] = hits.get(evaluator.precision, 0) + evaluator.prefix_hits
    return hits


def run_mode(mode: str, spec: Path) -> ModeRun:
    # Each mode's peak starts from the memory in use, not from pages the C library kept
    # resident after the previous mode freed them.
    gc.collect()
    release_freed_memory()
    memory = PeakRss()
    with memory.watch():
        t0 = time.perf_counter()
        result, _, session = run_audit(load_spec(spec))
        seconds = time.perf_counter() - t0
    timings = result.meta["timings"]
    sweeps = sum(v for k, v in timings.items() if k.startswith("sweep "))
    reuse = prefix_reuse(session)
    return ModeRun(mode, seconds, sweeps, memory.peak / (1 << 20), result, reuse)


def decisions(result: AuditResult) -> dict[str, tuple[Any, bool]]:
    """Every decision of the audit, with whether it is certain: each check's verdict (certain
    unless its interval says otherwise), each sweep's two labels and targeted flag (certain
    unless a sequential run left the sweep undecided)."""
    model = result.models[0]
    out: dict[str, tuple[Any, bool]] = {}
    for check in model.checks:
        out[f"check {check.id}"] = (check.passed, check.certain is not False)
    for s in model.sweeps:
        where = f"{s.filter} {s.attack} {s.layer or 'global'}"
        certain = s.sequential is None or s.sequential.decided
        out[f"label {where} clean"] = (s.labels.clean, certain)
        out[f"label {where} adversarial"] = (s.labels.adversarial, certain)
        out[f"targeted {where}"] = (s.targeted, certain)
    return out


def differences(exact: AuditResult, other: AuditResult) -> list[tuple[str, Any, Any, bool]]:
    """(decision, exact's, other's, certain in other) for each decision that differs."""
    before, after = decisions(exact), decisions(other)
    return [
        (key, before[key][0], value, certain)
        for key, (value, certain) in after.items()
        if key in before and before[key][0] != value
    ]


def report(runs: list[ModeRun]) -> int:
    exact = runs[0]
    print(f"\n{'mode':26s} {'seconds':>9s} {'sweeps s':>9s} {'peak MiB':>9s} {'speedup':>8s}")
    for run in runs:
        print(
            f"{run.mode:26s} {run.seconds:9.1f} {run.sweep_seconds:9.1f} {run.peak_mib:9.0f} "
            f"{exact.seconds / run.seconds:7.2f}x"
        )
    for run in runs:
        reuse = ", ".join(f"{n} in {p}" for p, n in sorted(run.prefix_reuse.items()))
        print(f"{run.mode}: local sweeps with a cached prefix: {reuse}")
    counted = 0
    for run in runs[1:]:
        compute = run.result.models[0].compute or {}
        calibration = compute.get("calibration") or {}
        print(
            f"\n{run.mode}: bf16 vs fp32 max |Δaccuracy| "
            f"{calibration.get('max_abs_accuracy_difference', float('nan')):.4f} over "
            f"{calibration.get('variants', 0)} variants, margin "
            f"{calibration.get('accuracy_margin', float('nan')):.4f}; "
            f"{compute.get('confirmed', 0)} of {len(compute.get('sweeps', []))} bf16 sweep "
            "evaluations confirmed in fp32; at their every threshold bf16 was within "
            f"{compute.get('confirmed_max_abs_accuracy_difference') or 0.0:.4f} of fp32"
        )
        sequential = [s.sequential for s in run.result.models[0].sweeps if s.sequential]
        if sequential:
            used = [s.examples for s in sequential]
            undecided = sum(not s.decided for s in sequential)
            print(
                f"  sequential: examples per sweep {min(used)}-{max(used)} of "
                f"{run.result.models[0].n_examples}; {undecided} sweeps undecided"
            )
        diff = differences(exact.result, run.result)
        for key, before, after, certain in diff:
            note = "" if certain else "  (uncertain: not counted)"
            print(f"  differs: {key}: exact {before}, {run.mode} {after}{note}")
        counted += sum(1 for *_, certain in diff if certain)
        if not diff:
            print("  every decision equals exact fp32's")
    return counted


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test of seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--examples", type=int, help="test examples (default 1024)")
    parser.add_argument("--thresholds", type=int, help="thresholds per sweep (default 13)")
    parser.add_argument("--workdir", type=Path, help="keep the workload here (default: temp)")
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        help="filtering.prefix_cache_mb (default 2048; scale it with --examples to keep the "
        "full size's choice of cached prefixes)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    reason = bf16_unsupported_reason(torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"bench_decide needs native bf16 on this CPU: {reason}")
    size = QUICK if args.quick else FULL
    if args.examples or args.thresholds:
        size = Size(
            size.width,
            args.examples or size.examples,
            args.thresholds or size.thresholds,
            size.epochs,
            size.round,
            size.batch_size,
        )
    print(
        f"bench_decide: {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{size.examples} examples, {size.thresholds} thresholds, layers {', '.join(LAYERS)} "
        "+ global, filters low_pass and high_pass, FGSM"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        specs = write_workload(folder, size, prefix_cache_mb=args.prefix_cache_mb)
        runs = []
        for mode in MODES:
            runs.append(run_mode(mode, specs[mode]))
            print(f"{mode}: {runs[-1].seconds:.1f} s", flush=True)
    differ = report(runs)
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    exact = runs[0].seconds
    print(
        f"decide: {exact / runs[1].seconds:.2f}x bf16+confirm, "
        f"{exact / runs[2].seconds:.2f}x sequential+bf16, {differ} decisions differ"
    )


if __name__ == "__main__":
    main()
