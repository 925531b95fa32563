"""Unit semantics (Szegedy et al., *Intriguing properties of neural networks*, ICLR 2014, §3).

The paper asks whether a single unit of a layer means more than any other direction of the
layer's activation space. For a unit i (natural basis vector eᵢ) it shows the held-out images
x that maximise ⟨φ(x), eᵢ⟩; for a random direction v, those that maximise ⟨φ(x), v⟩. Both sets
look equally "semantic", so the meaning lives in the space, not in the coordinates.

Here, for one layer over the whole test set, in one batched forward pass with a forward hook
(eval mode, no gradients, the model unchanged):

* φ(x) is the layer's output; a convolutional output (N, C, H, W, …) is averaged over its
  spatial positions to a C-vector. The mean is linear, so a unit is still the direction eᵢ
  of the same space and units and random directions are measured alike; the paper's MNIST
  experiments use fully connected layers, where nothing is reduced.
* Units: the ``units`` coordinates with the largest variance over the test set (ties: lower
  index). A dead or constant unit has no top images worth showing (every example ties), and
  giving the natural basis its most active units is the fair test of the paper's claim.
* Directions: row j of a (directions × D) standard normal matrix drawn in float64 from a
  ``torch.Generator`` seeded with the spec's seed, scaled to unit length.
* Top-k: the k examples with the largest value, largest first, ties broken by lower example
  index; values are computed in float64 from the layer's float32 output.
"""

from __future__ import annotations

import base64
import difflib
import io
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import AuditError, UnsupportedError, listing
from .results import TopExamples, UnitSemanticsResult

__all__ = ["find_layer", "input_image_png", "unit_semantics"]

LAYER_KEY = ("analysis", "units", "layer")
THUMBNAIL = 96  # longest side of an image in the report, in pixels (larger inputs are shrunk)


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of the user's network, or an error naming the key and listing
    the modules it could be."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise AuditError(
        f"analysis.units.layer {name!r} is not a module of the model.{hint} Its modules are: "
        f"{listing(names) or 'none'}; give a name as model.named_modules() writes it.",
        key=LAYER_KEY,
    )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the pass, each module's own training flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


