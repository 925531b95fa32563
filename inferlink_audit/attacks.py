"""External stress (DESIGN §1.5): adversarial and noise attacks in input space [lo, hi].

Every attack is batched, puts the model in eval mode, never changes its weights or mode, and
returns the adversarial inputs together with the clean logits when it computed them anyway
(FGSM's forward pass gives both the gradient and the clean prediction, which lets the sweep
engine spend three passes per variant instead of four). Randomness is drawn per example
(in fixed chunks of the data, each from its own seeded generator), so a run is reproducible,
every filtered network sees the same noise, and the numbers do not depend on the batch size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, final

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize as scipy_minimize
from torch import nn

from .errors import UnsupportedError
from .spec import AttackSpec, FGSMSpec, GaussianSpec, LBFGSSpec, PGDSpec

EXAMPLE_CHUNK = 64  # examples per seeded draw, and per joint L-BFGS problem


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
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, offset: int = 0
    ) -> AttackOutput:
        """Attack the examples ``offset, offset + 1, ...`` of the data (``x`` is that slice)."""
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                out = self.run(model, x.detach(), y, offset=offset)
        finally:
            model.train(was_training)
        return AttackOutput(out.adversarial.detach(), out.clean_logits)

    @abstractmethod
    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, offset: int
    ) -> AttackOutput: ...

    def _random(
        self,
        kind: Literal["uniform", "normal", "integers"],
        count: int,
        shape: tuple[int, ...],
        *,
        offset: int,
        like: torch.Tensor,
        stream: int = 0,
        high: int = 2,
    ) -> torch.Tensor:
        """Random values for examples ``offset .. offset + count - 1``, each of ``shape``.

        They are drawn in chunks of ``EXAMPLE_CHUNK`` examples of the data, chunk ``c`` from a
        generator seeded by (seed, stream, c), so an example gets the same values whatever
        the batch it falls in. ``stream`` keeps independent draws of one attack apart.
        """
        device, dtype = like.device, like.dtype
        first, last = offset // EXAMPLE_CHUNK, (offset + count - 1) // EXAMPLE_CHUNK
        parts = []
        for chunk in range(first, last + 1):
            seed = int(np.random.SeedSequence([self.seed, stream, chunk]).generate_state(1)[0])
            gen = torch.Generator(device=device).manual_seed(seed)
            size = (EXAMPLE_CHUNK, *shape)
            if kind == "uniform":
                block = torch.rand(size, generator=gen, device=device, dtype=dtype)
            elif kind == "normal":
                block = torch.randn(size, generator=gen, device=device, dtype=dtype)
            else:
                block = torch.randint(0, high, size, generator=gen, device=device)
            base = chunk * EXAMPLE_CHUNK
            lo, hi = max(offset, base) - base, min(offset + count, base + EXAMPLE_CHUNK) - base
            parts.append(block[lo:hi])
        return torch.cat(parts)


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
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, offset: int
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
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, offset: int
    ) -> AttackOutput:
        eps, step = self.spec.eps, self.spec.effective_step_size
        linf = self.spec.norm == "linf"
        delta = torch.zeros_like(x)
        if self.spec.random_start:
            n, shape = x.shape[0], tuple(x.shape[1:])
            if linf:
                delta = (self._random("uniform", n, shape, offset=offset, like=x) * 2 - 1) * eps
            else:
                direction = self._random("normal", n, shape, offset=offset, like=x)
                radius = self._random("uniform", n, (), offset=offset, like=x, stream=1)
                radius = radius.view(-1, *([1] * (x.dim() - 1)))
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
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, offset: int
    ) -> AttackOutput:
        noise = self._random("normal", x.shape[0], tuple(x.shape[1:]), offset=offset, like=x)
        return AttackOutput((x + self.spec.sigma * noise).clamp(self.lo, self.hi), None)


class BoxLBFGS(Attack):
    """Box-constrained L-BFGS: minimise c·‖r‖₂² + CE(f(x + r), target) with x + r in the box.

    Szegedy et al., *Intriguing properties of neural networks*, ICLR 2014, §4.1. The squared
    norm keeps the objective smooth at r = 0. c is searched per example (a bracketing search
    in log space): the largest c whose minimiser still reaches the target class gives the
    smallest distortion found. Examples that never reach their target are returned unchanged.
    The examples of each chunk of ``EXAMPLE_CHUNK`` examples of the data are optimised
    jointly (their objectives are independent, so the sum's minimiser is every example's
    minimiser) by SciPy's L-BFGS-B with the box as bounds; the chunks are fixed by the
    examples' positions, so batch sizes that are multiples of the chunk give the same numbers.
    """

    spec: LBFGSSpec
    searches = 6  # values of c tried per example
    initial_c = 1.0

    def _targets(self, y: torch.Tensor, classes: int, offset: int) -> torch.Tensor:
        target = self.spec.target
        if target == "next":
            return (y + 1) % classes
        if target == "random":
            shift = 1 + self._random(
                "integers", y.shape[0], (), offset=offset, like=y.cpu(), high=classes - 1
            )
            return (y + shift.to(y.device)) % classes
        return torch.full_like(y, int(target))

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, offset: int
    ) -> AttackOutput:
        with torch.no_grad():
            clean_logits = model(x)
        classes = clean_logits.shape[1]
        if not isinstance(self.spec.target, str) and int(self.spec.target) >= classes:
            raise UnsupportedError(
                f"attack {self.spec.id}: target class {self.spec.target} does not exist; the "
                f"model has {classes} outputs"
            )
        target = self._targets(y, classes, offset)
        best = x.clone()
        start, n = 0, x.shape[0]
        while start < n:
            stop = min(n, ((offset + start) // EXAMPLE_CHUNK + 1) * EXAMPLE_CHUNK - offset)
            best[start:stop] = self._search(model, x[start:stop], target[start:stop])
            start = stop
        return AttackOutput(best.clamp(self.lo, self.hi), clean_logits)

    def _search(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per example, the least distorted input found that reaches its target (x if none)."""
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
        return best

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
