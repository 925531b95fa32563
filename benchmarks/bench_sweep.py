"""Speed of the sweep engine against the reference notebooks' algorithm, in one process.

    python benchmarks/bench_sweep.py            # the full run (about 8 minutes on 2 idle cores)
    python benchmarks/bench_sweep.py --quick    # a tiny run (seconds), used by a test
    python benchmarks/bench_sweep.py --help     # subset, threads, repeats, --engine-only

For each workload (the bundled digits CNN, and a CIFAR-shaped ResNet-18 with random but
seeded weights) it runs the notebook algorithm (``notebook_reference.py``) and the engine
(``inferlink_audit.sweep``) on the same model, data, scopes, filters and thresholds, asserts
that every curve is identical, and prints the times. It does so twice: with FGSM crafted
against every filtered network (``filtered``, the notebooks' setting, "exact") and with the
examples crafted once on the unfiltered network (``original``, the transfer setting; the
reference gets the same mode, so both sides are checked against each other there too).

The *3-pass limit* is what any exact engine must at least spend: for every distinct variant
(the unfiltered network included) one forward pass, one input-only backward pass and one
adversarial forward pass over the whole set, timed min-of-N at the fastest batch size. Both
sides run at that batch size; every time is the minimum over ``--repeats`` runs, since other
processes may share the CPU (the load average is printed for that reason).

The last line reads ``speedup: <x>x exact, <y>x adversarial_source=original, <z>x of the
3-pass limit`` for the ResNet-18 workload, where x and y are the notebook algorithm's time
(it always crafts per variant) over the engine's time in each mode, and z is the engine's
exact time over the limit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import notebook_reference as ref  # noqa: E402

from inferlink_audit.attacks import FGSM  # noqa: E402
from inferlink_audit.devices import peak_memory_mb  # noqa: E402
from inferlink_audit.prefix import NetworkSplitter  # noqa: E402
from inferlink_audit.spec import FGSMSpec  # noqa: E402
from inferlink_audit.sweep import (  # noqa: E402
    Curves,
    EvalData,
    Evaluator,
    frozen_parameters,
    sweep_scope,
)

Source = Literal["filtered", "original"]
PREFIX_BUDGET = 2 << 30  # the spec's default prefix_cache_mb (2048); --prefix-cache-mb


@dataclass
class Workload:
    """One model, its data and the subset of the audit that is timed."""

    name: str
    model: nn.Module  # what the attack and the reference run (the normalising wrapper)
    inner: nn.Module  # what the splitter traces; layer names are relative to it
    preprocess: Callable[[torch.Tensor], torch.Tensor]
    state_prefix: str  # inner's keys in model.state_dict() start with this
    x: torch.Tensor
    y: torch.Tensor
    layers: list[str]  # local scopes
    global_layers: list[str]  # the global scope: every Conv/Linear of the network
    filters: list[ref.FilterName]
    thresholds: int
    eps: float
    batch_sizes: list[int]  # candidates for the 3-pass limit; the fastest is used throughout
    repeats: int
    pass_seconds: float = 1.0  # time each pass measurement at least this long (min of many)
    values: ref.Values = "signed"
    input_range: tuple[float, float] = (0.0, 1.0)

    def describe(self) -> str:
        shape = "×".join(str(d) for d in self.x.shape[1:])
        local = f"local layers {', '.join(self.layers)}" if self.layers else "no local scope"
        global_ = (
            f"global ({len(self.global_layers)} layers, "
            f"{sum(self.weight(n).numel() for n in self.global_layers):,} weights)"
            if self.global_layers
            else "no global scope"
        )
        return (
            f"{self.name}: {self.x.shape[0]} examples of {shape}, {local} + {global_}; filters "
            f"{', '.join(self.filters)}; {self.thresholds} thresholds, {self.values} values; "
            f"FGSM eps={self.eps:g}"
        )

    def weight(self, layer: str) -> torch.Tensor:
        return dict(self.inner.named_modules())[layer].weight

    def weight_names(self) -> dict[str, str]:
        """State-dict keys of every filtered weight, the global scope's first (in its order)."""
        names = dict.fromkeys(self.global_layers + self.layers)
        return {n: f"{self.state_prefix}{n}.weight" for n in names}


