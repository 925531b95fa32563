"""The reference notebooks' synaptic-filtering algorithm, re-implemented faithfully (see the README,
"How the engine computes it").

This is the baseline the engine's speed is measured against, so it keeps every cost the
InferLink notebooks pay, on purpose:

* per threshold, a ``copy.deepcopy`` of the model and of its ``state_dict``; the scope's
  weights are masked in the copied state dict, which is then ``load_state_dict``-ed into the
  copied model;
* per variant, a fresh ``DataLoader`` over a map-style dataset whose per-sample transform
  turns each stored sample into a tensor (as ``torchvision`` datasets do);
* per batch, a separate clean forward pass, then FGSM with a forward pass and a *full*
  ``loss.backward()`` on a model whose parameters require gradients (weight gradients are
  computed too), then the adversarial forward pass: about five forward-equivalents per image;
* no duplicate-mask detection: every threshold is evaluated.

It shares no code with ``inferlink_audit`` (masks, thresholds and FGSM are written out here
from docs/method.md §2–3), so agreement with the engine is a real cross-check: the same
thresholds (``np.linspace`` over [min, max] of the scope, in the filter's sweep order), the
same element-wise masks compared in float64, the same FGSM (summed cross-entropy,
``x + eps * sign(grad)`` clamped to the input box), accuracy = correct / n.

``adversarial_source="original"`` is the transfer setting of docs/method.md §3, in the same
notebook style: the FGSM examples are crafted once on the unfiltered network and every
variant only runs its clean and adversarial forward passes over them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

FilterName = Literal["low_pass", "high_pass", "pulse"]
Values = Literal["signed", "magnitude"]
Source = Literal["filtered", "original"]


class ToTensor:
    """The per-sample transform: a stored float32 array becomes a fresh tensor.

    The notebooks use ``transforms.ToTensor()`` on stored images; this does the same amount
    of per-sample work (a copy into a new tensor) while keeping the values bit-identical to
    the tensors the engine holds, so both sides see exactly the same inputs.
    """

    def __call__(self, sample: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(sample, dtype=np.float32, copy=True))


class ArrayDataset(TorchDataset[tuple[torch.Tensor, int]]):
    """A map-style dataset of stored samples, transformed one at a time on access."""

    def __init__(
        self,
        samples: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
    ) -> None:
        self.samples, self.labels = samples, labels
        self.transform = transform or ToTensor()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.samples[index]), int(self.labels[index])

    @classmethod
    def from_tensors(cls, x: torch.Tensor, y: torch.Tensor) -> ArrayDataset:
        return cls(x.detach().cpu().numpy().copy(), y.detach().cpu().numpy().copy())


@dataclass
class ReferenceCurves:
    """One scope's responses to one filter, in sweep order (the engine's ``Curves`` fields)."""

    thresholds: list[float]
    removed_fraction: list[float]
    clean_accuracy: list[float]
    adversarial_accuracy: list[float]
    evaluated_variants: int


def thresholds(values: np.ndarray, filter_name: FilterName, n: int) -> np.ndarray:
    """``n`` thresholds over [min, max] of the scope: low-pass descends, the others ascend."""
    grid = np.linspace(float(values.min()), float(values.max()), int(n), dtype=np.float64)
    return grid[::-1].copy() if filter_name == "low_pass" else grid


def zero_mask(
    values: torch.Tensor, filter_name: FilterName, alpha: float, delta: float
) -> torch.Tensor:
    """docs/method.md §2, element-wise in float64: True where the filter zeroes the weight."""
    if filter_name == "low_pass":
        return values >= alpha
    if filter_name == "high_pass":
        return values <= alpha
    if filter_name == "pulse":
        return (values >= alpha - delta) & (values < alpha + delta)
    raise ValueError(f"unknown filter {filter_name!r}")


def _compared(weight: torch.Tensor, values: Values) -> torch.Tensor:
    v = weight.detach().to(torch.float64)
    return v.abs() if values == "magnitude" else v


def fgsm_notebook(
    model: nn.Module, data: torch.Tensor, target: torch.Tensor, eps: float, lo: float, hi: float
) -> torch.Tensor:
    """FGSM as the notebooks run it: ``loss.backward()`` on the whole model (weight grads too)."""
    data = data.clone()
    data.requires_grad = True
    output = model(data)
    loss = F.cross_entropy(output, target, reduction="sum")
    model.zero_grad()
    loss.backward()
    assert data.grad is not None
    return (data.detach() + eps * data.grad.sign()).clamp(lo, hi)


def _count_correct(output: torch.Tensor, target: torch.Tensor) -> int:
    return int((output.argmax(dim=1) == target).sum().item())


def evaluate_variant(
    model: nn.Module,
    dataset: ArrayDataset,
    batch_size: int,
    eps: float,
    input_range: tuple[float, float],
    fixed_adversarial: Sequence[torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Clean and adversarial accuracy of one variant, the notebooks' per-batch loop."""
    lo, hi = input_range
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    model.eval()
    clean = adversarial = 0
    for index, (data, target) in enumerate(loader):
        with torch.no_grad():
            clean += _count_correct(model(data), target)
        if fixed_adversarial is None:
            perturbed = fgsm_notebook(model, data, target, eps, lo, hi)
        else:
            perturbed = fixed_adversarial[index]
        with torch.no_grad():
            adversarial += _count_correct(model(perturbed), target)
    n = len(dataset)
    return clean / n, adversarial / n


