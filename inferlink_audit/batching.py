"""``data.batch_size: auto``: the largest test batch that fits the device (README,
"How the engine computes it").

A sweep's cost per example barely depends on the batch size once the device is busy, but a
batch too large for the device fails and one too small leaves an accelerator idle. So the
choice is measured, not guessed: one small batch runs the sweep's heaviest step (forward with
the input gradient kept, the input-only backward pass, the adversarial forward pass), its
memory per example is recorded, and the batch is as large as the device's budget allows. It
is a multiple of ``EXAMPLE_CHUNK`` where it can be, so that the attacks' per-example random
draws and L-BFGS's joint problems are the same as with any other such size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import EXAMPLE_CHUNK
from .devices import inference_mode, memory_budget, synchronize
from .sweep import saved_bytes_of

PROBE_EXAMPLES = 4
# Off accelerators only autograd's saved tensors are counted; the backward pass's gradient
# buffers and the second forward pass come on top of them.
SAVED_TO_PEAK = 2.0


@dataclass(frozen=True)
class BatchChoice:
    batch_size: int
    bytes_per_example: int
    budget: int

    def describe(self) -> str:
        return (
            f"auto: {self.batch_size} ({self.bytes_per_example / 2**20:.2f} MiB per example "
            f"measured, within a budget of {self.budget / 2**20:.0f} MiB)"
        )


def _pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lo: float, hi: float) -> None:
    leaf = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(leaf), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, leaf)
    with inference_mode(x.device):
        model((leaf.detach() + 0.01 * grad.sign()).clamp_(lo, hi))


def bytes_per_example(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, input_range: tuple[float, float]
) -> int:
    """Memory one example costs in the sweep's heaviest step, measured on ``x``."""
    lo, hi = input_range
    device = x.device
    with torch.enable_grad():
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            _pass(model, x, y, lo, hi)
            synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            _, saved = saved_bytes_of(lambda: model(x.detach().clone().requires_grad_(True)))
            peak = int(SAVED_TO_PEAK * saved)
    return max(1, math.ceil(peak / x.shape[0]))


def auto_batch_size(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, input_range: tuple[float, float]
) -> BatchChoice:
    """The batch size for the test set ``(x, y)`` (already on the model's device)."""
    probe = min(PROBE_EXAMPLES, int(y.shape[0]))
    per_example = bytes_per_example(model, x[:probe], y[:probe], input_range)
    budget = memory_budget(x.device)
    size = max(1, min(int(y.shape[0]), budget // per_example))
    if size >= EXAMPLE_CHUNK and size < y.shape[0]:
        size -= size % EXAMPLE_CHUNK
    return BatchChoice(size, per_example, budget)
