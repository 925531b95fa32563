"""External stress (DESIGN §1.5): adversarial and noise attacks in input space [lo, hi].

Every attack is batched, puts the model in eval mode, never changes its weights or mode, and
returns the adversarial inputs together with the clean logits when it computed them anyway
(FGSM's forward pass gives both the gradient and the clean prediction, which lets the sweep
engine spend three passes per variant instead of four). Randomness comes from generators
seeded per batch, so a run is reproducible and every filtered network sees the same noise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import final

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedError
from .spec import AttackSpec, FGSMSpec, GaussianSpec, LBFGSSpec, PGDSpec


@dataclass(frozen=True)
class AttackOutput:
    adversarial: torch.Tensor
    clean_logits: torch.Tensor | None  # logits of the unperturbed batch, when computed anyway


class Attack(ABC):
    """A typed attack: ``__call__`` guards the model's state, ``run`` does the work."""

    model_dependent: bool = True  # False when the perturbation ignores the network (noise)

    def __init__(self, spec: AttackSpec, input_range: tuple[float, float], seed: int) -> None:
        self.spec = spec
        self.lo, self.hi = float(input_range[0]), float(input_range[1])
        self.seed = int(seed)

    @property
    def id(self) -> str:
        return self.spec.id

    @final
    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_index: int = 0
    ) -> AttackOutput:
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                out = self.run(model, x.detach(), y, batch_index=batch_index)
        finally:
            model.train(was_training)
        return AttackOutput(out.adversarial.detach(), out.clean_logits)

    @abstractmethod
    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_index: int
    ) -> AttackOutput: ...

    def _generator(self, device: torch.device, batch_index: int) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed * 1_000_003 + batch_index)
        return generator


def _loss_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """∇ₓ of the summed cross-entropy (sum, so the gradient does not depend on batch size)."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


class FGSM(Attack):
    """Fast gradient sign method: x′ = clip(x + ε·sign(∇ₓ L(f(x), y))).

    Goodfellow, Shlens, Szegedy, *Explaining and Harnessing Adversarial Examples*, ICLR 2015.
    """

    spec: FGSMSpec

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_index: int
    ) -> AttackOutput:
        grad, logits = _loss_gradient(model, x, y)
        return AttackOutput(self.step(x, grad), logits)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The FGSM example from a loss gradient already computed (the sweep's prefix reuse)."""
        return (x + self.spec.eps * grad.sign()).clamp_(self.lo, self.hi)


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


class PGD(Attack):
    """Projected gradient descent in an L∞ or L2 ball of radius ε, clipped to the input box.

    Madry et al., *Towards Deep Learning Models Resistant to Adversarial Attacks*, ICLR 2018.
    """

    spec: PGDSpec

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_index: int
    ) -> AttackOutput:
        eps, step = self.spec.eps, self.spec.effective_step_size
        linf = self.spec.norm == "linf"
        delta = torch.zeros_like(x)
        if self.spec.random_start:
            gen = self._generator(x.device, batch_index)
            if linf:
                delta = (
                    torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1
                ) * eps
            else:
                direction = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                radius = torch.rand(
                    (x.shape[0],) + (1,) * (x.dim() - 1),
                    generator=gen,
                    device=x.device,
                    dtype=x.dtype,
                )
                delta = direction / _per_example_norm(direction) * radius * eps
            delta = (x + delta).clamp(self.lo, self.hi) - x
        clean_logits: torch.Tensor | None = None
        for k in range(self.spec.steps):
            grad, logits = _loss_gradient(model, x + delta, y)
            if k == 0 and not self.spec.random_start:
                clean_logits = logits
            if linf:
                delta = (delta + step * grad.sign()).clamp(-eps, eps)
            else:
                delta = delta + step * grad / _per_example_norm(grad)
                delta = delta * (eps / _per_example_norm(delta)).clamp(max=1.0)
            delta = (x + delta).clamp(self.lo, self.hi) - x
        return AttackOutput(x + delta, clean_logits)


class GaussianNoise(Attack):
    """Additive Gaussian noise N(0, σ²) per input element, clipped to the input box."""

    spec: GaussianSpec
    model_dependent = False

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_index: int
    ) -> AttackOutput:
        gen = self._generator(x.device, batch_index)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return AttackOutput((x + self.spec.sigma * noise).clamp(self.lo, self.hi), None)


def build_attack(spec: AttackSpec, input_range: tuple[float, float], seed: int) -> Attack:
    """The attack a spec entry names."""
    if isinstance(spec, FGSMSpec):
        return FGSM(spec, input_range, seed)
    if isinstance(spec, PGDSpec):
        return PGD(spec, input_range, seed)
    if isinstance(spec, GaussianSpec):
        return GaussianNoise(spec, input_range, seed)
    if isinstance(spec, LBFGSSpec):
        raise UnsupportedError(
            f"attack {spec.id}: box-constrained L-BFGS is validated but not supported yet in this "
            "version; remove it from 'attacks' or use fgsm / pgd / gaussian."
        )
    raise TypeError(f"unknown attack spec {spec!r}")