def craft_once(
    model: nn.Module,
    dataset: ArrayDataset,
    batch_size: int,
    eps: float,
    input_range: tuple[float, float],
) -> list[torch.Tensor]:
    """FGSM examples crafted on the unfiltered network, per batch (``original`` source)."""
    unfiltered = copy.deepcopy(model).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    return [fgsm_notebook(unfiltered, data, target, eps, *input_range) for data, target in loader]


def prepare(model: nn.Module) -> nn.Module:
    """The model as the notebooks hold it: eval mode, every parameter requiring gradients."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def sweep_notebook(
    model: nn.Module,
    param_names: Sequence[str],
    filter_name: FilterName,
    n_thresholds: int,
    dataset: ArrayDataset,
    *,
    eps: float,
    batch_size: int,
    input_range: tuple[float, float] = (0.0, 1.0),
    values: Values = "signed",
    value_range: tuple[float, float] | None = None,
    fixed_adversarial: Sequence[torch.Tensor] | None = None,
) -> ReferenceCurves:
    """Every threshold of one filter over one scope (the named state-dict entries)."""
    state = model.state_dict()
    scope_values = torch.cat([_compared(state[name], values).reshape(-1) for name in param_names])
    numel = int(scope_values.numel())
    if value_range is None:
        grid = thresholds(scope_values.numpy(), filter_name, n_thresholds)
        vmin, vmax = float(scope_values.min()), float(scope_values.max())
    else:
        vmin, vmax = float(value_range[0]), float(value_range[1])
        grid = thresholds(np.array([vmin, vmax]), filter_name, n_thresholds)
    delta = (vmax - vmin) / (2 * int(n_thresholds))
    clean: list[float] = []
    adversarial: list[float] = []
    removed: list[float] = []
    for alpha in grid:
        variant = copy.deepcopy(model)
        variant_state = copy.deepcopy(model.state_dict())
        zeroed = 0
        for name in param_names:
            weight = variant_state[name]
            mask = zero_mask(_compared(weight, values), filter_name, float(alpha), delta)
            weight[mask] = 0
            zeroed += int(mask.sum())
        variant.load_state_dict(variant_state)
        c, a = evaluate_variant(
            variant, dataset, batch_size, eps, input_range, fixed_adversarial=fixed_adversarial
        )
        clean.append(c)
        adversarial.append(a)
        removed.append(zeroed / numel)
    return ReferenceCurves(
        thresholds=[float(a) for a in grid],
        removed_fraction=removed,
        clean_accuracy=clean,
        adversarial_accuracy=adversarial,
        evaluated_variants=len(grid),
    )


@dataclass
class ReferenceRun:
    """All sweeps of one audit: ``curves[(scope, filter)]``, scope a layer name or "global"."""

    unfiltered: tuple[float, float]
    curves: dict[tuple[str, str], ReferenceCurves]

    @property
    def evaluated_variants(self) -> int:
        return 1 + sum(c.evaluated_variants for c in self.curves.values())


def run_notebook_audit(
    model: nn.Module,
    layers: Sequence[str],
    weight_names: dict[str, str],
    filters: Sequence[FilterName],
    n_thresholds: int,
    dataset: ArrayDataset,
    *,
    eps: float,
    batch_size: int,
    scopes: Sequence[str] = ("local", "global"),
    adversarial_source: Source = "filtered",
    input_range: tuple[float, float] = (0.0, 1.0),
    values: Values = "signed",
) -> ReferenceRun:
    """Local sweeps of ``layers`` and the global sweep over ``weight_names``, per filter.

    ``weight_names`` maps every layer of the global scope to its weight's state-dict key.
    The unfiltered network is evaluated once, for the normalised responses.
    """
    model = prepare(model)
    fixed = None
    if adversarial_source == "original":
        fixed = craft_once(model, dataset, batch_size, eps, input_range)
    unfiltered = evaluate_variant(
        copy.deepcopy(model), dataset, batch_size, eps, input_range, fixed_adversarial=fixed
    )
    curves: dict[tuple[str, str], ReferenceCurves] = {}
    for filter_name in filters:
        targets: list[tuple[str, list[str]]] = []
        if "local" in scopes:
            targets += [(layer, [weight_names[layer]]) for layer in layers]
        if "global" in scopes:
            targets.append(("global", list(weight_names.values())))
        for scope, names in targets:
            curves[(scope, filter_name)] = sweep_notebook(
                model,
                names,
                filter_name,
                n_thresholds,
                dataset,
                eps=eps,
                batch_size=batch_size,
                input_range=input_range,
                values=values,
                fixed_adversarial=fixed,
            )
    return ReferenceRun(unfiltered, curves)