# --------------------------------------------------------------------------- workloads
def _conv_and_linear(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def digits_workload(quick: bool, repeats: int) -> Workload:
    """The bundled, trained digits CNN on the fixed 360-image test split."""
    from safetensors.torch import load_file

    from example_audits.digits import CHECKPOINT, DigitsCNN
    from inferlink_audit.data import load_dataset
    from inferlink_audit.models import NormalizedModel
    from inferlink_audit.spec import DataSourceSpec

    net = DigitsCNN(num_classes=10)
    net.load_state_dict(load_file(str(CHECKPOINT)))
    model = NormalizedModel(net, [0.5], [0.5]).eval()
    data = load_dataset(DataSourceSpec(source="sklearn_digits", split="test"))
    x, y = data.x, data.y
    layers = _conv_and_linear(net)
    filters: list[ref.FilterName] = ["low_pass", "high_pass", "pulse"]
    if quick:
        x, y, layers, filters = x[:64], y[:64], layers[::3], ["pulse"]
    return Workload(
        name="digits CNN",
        model=model,
        inner=net,
        preprocess=model.normalize,
        state_prefix="model.",
        x=x.contiguous(),
        y=y.contiguous(),
        layers=layers,
        global_layers=_conv_and_linear(net),
        filters=filters,
        thresholds=5 if quick else 25,
        eps=0.1,
        batch_sizes=[64] if quick else [90, 180, 360],
        repeats=repeats,
        pass_seconds=0.2 if quick else 1.0,
    )


def cifar_resnet18(seed: int = 0) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32×32 inputs, random but seeded weights, eval mode."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval()


class _Block(nn.Module):
    """A basic residual block (two 3×3 convs with BatchNorm; a 1×1 projection when it
    downsamples): its input is a skip tensor that a prefix cache must keep."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style residual CNN with 16/32/64 channels, two blocks per stage (175k weights,
    a 0.7 MB checkpoint): small weights, large activations, the case where a prefix cache
    costs the most memory for what it saves."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(_Block(16, 16, 1), _Block(16, 16, 1))
        self.layer2 = nn.Sequential(_Block(16, 32, 2), _Block(32, 32, 1))
        self.layer3 = nn.Sequential(_Block(32, 64, 2), _Block(64, 64, 1))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def small_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallResNet().eval()


SMALL_RESNET_LAYERS = ["conv1", "layer1.1.conv2", "layer2.1.conv1", "layer3.1.conv2"]


def resnet_workload(args: argparse.Namespace) -> Workload:
    """Seeded inputs in [0, 1]; labels are the model's predictions with a seeded share changed,
    so that neither the clean nor the adversarial accuracy sits at 0 or 1.

    ``--quick`` restricts the global scope to the local layers: sorting all 11M weights once
    per global sweep would dominate a run meant to take seconds.
    """
    small = args.model == "resnet-small"
    model = small_resnet(seed=0) if small else cifar_resnet18(seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(args.images, 3, 32, 32, generator=gen)
    with torch.inference_mode():
        y = model(x).argmax(1)
    changed = torch.rand(args.images, generator=gen) < 0.3
    shift = torch.randint(1, 10, (args.images,), generator=gen)
    y = torch.where(changed, (y + shift) % 10, y)
    return Workload(
        name="ResNet 16/32/64 (small)" if small else "ResNet-18 (CIFAR-shaped)",
        model=model,
        inner=model,
        preprocess=lambda t: t,
        state_prefix="",
        x=x,
        y=y.clone(),
        layers=args.layers,
        global_layers=list(args.layers) if args.quick else _conv_and_linear(model),
        filters=args.filters,
        thresholds=args.thresholds,
        eps=8 / 255,
        batch_sizes=args.batch_sizes,
        repeats=args.repeats,
        pass_seconds=0.2 if args.quick else 1.0,
    )


def spec_workload(path: Path, repeats: int) -> Workload:
    """The model, data, scopes, layers, filters, thresholds and values of an audit spec, so the
    benchmark runs on any model an audit can load (its first FGSM attack; ε = 8/255 without
    one). It refuses what the reference does not implement instead of timing something else."""
    from inferlink_audit.audit import AuditSession
    from inferlink_audit.spec_loader import load_spec

    spec = load_spec(path)
    filtering = spec.filtering
    if filtering.layers.parameters != ["weight"] or filtering.range is not None:
        raise SystemExit(
            f"{path}: the reference filters each layer's .weight over its own value range; "
            "remove filtering.layers.parameters and filtering.range to benchmark this spec."
        )
    prepared = AuditSession(spec, device="cpu").prepared
    loaded = prepared.loaded
    names = [layer.name for layer in prepared.layers]
    eps = next((a.eps for a in spec.attack_specs if isinstance(a, FGSMSpec)), 8 / 255)
    n = prepared.data.n
    batch_sizes = sorted({min(spec.data.batch_size, n), *(b for b in (64, 128, 256) if b < n)})
    return Workload(
        name=spec.name,
        model=loaded.module,
        inner=loaded.inner,
        preprocess=loaded.module.normalize,
        state_prefix="model.",
        x=prepared.data.x.contiguous(),
        y=prepared.data.y.contiguous(),
        layers=names if "local" in filtering.scopes else [],
        global_layers=names if "global" in filtering.scopes else [],
        filters=list(filtering.filters),
        thresholds=filtering.thresholds,
        eps=eps,
        batch_sizes=batch_sizes,
        repeats=repeats,
        values=filtering.values,
        input_range=spec.data.input_range,
    )


# --------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class Timing:
    """Wall and process CPU seconds of the fastest (by wall time) of several runs.

    CPU time counts every thread of this process, so with 2 threads it includes OpenMP's
    spin-waiting; with ``--threads 1`` it is nearly immune to other processes on the machine.
    """

    wall: float
    cpu: float

    def __str__(self) -> str:
        return f"{self.wall:8.2f} s (cpu {self.cpu:.2f} s)"


def best_of(repeats: int, fn: Callable[[], Any], min_total: float = 0.0) -> tuple[Timing, Any]:
    """The fastest of ``repeats`` runs (more, up to 50, until ``min_total`` seconds are spent):
    other processes may share the CPU, and they can only slow a run down."""
    best, result = Timing(float("inf"), float("inf")), None
    count, total = 0, 0.0
    while count < max(1, repeats) or (total < min_total and count < 50):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        count, total = count + 1, total + wall
        if wall < best.wall:
            best, result = Timing(wall, cpu), out
    return best, result


@dataclass
class PassTimes:
    """Min-of-N seconds of whole-set passes at one batch size, parameters frozen."""

    batch_size: int
    forward: Timing  # one inference-mode forward pass
    three_pass: Timing  # forward + input-only backward + adversarial forward
    notebook_passes: Timing  # clean forward + forward + full backward + adversarial forward


def time_passes(w: Workload, batch_size: int, repeats: int) -> PassTimes:
    """Whole-set passes at one batch size, each the fastest of several runs."""
    model, eps = w.model, w.eps
    lo, hi = w.input_range

    def forward() -> None:
        with torch.inference_mode():
            for start in range(0, len(w.y), batch_size):
                model(w.x[start : start + batch_size])

    def three_pass() -> None:
        for start in range(0, len(w.y), batch_size):
            xb = w.x[start : start + batch_size].clone().requires_grad_(True)
            loss = F.cross_entropy(model(xb), w.y[start : start + batch_size], reduction="sum")
            (grad,) = torch.autograd.grad(loss, xb)
            with torch.inference_mode():
                model((xb.detach() + eps * grad.sign()).clamp_(lo, hi))

    notebook_model = ref.prepare(model)  # a copy whose parameters require gradients

    def notebook_passes() -> None:
        for start in range(0, len(w.y), batch_size):
            xb, yb = w.x[start : start + batch_size], w.y[start : start + batch_size]
            with torch.no_grad():
                notebook_model(xb)
            xb = xb.clone().requires_grad_(True)
            notebook_model.zero_grad()
            F.cross_entropy(notebook_model(xb), yb, reduction="sum").backward()
            assert xb.grad is not None
            with torch.no_grad():
                notebook_model((xb.detach() + eps * xb.grad.sign()).clamp_(lo, hi))

    with frozen_parameters(model):
        three_pass()  # warm-up: allocator and kernel selection
        t_fwd, _ = best_of(repeats, forward, w.pass_seconds)
        t_3, _ = best_of(repeats, three_pass, w.pass_seconds)
    # The reference's passes without its copies and loaders: parameters require gradients.
    notebook_passes()
    t_nb, _ = best_of(repeats, notebook_passes, w.pass_seconds)
    return PassTimes(batch_size, t_fwd, t_3, t_nb)


@dataclass
class EngineRun:
    unfiltered: tuple[float, float]
    curves: dict[tuple[str, str], Curves]
    prefix_hits: int
    evaluate_seconds: dict[str, float] = field(default_factory=dict)  # per scope
    evaluate_calls: dict[str, int] = field(default_factory=dict)
    focus_seconds: dict[str, float] = field(default_factory=dict)
    sweep_seconds: dict[str, float] = field(default_factory=dict)  # sweep_scope, per scope
    setup_seconds: float = 0.0
    memo_hits: int = 0  # variants met again under another filter or scope, not re-evaluated

    @property
    def evaluated_variants(self) -> int:
        """Distinct variants actually evaluated, the unfiltered network included."""
        return 1 + sum(c.evaluated_variants for c in self.curves.values()) - self.memo_hits


@contextlib.contextmanager
def _timed(into: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into[key] = into.get(key, 0.0) + time.perf_counter() - t0


def run_engine(
    w: Workload, source: Source, batch_size: int, prefix_budget: int | None = None
) -> EngineRun:
    """The engine's local and global sweeps, as ``AuditSession`` drives them, fully timed."""
    t0 = time.perf_counter()
    splitter = NetworkSplitter(w.inner, w.preprocess)
    modules = dict(w.inner.named_modules())
    with frozen_parameters(w.model):
        attack = FGSM(FGSMSpec(eps=w.eps), w.input_range, 0)
        evaluator = Evaluator(
            w.model,
            EvalData(w.x, w.y, batch_size),
            attack,
            source,
            splitter=splitter,
            prefix_budget=PREFIX_BUDGET if prefix_budget is None else prefix_budget,
        )
        unfiltered = evaluator.evaluate()
        run = EngineRun(unfiltered, {}, 0, setup_seconds=time.perf_counter() - t0)
        plain_evaluate = evaluator.evaluate
        scope_key = ""

        def counted_evaluate() -> tuple[float, float]:
            run.evaluate_calls[scope_key] = run.evaluate_calls.get(scope_key, 0) + 1
            with _timed(run.evaluate_seconds, scope_key):
                return plain_evaluate()

        evaluator.evaluate = counted_evaluate  # type: ignore[method-assign]
        for filter_name in w.filters:
            for layer in w.layers:
                scope_key = layer
                with contextlib.ExitStack() as focused:
                    with _timed(run.focus_seconds, layer):  # builds the prefix cache
                        focused.enter_context(evaluator.focus(layer))
                    with _timed(run.sweep_seconds, layer):
                        run.curves[(layer, filter_name)] = sweep_scope(
                            [modules[layer].weight],
                            filter_name,
                            thresholds=w.thresholds,
                            values=w.values,
                            evaluator=evaluator,
                            unfiltered=unfiltered,
                        )
            if not w.global_layers:
                continue
            scope_key = "global"
            with _timed(run.sweep_seconds, "global"):
                run.curves[("global", filter_name)] = sweep_scope(
                    [modules[n].weight for n in w.global_layers],
                    filter_name,
                    thresholds=w.thresholds,
                    values=w.values,
                    evaluator=evaluator,
                    unfiltered=unfiltered,
                )
        run.prefix_hits = evaluator.prefix_hits
        run.memo_hits = evaluator.memo_hits
    return run


def run_reference(w: Workload, source: Source, batch_size: int) -> ref.ReferenceRun:
    scopes = [s for s, on in (("local", w.layers), ("global", w.global_layers)) if on]
    return ref.run_notebook_audit(
        w.model,
        w.layers,
        w.weight_names(),
        w.filters,
        w.thresholds,
        ref.ArrayDataset.from_tensors(w.x, w.y),
        eps=w.eps,
        batch_size=batch_size,
        scopes=scopes,
        adversarial_source=source,
        input_range=w.input_range,
        values=w.values,
    )


def assert_agree(reference: ref.ReferenceRun, engine: EngineRun, what: str) -> None:
    """Every curve of the engine equals the reference's, value for value."""
    assert reference.unfiltered == engine.unfiltered, (
        f"{what}: unfiltered {reference.unfiltered} != {engine.unfiltered}"
    )
    assert reference.curves.keys() == engine.curves.keys(), what
    for key, expected in reference.curves.items():
        got = engine.curves[key]
        for name in ("thresholds", "removed_fraction", "clean_accuracy", "adversarial_accuracy"):
            a, b = getattr(expected, name), getattr(got, name)
            assert a == b, f"{what} {key} {name}:\n reference {a}\n engine    {b}"


# --------------------------------------------------------------------------- reporting
@dataclass
class WorkloadResult:
    name: str
    reference_exact: Timing
    reference_original: Timing
    engine_exact: Timing
    engine_original: Timing
    three_pass: Timing  # one whole-set 3-pass at the batch size used
    variants: int  # distinct variants the engine evaluated (exact), unfiltered included
    reference_variants: int

    def speedups(self, clock: str) -> tuple[float, float, float, float]:
        """(exact, original vs the notebook algorithm, original like-for-like, of limit)."""
        ref_exact, ref_orig = (
            getattr(self.reference_exact, clock),
            getattr(self.reference_original, clock),
        )
        eng_exact, eng_orig = (
            getattr(self.engine_exact, clock),
            getattr(self.engine_original, clock),
        )
        limit = self.variants * getattr(self.three_pass, clock)
        return ref_exact / eng_exact, ref_exact / eng_orig, ref_orig / eng_orig, eng_exact / limit


def benchmark(w: Workload, engine_only: bool = False) -> WorkloadResult:
    print(f"\n== {w.describe()}", flush=True)
    n = max(w.repeats, 3)
    passes = [time_passes(w, bs, n) for bs in w.batch_sizes]
    for p in passes:
        print(
            f"   batch {p.batch_size:4d}, min of >= {n}: forward {p.forward.wall:.3f} s; 3-pass "
            f"(forward + input-only backward + forward) {p.three_pass.wall:.3f} s; the "
            f"notebook's passes (clean forward + forward + full backward + forward) "
            f"{p.notebook_passes.wall:.3f} s"
        )
    best = min(passes, key=lambda p: p.three_pass.wall)
    bs = best.batch_size
    print(f"   both sides run at batch size {bs}; each time is the fastest of {w.repeats} run(s)")

    nan = Timing(float("nan"), float("nan"))
    t_ref_exact = t_ref_orig = nan
    reference_exact = reference_orig = None
    if not engine_only:
        t_ref_exact, reference_exact = best_of(w.repeats, lambda: run_reference(w, "filtered", bs))
        print(f"   reference (notebook algorithm), filtered: {t_ref_exact}", flush=True)
    t_eng_exact, engine_exact = best_of(w.repeats, lambda: run_engine(w, "filtered", bs))
    print(f"   engine, filtered (exact):                 {t_eng_exact}", flush=True)
    if reference_exact is not None:
        assert_agree(reference_exact, engine_exact, f"{w.name} filtered")
        print("   filtered: results agree (every curve identical to the reference)")
    if not engine_only:
        t_ref_orig, reference_orig = best_of(w.repeats, lambda: run_reference(w, "original", bs))
        print(f"   reference (notebook algorithm), original: {t_ref_orig}", flush=True)
    t_eng_orig, engine_orig = best_of(w.repeats, lambda: run_engine(w, "original", bs))
    print(f"   engine, adversarial_source=original:      {t_eng_orig}", flush=True)
    if reference_orig is not None:
        assert_agree(reference_orig, engine_orig, f"{w.name} original")
        print(
            "   original: results agree (every curve identical to the reference in original mode)"
        )

    _print_breakdown(engine_exact, w, "exact", best.three_pass.wall, "a whole-network 3-pass")
    _print_breakdown(engine_orig, w, "original", 2 * best.forward.wall, "two whole forwards")
    return WorkloadResult(
        w.name,
        t_ref_exact,
        t_ref_orig,
        t_eng_exact,
        t_eng_orig,
        best.three_pass,
        engine_exact.evaluated_variants,
        reference_exact.evaluated_variants if reference_exact is not None else 0,
    )


def _print_breakdown(run: EngineRun, w: Workload, mode: str, unit: float, unit_name: str) -> None:
    """Where the engine's time went, per scope, against whole-network passes (``unit``)."""
    print(
        f"   engine {mode} (fastest run): setup + unfiltered {run.setup_seconds:.2f} s; "
        f"prefix reuse in {run.prefix_hits}/{len(w.layers) * len(w.filters)} local sweeps; "
        f"{run.memo_hits} variants met again under another filter or scope (not re-evaluated)"
    )
    for scope in [*w.layers, *(["global"] if w.global_layers else [])]:
        calls = run.evaluate_calls.get(scope, 0)
        seconds = run.evaluate_seconds.get(scope, 0.0)
        per = seconds / calls if calls else float("nan")
        focus = run.focus_seconds.get(scope)
        focus_text = f", prefix build {focus:.2f} s" if focus is not None else ""
        other = run.sweep_seconds.get(scope, 0.0) - seconds
        print(
            f"     {scope:16s} {calls:3d} variants, evaluate {per:.3f} s each "
            f"({per / unit:.2f}x {unit_name}); sorting, masking and restoring "
            f"{other:.2f} s{focus_text}"
        )


def print_table(results: Sequence[WorkloadResult]) -> None:
    print(
        f"\n{'workload':26s} {'reference':>10s} {'engine':>9s} {'engine':>9s} {'speedup':>8s} "
        f"{'speedup':>8s} {'like-for':>8s} {'engine/':>8s} {'distinct':>9s}\n"
        f"{'':26s} {'(notebook)':>10s} {'exact':>9s} {'original':>9s} {'exact':>8s} "
        f"{'original':>8s} {'-like':>8s} {'limit':>8s} {'variants':>9s}"
    )
    for r in results:
        exact, original, like, of_limit = r.speedups("wall")
        print(
            f"{r.name:26s} {r.reference_exact.wall:9.2f}s {r.engine_exact.wall:8.2f}s "
            f"{r.engine_original.wall:8.2f}s {exact:7.2f}x {original:7.2f}x {like:7.2f}x "
            f"{of_limit:7.2f}x {r.variants:5d}/{r.reference_variants:<3d}"
        )
    for r in results:
        exact, original, like, of_limit = r.speedups("cpu")
        print(
            f"  {r.name}, on process CPU time: {exact:.2f}x exact, {original:.2f}x original, "
            f"{like:.2f}x like-for-like, {of_limit:.2f}x of the limit"
        )
    print(
        "  times are wall clock, each the fastest of the runs; speedup original = the notebook "
        "algorithm\n  (white-box per variant, the only mode the notebooks have) / the engine in "
        "original mode;\n  like-for-like = the reference re-run in original mode / the engine in "
        "original mode;\n  engine/limit = engine exact / (distinct variants x one whole-set "
        "forward + input-only backward\n  + forward, min of N at the best batch size); distinct "
        "variants = engine / reference, the\n  unfiltered network included on both sides."
    )


# --------------------------------------------------------------------------- main
def _peak_memory_text() -> str:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    peak = peak_memory_mb(device)
    text = f"process RSS {peak['process_rss']} MB"
    if "device_allocated" in peak:
        text += f", CUDA allocated {peak['device_allocated']} MB"
    return text


RESNET_LAYERS = ["conv1", "layer2.0.conv2", "layer3.1.conv1", "layer4.1.conv2"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run, seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument(
        "--model",
        choices=["resnet18", "resnet-small"],
        default="resnet18",
        help="the second workload: torchvision's ResNet-18 or a 16/32/64-channel ResNet "
        "(SmallResNet, default layers " + ", ".join(SMALL_RESNET_LAYERS) + ")",
    )
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=PREFIX_BUDGET >> 20,
        help="the engine's prefix cache budget (filtering.prefix_cache_mb; 0: off)",
    )
    parser.add_argument(
        "--no-graph-cache",
        action="store_true",
        help="FGSM scopes run whole instead of keeping the prefix's autograd graph",
    )
    parser.add_argument("--images", type=int, default=128, help="ResNet-18 examples")
    parser.add_argument("--thresholds", type=int, default=8, help="ResNet-18 thresholds")
    parser.add_argument("--filters", nargs="+", default=["low_pass"], help="ResNet-18 filters")
    parser.add_argument("--layers", nargs="+", default=RESNET_LAYERS, help="ResNet-18 layers")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--repeats", type=int, default=1, help="ResNet-18 runs per side (min)")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument(
        "--spec",
        type=Path,
        help="benchmark the model, data and filtering of this audit spec instead of the "
        "built-in workloads (its first FGSM attack; --repeats runs per side)",
    )
    parser.add_argument(
        "--engine-only", action="store_true", help="skip the reference (scaling measurements)"
    )
    args = parser.parse_args(argv)
    if args.model == "resnet-small" and args.layers == RESNET_LAYERS:
        args.layers = SMALL_RESNET_LAYERS
    if args.quick:
        args.images, args.thresholds, args.filters = 4, 3, ["low_pass"]
        args.layers = [args.layers[0], args.layers[-1]]
        args.batch_sizes, args.repeats = [4], 1
    args.batch_sizes = [b for b in args.batch_sizes if b <= args.images] or [args.images]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    global PREFIX_BUDGET
    PREFIX_BUDGET = args.prefix_cache_mb << 20
    Evaluator.cache_graphs = not args.no_graph_cache
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
    )
    started = time.perf_counter()
    results = []
    if args.spec is not None:
        main_result = benchmark(spec_workload(args.spec, args.repeats), args.engine_only)
    else:
        if not args.skip_digits:
            results.append(
                benchmark(digits_workload(args.quick, 1 if args.quick else 3), args.engine_only)
            )
        main_result = benchmark(resnet_workload(args), args.engine_only)
    results.append(main_result)
    print_table(results)
    print(
        f"\nwall time {time.perf_counter() - started:.0f} s, load average "
        f"{os.getloadavg()[0]:.2f} at the end; the speedup line is for {main_result.name}:"
    )
    print(
        f"peak memory: {_peak_memory_text()} (prefix_cache_mb {args.prefix_cache_mb}, FGSM "
        f"graph cache {'off' if args.no_graph_cache else 'on'}; the whole run, reference included)"
    )
    exact, original, _, of_limit = main_result.speedups("wall")
    if args.engine_only:
        print(f"engine-only run (no reference, no speedup): {of_limit:.2f}x of the 3-pass limit")
        return
    print(
        f"speedup: {exact:.2f}x exact, {original:.2f}x adversarial_source=original, "
        f"{of_limit:.2f}x of the 3-pass limit"
    )


if __name__ == "__main__":
    main()