class _TopK:
    """The k largest values of each row seen so far and the examples they came from.

    Merging by a stable sort keeps ties in example order: kept entries (earlier examples)
    come before the new batch, and within both the order is ascending example index.
    """

    def __init__(self, rows: int, k: int) -> None:
        self.k = k
        self.values = torch.empty(rows, 0, dtype=torch.float64)
        self.indices = torch.empty(rows, 0, dtype=torch.long)

    def add(self, values: torch.Tensor, start: int) -> None:
        """``values``: (rows, batch) for examples ``start …`` of the test set."""
        batch = torch.arange(start, start + values.shape[1]).expand(values.shape[0], -1)
        merged = torch.cat([self.values, values], dim=1)
        indices = torch.cat([self.indices, batch], dim=1)
        order = torch.sort(merged, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values = merged.gather(1, order)
        self.indices = indices.gather(1, order)


class _Moments:
    """Per-coordinate mean and variance over examples, merged batch by batch (Chan et al.)."""

    def __init__(self, dims: int) -> None:
        self.count = 0
        self.mean = torch.zeros(dims, dtype=torch.float64)
        self.m2 = torch.zeros(dims, dtype=torch.float64)

    def add(self, acts: torch.Tensor) -> None:
        n = acts.shape[0]
        mean = acts.mean(0)
        m2 = ((acts - mean) ** 2).sum(0)
        delta = mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        return self.m2 / max(self.count, 1)


def _reduce(out: object, layer: str, batch: int) -> tuple[torch.Tensor, list[int]]:
    """The layer's output as float64 (batch, D) on the CPU, and its per-example shape."""
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != batch:
        what = type(out).__name__ if not isinstance(out, torch.Tensor) else tuple(out.shape)
        raise UnsupportedError(
            f"analysis.units.layer {layer!r} outputs {what}, not one tensor with a row per "
            "example; choose a module that outputs the activations (e.g. a Conv, Linear or "
            "activation module).",
            key=LAYER_KEY,
        )
    shape = list(out.shape[1:])
    flat = out.detach().to("cpu", torch.float64)
    if flat.dim() == 1:
        flat = flat.unsqueeze(1)
    elif flat.dim() > 2:
        flat = flat.flatten(2).mean(2)  # channels are dimension 1; spatial positions averaged
    return flat, shape


def random_directions(count: int, dims: int, seed: int) -> torch.Tensor:
    """``count`` unit-length random directions in R^dims, the same for the same seed."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(count, dims, generator=generator, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


@dataclass
class _Pass:
    """What one pass over the test set accumulated."""

    shape: list[int]
    moments: _Moments
    units: _TopK
    projections: _TopK
    directions: torch.Tensor


def _accumulate(
    model: nn.Module,
    layer_module: nn.Module,
    layer: str,
    batches: Sequence[tuple[int, torch.Tensor]],
    *,
    directions: int,
    k: int,
    seed: int,
) -> _Pass:
    captured: list[object] = []
    handle = layer_module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    state: _Pass | None = None
    try:
        with _eval_mode(model), torch.inference_mode():
            for start, xb in batches:
                captured.clear()
                model(xb)
                if not captured:
                    raise UnsupportedError(
                        f"analysis.units.layer {layer!r} is not called by the model's forward "
                        "pass, so it has no activations; choose a module the forward pass uses.",
                        key=LAYER_KEY,
                    )
                if len(captured) > 1:
                    raise UnsupportedError(
                        f"analysis.units.layer {layer!r} is called {len(captured)} times per "
                        "forward pass (a shared module), so its output is not one activation "
                        "space; choose a module the forward pass calls once.",
                        key=LAYER_KEY,
                    )
                acts, shape = _reduce(captured[0], layer, xb.shape[0])
                if state is None:
                    dims = acts.shape[1]
                    state = _Pass(
                        shape,
                        _Moments(dims),
                        _TopK(dims, k),
                        _TopK(directions, k),
                        random_directions(directions, dims, seed),
                    )
                state.moments.add(acts)
                state.units.add(acts.T, start)
                state.projections.add(state.directions @ acts.T, start)
    finally:
        handle.remove()
    assert state is not None, "the test set has no examples"
    return state


def unit_semantics(
    model: nn.Module,
    inner: nn.Module,
    layer: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    units: int,
    directions: int,
    k: int,
    seed: int,
    input_range: tuple[float, float],
) -> UnitSemanticsResult:
    """Top-k test examples of the most variable units of ``layer`` and of random directions.

    ``model`` is what runs (the normalising wrapper), ``inner`` the user's network in which
    ``layer`` is named, ``x`` the test inputs in ``input_range`` and ``y`` their labels.
    """
    layer_module = find_layer(inner, layer)
    k = min(k, x.shape[0])
    batches = [(s, x[s : s + batch_size]) for s in range(0, x.shape[0], batch_size)]
    state = _accumulate(model, layer_module, layer, batches, directions=directions, k=k, seed=seed)
    variance = state.moments.variance
    chosen = torch.sort(variance, descending=True, stable=True).indices[:units].tolist()
    labels = y.tolist()
    unit_rows = [
        TopExamples(
            kind="unit",
            index=i,
            examples=state.units.indices[i].tolist(),
            values=state.units.values[i].tolist(),
            variance=float(variance[i]),
            **_majority(state.units.indices[i].tolist(), labels),
        )
        for i in chosen
    ]
    direction_rows = [
        TopExamples(
            kind="direction",
            index=j,
            examples=state.projections.indices[j].tolist(),
            values=state.projections.values[j].tolist(),
            **_majority(state.projections.indices[j].tolist(), labels),
        )
        for j in range(directions)
    ]
    shown = sorted({i for row in [*unit_rows, *direction_rows] for i in row.examples})
    images, note = _images(x, shown, input_range)
    return UnitSemanticsResult(
        layer=layer,
        activation_shape=state.shape,
        reduction="spatial_mean" if len(state.shape) > 1 else "none",
        dimensions=int(variance.shape[0]),
        k=k,
        seed=seed,
        unit_choice="most_variable",
        units=unit_rows,
        directions=direction_rows,
        direction_vectors=state.directions.tolist(),
        images=images,
        image_note=note,
        labels={str(i): int(labels[i]) for i in shown},
    )


def _majority(examples: list[int], labels: list[int]) -> dict[str, Any]:
    """The most common class among ``examples`` (ties: the smaller class) and its share."""
    counts = Counter(labels[i] for i in examples)
    cls = min(counts, key=lambda c: (-counts[c], c))
    return {"majority_class": int(cls), "majority_share": counts[cls] / len(examples)}


# --------------------------------------------------------------------------- images
def _as_image(x: torch.Tensor) -> np.ndarray | None:
    """One input as (H, W) or (H, W, 3) floats, or None when it is not an image."""
    if x.dim() == 3 and x.shape[0] in (1, 3):
        return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
    if x.dim() == 2:
        return x.numpy()
    if x.dim() == 1:
        side = math.isqrt(x.numel())
        if side * side == x.numel() and side > 1:
            return x.reshape(side, side).numpy()
    return None


def input_image_png(x: torch.Tensor, input_range: tuple[float, float]) -> str | None:
    """One test input as a base64 PNG: ``input_range`` mapped to 0…255 (inputs are kept in
    input units, the spec's normalisation being applied inside the model), shrunk so its
    longest side is at most ``THUMBNAIL`` pixels; None when the input is not an image."""
    from PIL import Image

    image = _as_image(x.detach().to("cpu", torch.float64))
    if image is None:
        return None
    lo, hi = input_range
    pixels = np.clip(np.rint((image - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels)  # 2-D: grayscale (L); H×W×3: RGB
    longest = max(picture.size)
    if longest > THUMBNAIL:
        width, height = picture.size
        size = (max(1, width * THUMBNAIL // longest), max(1, height * THUMBNAIL // longest))
        picture = picture.resize(size, Image.Resampling.BOX)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _images(
    x: torch.Tensor, indices: list[int], input_range: tuple[float, float]
) -> tuple[dict[str, str], str]:
    """PNGs of the examples shown, by example index, or a note saying why there are none."""
    images: dict[str, str] = {}
    for i in indices:
        png = input_image_png(x[i], input_range)
        if png is None:
            shape = "×".join(str(d) for d in x.shape[1:])
            return {}, (
                f"inputs of shape {shape} are not images (C×H×W with 1 or 3 channels, H×W, "
                "or a square number of values): example indices and values only"
            )
        images[str(i)] = png
    return images, ""
