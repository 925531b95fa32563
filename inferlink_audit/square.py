"""The Square attack: a score-based, gradient-free random search in the L∞ ball.

Andriushchenko, Croce, Flammarion, Hein, *Square Attack: a query-efficient black-box
adversarial attack via random search*, ECCV 2020 (Algorithm 1 and §3.1), with the constants
AutoAttack uses (Croce & Hein, ICML 2020: p_init = 0.8, the margin loss). It reads only the
model's logits, never a gradient, so a model that masks its gradients does not fool it: a
black-box attack stronger than the white-box ones is the classic sign of gradient masking.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attacks import Attack, AttackOutput
from .errors import UnsupportedError
from .spec import SquareSpec


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example z_y − max_{i≠y} z_i: negative exactly when the example is misclassified."""
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return logits.gather(1, y[:, None])[:, 0] - others


def square_fraction(p_init: float, step: int, queries: int) -> float:
    """The share p of the input a square covers at ``step``: the published schedule, halved at
    fixed iterations of a 10 000-query budget and rescaled to ``queries``."""
    at = int(step / queries * 10_000)
    for bound, divisor in (
        (10, 1),
        (50, 2),
        (200, 4),
        (500, 8),
        (1000, 16),
        (2000, 32),
        (4000, 64),
        (6000, 128),
        (8000, 256),
    ):
        if at <= bound:
            return p_init / divisor
    return p_init / 512


class Square(Attack):
    """Square attack, L∞ (Andriushchenko et al., ECCV 2020).

    Starts from vertical stripes of ±ε, then per iteration changes one random square window
    of every unbroken example to ±ε per channel and keeps the change when the margin loss
    falls. One query is one forward pass of one example; an example stops querying once it is
    misclassified, and uses at most ``queries`` (the start included). Inputs must be images
    ``[N, C, H, W]``. Departure from the authors' loop: a proposal that would leave the window
    unchanged is negated instead of redrawn, so every query changes the input.
    """

    spec: SquareSpec

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, offset: int
    ) -> AttackOutput:
        with torch.no_grad():
            clean_logits = model(x)
            active = clean_logits.argmax(1) == y
            adversarial, _ = self.perturb(model, x, y, active, offset=offset)
        return AttackOutput(adversarial, clean_logits)

    def perturb(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        active: torch.Tensor,
        *,
        offset: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attacked batch (inactive rows unchanged) and the queries each example used."""
        if x.dim() != 4:
            raise UnsupportedError(
                f"attack {self.spec.id}: the Square attack perturbs square windows of images "
                f"[N, C, H, W]; these inputs have shape {list(x.shape)}"
            )
        n, c, h, w = x.shape
        eps, budget = self.spec.eps, self.spec.queries
        with torch.no_grad():
            stripes = self._random("integers", n, (c, 1, w), offset=offset, like=x, stream=0)
            # One row of draws per iteration: window position (2) and the channel signs (c).
            draws = self._random(
                "uniform", n, (max(budget - 1, 1), 2 + c), offset=offset, like=x, stream=1
            )
            best = (x + eps * (2 * stripes.to(x.dtype) - 1)).clamp(self.lo, self.hi)
            used = torch.zeros(n, dtype=torch.long, device=x.device)
            loss = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
            index = active.nonzero()[:, 0]
            if index.numel():
                loss[index] = margin(model(best[index]), y[index])
                used[index] = 1
            rows = torch.arange(h, device=x.device)[:, None]
            cols = torch.arange(w, device=x.device)[None, :]
            for step in range(budget - 1):
                index = (active & (loss > 0)).nonzero()[:, 0]
                if index.numel() == 0:
                    break
                p = square_fraction(self.spec.p_init, step, budget)
                s = min(max(round(math.sqrt(p * h * w)), 1), max(min(h, w) - 1, 1))
                u = draws[index, step]
                top = (u[:, 0] * (h - s + 1)).long().clamp(max=h - s)
                left = (u[:, 1] * (w - s + 1)).long().clamp(max=w - s)
                window = (
                    (rows >= top[:, None, None])
                    & (rows < top[:, None, None] + s)
                    & (cols >= left[:, None, None])
                    & (cols < left[:, None, None] + s)
                )[:, None]
                signs = torch.where(u[:, 2:] < 0.5, -1.0, 1.0).to(x.dtype)[:, :, None, None]
                xi, current = x[index], best[index]
                proposal = self._propose(xi, current, window, signs)
                same = ((proposal - current).abs() < 1e-7).flatten(1).all(1)
                if same.any():
                    flipped = self._propose(xi[same], current[same], window[same], -signs[same])
                    proposal[same] = flipped
                new_loss = margin(model(proposal), y[index])
                used[index] += 1
                better = new_loss < loss[index]
                best[index[better]] = proposal[better]
                loss[index[better]] = new_loss[better]
        return torch.where(active[:, None, None, None], best, x), used

    def _propose(
        self, x: torch.Tensor, current: torch.Tensor, window: torch.Tensor, signs: torch.Tensor
    ) -> torch.Tensor:
        """``current`` with the window set to x ± ε per channel (inside the box)."""
        eps = self.spec.eps
        moved = torch.where(window, current + 2 * eps * signs, current)
        return torch.minimum(torch.maximum(moved, x - eps), x + eps).clamp(self.lo, self.hi)
