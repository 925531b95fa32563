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

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize as scipy_minimize
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


class BoxLBFGS(Attack):
    """Box-constrained L-BFGS: minimise c·‖r‖₂² + CE(f(x + r), target) with x + r in the box.

    Szegedy et al., *Intriguing properties of neural networks*, ICLR 2014, §4.1. The squared
    norm keeps the objective smooth at r = 0. c is searched per example (a bracketing search
    in log space): the largest c whose minimiser still reaches the target class gives the
    smallest distortion found. Examples that never reach their target are returned unchanged.
    The examples of a batch are optimised jointly (their objectives are independent, so the
    sum's minimiser is every example's minimiser) by SciPy's L-BFGS-B with the box as bounds.
    """

    spec: LBFGSSpec
    searches = 6  # values of c tried per example
    initial_c = 1.0

    def _targets(self, y: torch.Tensor, classes: int, batch_index: int) -> torch.Tensor:
        target = self.spec.target
        if target == "next":
            return (y + 1) % classes
        if target == "random":
            gen = self._generator(torch.device("cpu"), batch_index)
            shift = torch.randint(1, classes, y.shape, generator=gen).to(y.device)
            return (y + shift) % classes
        return torch.full_like(y, int(target))

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_index: int
    ) -> AttackOutput:
        with torch.no_grad():
            clean_logits = model(x)
        classes = clean_logits.shape[1]
        if not isinstance(self.spec.target, str) and int(self.spec.target) >= classes:
            raise UnsupportedError(
                f"attack {self.spec.id}: target class {self.spec.target} does not exist; the "
                f"model has {classes} outputs"
            )
        target = self._targets(y, classes, batch_index)
        n = x.shape[0]
        c = np.full(n, self.initial_c)
        low = np.zeros(n)  # largest c known to succeed (0: none yet)
        high = np.full(n, np.inf)  # smallest c known to fail
        best = x.clone()
        best_norm = np.full(n, np.inf)
        lo_bound = (self.lo - x).detach().double().cpu().numpy().ravel()
        hi_bound = (self.hi - x).detach().double().cpu().numpy().ravel()
        bounds = np.stack([lo_bound, hi_bound], axis=1)
        for _ in range(self.searches):
            r = self._minimise(model, x, target, c, bounds)
            with torch.no_grad():
                hit = (model(x + r).argmax(1) == target).cpu().numpy()
            norms = r.flatten(1).norm(dim=1).cpu().numpy()
            better = hit & (norms < best_norm)
            if better.any():
                index = torch.from_numpy(better).to(x.device)
                best[index] = (x + r)[index]
                best_norm[better] = norms[better]
            low = np.where(hit, np.maximum(low, c), low)
            high = np.where(hit, high, np.minimum(high, c))
            c = np.where(
                np.isinf(high), c * 10.0, np.where(low == 0, c / 10.0, np.sqrt(low * high))
            )
        return AttackOutput(best.clamp(self.lo, self.hi), clean_logits)

    def _minimise(
        self,
        model: nn.Module,
        x: torch.Tensor,
        target: torch.Tensor,
        c: np.ndarray,
        bounds: np.ndarray,
    ) -> torch.Tensor:
        weight = torch.as_tensor(c, dtype=x.dtype, device=x.device)

        def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
            r = torch.from_numpy(flat).to(x.device, x.dtype).view_as(x).requires_grad_(True)
            distortion = (weight * r.flatten(1).pow(2).sum(1)).sum()
            loss = distortion + F.cross_entropy(model(x + r), target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, r)
            return float(loss.detach()), grad.detach().double().cpu().numpy().ravel()

        solution = scipy_minimize(
            objective,
            np.zeros(x.numel()),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": self.spec.max_iter},
        )
        return torch.from_numpy(solution.x).to(x.device, x.dtype).view_as(x)


def build_attack(spec: AttackSpec, input_range: tuple[float, float], seed: int) -> Attack:
    """The attack a spec entry names."""
    if isinstance(spec, FGSMSpec):
        return FGSM(spec, input_range, seed)
    if isinstance(spec, PGDSpec):
        return PGD(spec, input_range, seed)
    if isinstance(spec, GaussianSpec):
        return GaussianNoise(spec, input_range, seed)
    if isinstance(spec, LBFGSSpec):
        return BoxLBFGS(spec, input_range, seed)
    raise TypeError(f"unknown attack spec {spec!r}")
