"""External stress (docs/method.md §5): adversarial and noise attacks in input space [lo, hi].

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
from torch import nn

from .devices import generator_device, mark_step
from .errors import UnsupportedError
from .spec import AttackSpec, FGSMSpec, GaussianSpec, LBFGSSpec, PGDSpec

EXAMPLE_CHUNK = 64  # examples per seeded draw


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
        # Every submodule's own mode, so a model left partly in eval mode comes back so.
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            with torch.enable_grad():
                out = self.run(model, x.detach(), y, offset=offset)
        finally:
            for module, training in modes:
                module.training = training
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
        # On XLA the values are drawn on the CPU and moved (``generator_device``).
        device, dtype = generator_device(like.device), like.dtype
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
        return torch.cat(parts).to(like.device)


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
            mark_step(x.device)  # one XLA graph per step, not one growing over all steps
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

    Every example is its own optimisation problem, with its own iteration count (``max_iter``
    per example), curvature memory, line search and convergence test, so its result does not
    depend on the examples it is batched with; the problems only share the network's forward
    and backward passes. The optimiser is a projected L-BFGS in the spirit of L-BFGS-B (Byrd,
    Lu, Nocedal, Zhu, *A limited memory algorithm for bound constrained optimization*, SIAM J.
    Sci. Comput. 16, 1995) in the simpler active-set form of Kim, Sra, Dhillon (*Tackling
    box-constrained optimization via a new projected quasi-Newton approach*, SIAM J. Sci.
    Comput. 32, 2010): coordinates at a bound whose gradient points out of the box are held,
    the quasi-Newton direction is taken on the others, and a backtracking Armijo search runs
    along the projection onto the box. Its constants are SciPy's L-BFGS-B defaults; on smooth
    problems it reaches SciPy's per-example minimum to float precision, without SciPy's Python
    overhead per example and iteration. Bit for bit, an example's result is the same alone or
    batched wherever the network's own batched kernels are (floating-point rounding of
    batched matrix products can differ in the last bits).
    """

    spec: LBFGSSpec
    searches = 6  # values of c tried per example
    initial_c = 1.0
    memory = 10  # correction pairs kept per example (SciPy's m)
    max_backtracks = 20  # trials per line search (SciPy's max_ls)
    pgtol = 1e-5  # stop when the projected gradient's largest entry is this small
    ftol = 1e7 * float(np.finfo(float).eps)  # ... or the objective's relative decrease (factr)
    armijo = 1e-4  # sufficient decrease of the line search

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
        # Slices only bound the optimiser's memory (curvature pairs per example); every
        # example's problem is independent of the others in its slice.
        for start in range(0, x.shape[0], EXAMPLE_CHUNK):
            part = slice(start, start + EXAMPLE_CHUNK)
            best[part] = self._search(model, x[part], target[part])
        return AttackOutput(best.clamp(self.lo, self.hi), clean_logits)

    def _search(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per example, the least distorted input found that reaches its target (x if none)."""
        n = x.shape[0]
        c = np.full(n, self.initial_c)
        low = np.zeros(n)  # largest c known to succeed (0: none yet)
        high = np.full(n, np.inf)  # smallest c known to fail
        best = x.clone()
        best_norm = np.full(n, np.inf)
        for _ in range(self.searches):
            r = self._minimise(model, x, target, torch.as_tensor(c, dtype=x.dtype).to(x.device))
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

    def _objective(
        self,
        model: nn.Module,
        x: torch.Tensor,
        target: torch.Tensor,
        c: torch.Tensor,
        r: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's objective and its gradient in r (rows of the flattened inputs)."""
        r = r.detach().view_as(x).requires_grad_(True)
        logits = model(x + r)
        f = c * r.flatten(1).pow(2).sum(1) + F.cross_entropy(logits, target, reduction="none")
        # The sum's gradient is every example's own gradient: the objectives share no terms.
        (grad,) = torch.autograd.grad(f.sum(), r)
        return f.detach(), grad.flatten(1)

    def _minimise(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, c: torch.Tensor
    ) -> torch.Tensor:
        """Every example's minimiser of its objective in the box, each found on its own.

        Each round evaluates one point per unfinished example in a single batched pass: the
        next trial of its line search, or the first trial along its new direction once its
        last step was accepted. So an example that backtracks never holds up the others.
        """
        lo, hi = (self.lo - x).flatten(1), (self.hi - x).flatten(1)
        f, g = self._objective(model, x, target, c, torch.zeros_like(lo))
        state = _Problems.start(lo, hi, f, g, self.memory)
        state.active = ~self._converged(state, state.everyone)
        while True:
            rows, trial, decrease = self._trials(state)
            if rows.numel() == 0:
                return state.r.view_as(x)
            f_trial, g_trial = self._objective(model, x[rows], target[rows], c[rows], trial)
            ok = torch.isfinite(f_trial) & (f_trial <= state.f[rows] + self.armijo * decrease)
            self._backtrack(state, rows[~ok], f_trial[~ok], decrease[~ok])
            self._accept(state, rows[ok], trial[ok], f_trial[ok], g_trial[ok])

    def _trials(self, state: _Problems) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unfinished examples, their trial points and each step's predicted change.

        A step whose predicted gain is below what the objective can resolve could only pass
        the sufficient-decrease test by rounding: that example stops where it is.
        """
        rows = state.everyone[state.active]
        r = state.r[rows]
        trial = (r + state.alpha[rows, None] * state.direction[rows]).clamp(
            state.lo[rows], state.hi[rows]
        )
        decrease = (state.g[rows] * (trial - r)).sum(1)
        resolution = torch.finfo(r.dtype).eps * state.f[rows].abs().clamp_min(1)
        hopeless = -decrease <= resolution
        state.active[rows[hopeless]] = False
        return rows[~hopeless], trial[~hopeless], decrease[~hopeless]

    def _backtrack(
        self, state: _Problems, rows: torch.Tensor, f_trial: torch.Tensor, decrease: torch.Tensor
    ) -> None:
        """Shrink rejected steps by the minimiser of the quadratic through f(r), its slope and
        f(trial), kept within [0.1, 0.5] of the step (Nocedal & Wright §3.5)."""
        curvature = f_trial - state.f[rows] - decrease
        shrink = -decrease / (2 * curvature).clamp_min(1e-30)
        state.alpha[rows] *= shrink.nan_to_num(0.1).clamp(0.1, 0.5)
        state.backtracks[rows] += 1
        state.active[rows[state.backtracks[rows] >= self.max_backtracks]] = False

    def _accept(
        self,
        state: _Problems,
        rows: torch.Tensor,
        trial: torch.Tensor,
        f_trial: torch.Tensor,
        g_trial: torch.Tensor,
    ) -> None:
        """Move accepted examples, record their curvature pairs, and stop them or give them
        their next direction."""
        if rows.numel() == 0:
            return
        f_old = state.f[rows]
        state.push_pair(rows, trial - state.r[rows], g_trial - state.g[rows])
        state.r[rows], state.f[rows], state.g[rows] = trial, f_trial, g_trial
        state.iterations[rows] += 1
        # SciPy's relative-decrease test, no finer than the float type can tell.
        ftol = max(self.ftol, torch.finfo(f_old.dtype).eps)
        scale = torch.maximum(f_old.abs(), f_trial.abs()).clamp_min(1)
        done = ((f_old - f_trial) <= ftol * scale) | self._converged(state, rows)
        state.active[rows[done]] = False
        going = rows[~done]
        if going.numel():
            state.direction[going] = state.direction_for(going)
            state.alpha[going] = 1.0
            state.backtracks[going] = 0

    def _converged(self, state: _Problems, rows: torch.Tensor) -> torch.Tensor:
        """Per example: projected gradient below ``pgtol`` or ``max_iter`` iterations done."""
        r, g = state.r[rows], state.g[rows]
        projected = (r - g).clamp(state.lo[rows], state.hi[rows]) - r
        return (projected.abs().amax(1) <= self.pgtol) | (
            state.iterations[rows] >= self.spec.max_iter
        )


@dataclass
class _Problems:
    """The state of independent box-constrained L-BFGS problems, one row per example."""

    lo: torch.Tensor  # bounds on r
    hi: torch.Tensor
    r: torch.Tensor  # current iterate, its objective and gradient
    f: torch.Tensor
    g: torch.Tensor
    s_hist: torch.Tensor  # curvature pairs, oldest first; an empty slot has rho 0
    y_hist: torch.Tensor
    rho: torch.Tensor
    direction: torch.Tensor
    alpha: torch.Tensor  # the step being tried along direction
    iterations: torch.Tensor
    backtracks: torch.Tensor
    active: torch.Tensor
    everyone: torch.Tensor

    @classmethod
    def start(
        cls, lo: torch.Tensor, hi: torch.Tensor, f: torch.Tensor, g: torch.Tensor, memory: int
    ) -> _Problems:
        """Problems at r = 0 with objective ``f`` and gradient ``g`` there."""
        n, device = lo.shape[0], lo.device
        history = torch.zeros(n, memory, lo.shape[1], dtype=lo.dtype, device=device)
        counts = torch.zeros(n, dtype=torch.long, device=device)
        state = cls(
            lo=lo,
            hi=hi,
            r=torch.zeros_like(lo),
            f=f,
            g=g,
            s_hist=history,
            y_hist=history.clone(),
            rho=torch.zeros(n, memory, dtype=lo.dtype, device=device),
            direction=torch.zeros_like(lo),
            alpha=torch.ones(n, dtype=lo.dtype, device=device),
            iterations=counts,
            backtracks=counts.clone(),
            active=torch.ones(n, dtype=torch.bool, device=device),
            everyone=torch.arange(n, device=device),
        )
        state.direction = state.direction_for(state.everyone)
        return state

    def push_pair(self, rows: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        """Keep (s, y) as the newest pair of each row where its curvature is positive."""
        sy = (s * y).sum(1)
        keep = sy > 1e-10 * (y * y).sum(1)
        kept = rows[keep]
        if kept.numel():
            self.s_hist[kept] = torch.cat([self.s_hist[kept, 1:], s[keep, None]], dim=1)
            self.y_hist[kept] = torch.cat([self.y_hist[kept, 1:], y[keep, None]], dim=1)
            self.rho[kept] = torch.cat([self.rho[kept, 1:], (1 / sy[keep])[:, None]], dim=1)

    def direction_for(self, rows: torch.Tensor) -> torch.Tensor:
        """The quasi-Newton direction on the coordinates free to move (others held at their
        bound); steepest descent of unit length when there is no curvature pair yet or the
        pairs give no descent, as L-BFGS-B starts."""
        r, g = self.r[rows], self.g[rows]
        held = ((r <= self.lo[rows]) & (g > 0)) | ((r >= self.hi[rows]) & (g < 0))
        free_g = g.masked_fill(held, 0)
        rho = self.rho[rows]
        direction = -_two_loop(free_g, self.s_hist[rows], self.y_hist[rows], rho)
        direction = direction.masked_fill(held, 0)
        fresh = (rho == 0).all(1) | ((direction * g).sum(1) >= 0)
        unit = free_g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.where(fresh[:, None], -free_g / unit, direction)


def _two_loop(
    g: torch.Tensor, s_hist: torch.Tensor, y_hist: torch.Tensor, rho: torch.Tensor
) -> torch.Tensor:
    """H·g per example by the L-BFGS two-loop recursion (Nocedal & Wright, Algorithm 7.4).

    Pairs are stored oldest first; an empty slot has ρ = 0 and adds nothing, so examples
    with different numbers of pairs share one batched computation.
    """
    m = rho.shape[1]
    q = g.clone()
    alphas = []
    for i in reversed(range(m)):
        a = rho[:, i] * (s_hist[:, i] * q).sum(1)
        q -= a[:, None] * y_hist[:, i]
        alphas.append(a)
    sy = (s_hist[:, -1] * y_hist[:, -1]).sum(1)
    yy = (y_hist[:, -1] * y_hist[:, -1]).sum(1)
    gamma = torch.where(yy > 0, sy / yy.clamp_min(1e-30), torch.ones_like(yy))
    z = gamma[:, None] * q
    for i in range(m):
        b = rho[:, i] * (y_hist[:, i] * z).sum(1)
        z += (alphas[m - 1 - i] - b)[:, None] * s_hist[:, i]
    return z
