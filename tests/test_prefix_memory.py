"""The prefix cache holds what it accounts, within its budget, frees it, and changes no number.

The accounting is checked against an independent count: the tensors a freshly built prefix
keeps alive, found by walking its autograd graph (``_saved_*`` attributes), each storage once.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inferlink_audit.attacks import FGSM, Attack, GaussianNoise
from inferlink_audit.audit import run_audit
from inferlink_audit.prefix import NetworkSplitter, _malloc_trim, release_freed_memory
from inferlink_audit.results import write_results
from inferlink_audit.spec import FGSMSpec, GaussianSpec
from inferlink_audit.spec_loader import load_spec
from inferlink_audit.sweep import Curves, EvalData, Evaluator, frozen_parameters, sweep_scope

from .specs import write_spec

LAYERS = ["stem", "block1.conv1", "block1.conv2", "block2.conv2", "fc"]
Precision = Literal["fp32", "bf16"]


class Block(nn.Module):
    """A residual block: its input is a skip tensor that the cache must keep with the cut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.block1 = Block(4, 4, 1)
        self.block2 = Block(4, 8, 2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(F.relu(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    net = SmallResNet().eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
    return net


def _data(model: nn.Module) -> EvalData:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 8, 8, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    y = torch.where(torch.rand(40, generator=gen) < 0.3, (y + 1) % 5, y)
    return EvalData(x, y, 16)  # 16, 16, 8: the last batch is smaller


def _attack(name: str) -> Attack:
    if name == "fgsm":
        return FGSM(FGSMSpec(eps=0.1), (0, 1), 0)
    return GaussianNoise(GaussianSpec(sigma=0.2), (0, 1), 0)


def _cached(
    model: nn.Module,
    data: EvalData,
    attack: str = "fgsm",
    source: str = "filtered",
    *,
    splitter: NetworkSplitter | None = None,
    budget: int = 1 << 40,
    precision: Precision = "fp32",
) -> Evaluator:
    """An evaluator that reuses prefixes within ``budget`` bytes (unlimited by default)."""
    return Evaluator(
        model,
        data,
        _attack(attack),
        source,  # type: ignore[arg-type]
        splitter=splitter or NetworkSplitter(model),
        prefix_budget=budget,
        precision=precision,
    )


def _graph_tensors(roots: tuple[torch.Tensor, ...]) -> Iterator[torch.Tensor]:
    """Every tensor saved by the autograd graph behind ``roots``."""
    seen: set[int] = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                values = value if isinstance(value, list | tuple) else [value]
                yield from (v for v in values if isinstance(v, torch.Tensor))
        stack.extend(next_node for next_node, _ in node.next_functions)


def _arithmetic(precision: str) -> Any:
    """The autocast ``compute.precision: bf16`` runs under, set up here independently."""
    if precision == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return nullcontext()


def _independent_bytes(
    model: nn.Module, data: EvalData, evaluator: Evaluator, layer: str, precision: str = "fp32"
) -> int:
    """What a cache of ``layer``'s prefix must hold, counted without the evaluator's code."""
    split = NetworkSplitter(model).split(layer)
    assert split is not None
    owned = [*model.parameters(), *model.buffers(), data.x, data.y]
    owned += evaluator.fixed_adversarial or []
    storages = {t.untyped_storage().data_ptr() for t in owned}
    kept: dict[int, int] = {}
    # Kept alive: a storage freed here could come back at the same address and count once.
    alive: list[torch.Tensor] = []
    for index, xb, _ in data.batches():
        if evaluator.fixed_adversarial is not None:
            with torch.inference_mode(), _arithmetic(precision):
                tensors = [*split.prefix(xb), *split.prefix(evaluator.fixed_adversarial[index])]
        else:
            leaf = xb.clone().requires_grad_(True)
            with torch.enable_grad(), _arithmetic(precision):
                live = split.prefix(leaf)
            tensors = [leaf, *live, *_graph_tensors(live)]
        alive += tensors
        for t in tensors:
            if t.untyped_storage().data_ptr() not in storages:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(kept.values())


def _sweep(evaluator: Evaluator, model: nn.Module, layer: str) -> Curves:
    unfiltered = evaluator.evaluate()
    with evaluator.focus(layer):
        return sweep_scope(
            [model.get_submodule(layer).weight],
            "pulse",
            thresholds=7,
            values="signed",
            evaluator=evaluator,
            unfiltered=unfiltered,
        )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("attack", "source"), [("fgsm", "filtered"), ("gaussian", "filtered")])
def test_cache_bytes_equal_an_independent_count_and_never_exceed_the_budget(
    model: nn.Module, attack: str, source: str, precision: Precision
) -> None:
    """In bf16 too: the cache is built under autocast, so it holds bf16 activations and the
    weights autocast casts for the backward pass, and its budget must hold all the same."""
    data = _data(model)
    splitter = NetworkSplitter(model)
    with frozen_parameters(model):
        unlimited = _cached(model, data, attack, source, splitter=splitter, precision=precision)
        needed = {
            layer: _independent_bytes(model, data, unlimited, layer, precision) for layer in LAYERS
        }
        for layer in LAYERS:
            with unlimited.focus(layer):
                assert unlimited.prefix_cache_bytes == needed[layer], layer
        # A budget that fits the cheaper prefixes but not the dearest ones.
        budget = sorted(needed.values())[len(needed) // 2]
        bounded = _cached(
            model, data, attack, source, splitter=splitter, budget=budget, precision=precision
        )
        bounded.evaluate()
        before = _tensor_bytes_alive()
        for layer in LAYERS:
            hits = bounded.prefix_hits
            with bounded.focus(layer):
                held = bounded.prefix_cache_bytes
                assert held <= budget, (layer, held, budget)
                # Nothing else stays behind either (earlier scopes' caches included).
                assert _tensor_bytes_alive() - before <= budget, layer
                bounded.evaluate()
                assert bounded.prefix_hits - hits == (needed[layer] <= budget), layer
                if bounded.prefix_hits > hits:
                    assert held == needed[layer]
    assert any(n > budget for n in needed.values()) and any(n <= budget for n in needed.values())


def test_a_bf16_fgsm_cache_keeps_its_activations_in_bf16_only(model: nn.Module) -> None:
    """Under bf16 the prefix is built under autocast: each activation is kept once, in bf16
    (half fp32's bytes, which is why a cache over the budget in fp32 can fit it in bf16), and
    the only fp32 storages are the inputs FGSM differentiates."""
    data = _data(model)
    with frozen_parameters(model):
        evaluator = _cached(model, data, precision="bf16")
        owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        with evaluator.focus("block2.conv2"):
            assert evaluator._prefix is not None and evaluator._prefix.graphs is not None
            leaves = {leaf.untyped_storage().data_ptr() for leaf, _ in evaluator._prefix.graphs}
            kept = {
                t.untyped_storage().data_ptr(): t
                for t in evaluator._prefix.tensors()
                if t.untyped_storage().nbytes() and t.untyped_storage().data_ptr() not in owned
            }
    dtypes = {ptr: t.dtype for ptr, t in kept.items()}
    assert {ptr for ptr, dtype in dtypes.items() if dtype != torch.bfloat16} == leaves
    assert len(kept) > 2 * len(leaves)  # activations were kept, and each in bf16


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _malloc_trim() is None,
    reason="reads /proc/self/statm; gives pages back through glibc's malloc_trim",
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_released_cache_gives_its_memory_back_to_the_system(precision: Precision) -> None:
    """Freed is not enough: glibc keeps the pages of tensors it served from its heap (below
    its mmap threshold: in bf16 nearly every activation) resident after they are freed, so the
    process stayed at the size of its largest cache for the rest of the audit (bench_decide's
    bf16 run: 1.8 GB still resident after a 1.4 GB cache was freed)."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(3 if i == 0 else 32, 32, 3, padding=1) for i in range(4)]
    net = nn.Sequential(
        *(m for conv in convs for m in (conv, nn.ReLU())),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()
    data = EvalData(torch.rand(256, 3, 32, 32), torch.randint(0, 10, (256,)), 64)
    with frozen_parameters(net):
        evaluator = _cached(net, data, precision=precision)
        evaluator.evaluate()
        gc.collect()
        release_freed_memory()
        before = _resident_mib()
        with evaluator.focus("10"):  # the classifier: the cache holds the whole network's graph
            cached = evaluator.prefix_cache_bytes / (1 << 20)
            evaluator.evaluate()
        gc.collect()
        after = _resident_mib()
    assert cached > 50  # large enough to see in the resident size
    assert after - before < cached / 4, (before, cached, after)


def _tensor_bytes_alive() -> int:
    """Bytes of the distinct storages of every tensor Python can still reach."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor or type(obj) is nn.Parameter:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_the_fgsm_graph_cache_is_freed_when_focus_ends(model: nn.Module) -> None:
    """A graph kept for FGSM must not outlive its scope: before the fix, the hook that counted
    its saved tensors closed a reference cycle through autograd, and every scope's graphs
    stayed in memory until the process ended (8.5 GB on a small ResNet)."""
    data = _data(model)
    with frozen_parameters(model):
        evaluator = _cached(model, data)
        before = _tensor_bytes_alive()
        for layer in LAYERS:
            with evaluator.focus(layer):
                inside = _tensor_bytes_alive()
                evaluator.evaluate()
            assert _tensor_bytes_alive() == before, layer
    assert inside > before  # the last scope's cache was really built and counted here
    assert evaluator.prefix_hits == len(LAYERS)


@pytest.mark.parametrize("attack", ["fgsm", "gaussian"])
@pytest.mark.parametrize("source", ["filtered", "original"])
def test_curves_with_the_cache_equal_curves_without(
    model: nn.Module, attack: str, source: str
) -> None:
    data = _data(model)
    splitter = NetworkSplitter(model)
    with frozen_parameters(model):
        for layer in LAYERS:
            curves = {}
            for budget in (0, 1 << 40):
                evaluator = _cached(model, data, attack, source, splitter=splitter, budget=budget)
                curves[budget] = _sweep(evaluator, model, layer)
                assert evaluator.prefix_hits == (budget > 0), (layer, budget)
            assert _numbers(curves[0]) == _numbers(curves[1 << 40]), layer


def _numbers(curves: Curves) -> dict[str, object]:
    """Every number a sweep reports (per-example outcomes as bytes, where they exist)."""
    numbers = {
        name: getattr(curves, name)
        for name in ("thresholds", "removed_fraction", "clean_accuracy", "adversarial_accuracy")
    }
    numbers["evaluated_variants"] = curves.evaluated_variants
    outcomes = getattr(curves, "outcomes", None)
    numbers["outcomes"] = [(c.tobytes(), a.tobytes()) for c, a in outcomes or ()]
    return numbers


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def test_results_json_records_the_peak_memory(tmp_path: Path) -> None:
    filtering = {"thresholds": 3, "filters": ["low_pass"], "scopes": ["local"]}
    spec = load_spec(write_spec(tmp_path, filtering=filtering))
    low = _peak_rss_mb()  # the peak only grows: the audit's is between these two readings
    result, _, _ = run_audit(spec)
    high = _peak_rss_mb()
    write_results(result, tmp_path / "results.json")
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert low - 0.1 <= meta["peak_memory_mb"]["process_rss"] <= high + 0.1
    assert "device_allocated" not in meta["peak_memory_mb"]  # a CPU audit
