"""The Square attack: a score-based, gradient-free random search in the L∞ or L2 ball.

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
    """Square attack, L∞ or L2 (Andriushchenko et al., ECCV 2020).

    L∞: starts from vertical stripes of ±ε, then per iteration changes one random square
    window of every unbroken example to ±ε per channel. L2: starts from a grid of ±η tiles
    and per iteration moves the perturbation's mass from one random window into another
    with a new ±η pattern, at norm ε. Either keeps a change when the margin loss falls.

    One query is one forward pass of one example; an example stops querying once it is
    misclassified, and uses at most ``queries`` (the start included). Inputs must be images
    ``[N, C, H, W]``. Departure from the authors' loop: a proposal that would leave the window
    unchanged is negated instead of redrawn, so every query changes the input; and a window may
    sit at every position, the last row and column included (the authors' ``randint(0, h − s)``
    never reaches them, which on 8×8 digits leaves a border never attacked: there this Square
    leaves 41% accuracy at ε = 0.1 and 5000 queries, torchattacks' 56%, and this one with the
    authors' positions 56% too).
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
        budget = self.spec.queries
        with torch.no_grad():
            linf = self.spec.norm == "linf"
            # One row of draws per iteration: L∞ the window's position (2) and the channel
            # signs (c); L2 two windows' positions (4), a transposition (1) and the signs (c).
            draws = self._random(
                "uniform",
                n,
                (max(budget - 1, 1), (2 if linf else 5) + c),
                offset=offset,
                like=x,
                stream=1,
            )
            best = self._start(x, offset=offset)
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
                u = draws[index, step]
                if not linf:
                    # The authors' L2 side: odd, at least 3, here also at most the image.
                    side = max(round(math.sqrt(p * h * w)), 3)
                    side = min(side + 1 - side % 2, min(h, w))
                    proposal = self._propose_l2(x[index], best[index], u, side)
                    new_loss = margin(model(proposal), y[index])
                    used[index] += 1
                    better = new_loss < loss[index]
                    best[index[better]] = proposal[better]
                    loss[index[better]] = new_loss[better]
                    continue
                s = min(max(round(math.sqrt(p * h * w)), 1), max(min(h, w) - 1, 1))
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

    def _start(self, x: torch.Tensor, *, offset: int) -> torch.Tensor:
        """L∞: vertical stripes of ±ε. L2: a grid of tiles, each the ±η pattern of its side
        with a random sign per channel, scaled to norm ε."""
        n, c, h, w = x.shape
        eps = self.spec.eps
        if self.spec.norm == "linf":
            stripes = self._random("integers", n, (c, 1, w), offset=offset, like=x, stream=0)
            return (x + eps * (2 * stripes.to(x.dtype) - 1)).clamp(self.lo, self.hi)
        side = max(h // 5, 1)
        tiles_h, tiles_w = h // side, w // side
        signs = self._random("integers", n, (c, tiles_h, tiles_w), offset=offset, like=x)
        signs = 2 * signs.to(x.dtype) - 1
        pattern = eta(side, like=x)
        delta = torch.zeros_like(x)
        top0, left0 = (h - side * tiles_h) // 2, (w - side * tiles_w) // 2
        for i in range(tiles_h):
            for j in range(tiles_w):
                top, left = top0 + i * side, left0 + j * side
                delta[:, :, top : top + side, left : left + side] = (
                    pattern * signs[:, :, i, j, None, None]
                )
        return (x + _unit_l2(delta) * eps).clamp(self.lo, self.hi)

    def _propose_l2(
        self, x: torch.Tensor, current: torch.Tensor, u: torch.Tensor, side: int
    ) -> torch.Tensor:
        """The L2 update (Andriushchenko et al. 2020, Algorithm 3): a new ±η pattern added to
        the first window's normalised content, the second window's mass moved into the first,
        the whole perturbation rescaled to norm ε."""
        n, c, h, w = x.shape
        eps = self.spec.eps
        delta = current - x
        first = _window(u[:, 0], u[:, 1], side, h, w)
        second = _window(u[:, 2], u[:, 3], side, h, w)
        rows, cols = _window_indices(u[:, 0], u[:, 1], side, h, w)
        old = delta[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        old_norm = old.flatten(2).norm(dim=2)[:, :, None, None]  # per channel
        image_norm = delta.flatten(1).norm(dim=1)[:, None, None, None]
        windows_norm = (delta * (first | second)).flatten(1).norm(dim=1)[:, None, None, None]
        pattern = eta(side, like=x)
        pattern = torch.where(u[:, 4, None, None] < 0.5, pattern, pattern.T)[:, None]
        signs = torch.where(u[:, 5:] < 0.5, -1.0, 1.0).to(x.dtype)[:, :, None, None]
        new = pattern * signs + old / (old_norm + 1e-12)
        room = ((eps**2 - image_norm**2).clamp_min(0) / c + windows_norm**2).sqrt()
        new = new / (new.flatten(2).norm(dim=2)[:, :, None, None] + 1e-12) * room
        delta = delta.masked_fill(second, 0.0)
        delta[torch.arange(n)[:, None, None], :, rows, cols] = new.permute(0, 2, 3, 1)
        return (x + _unit_l2(delta) * eps).clamp(self.lo, self.hi)

    def _propose(
        self, x: torch.Tensor, current: torch.Tensor, window: torch.Tensor, signs: torch.Tensor
    ) -> torch.Tensor:
        """``current`` with the window set to x ± ε per channel (inside the box)."""
        eps = self.spec.eps
        moved = torch.where(window, current + 2 * eps * signs, current)
        return torch.minimum(torch.maximum(moved, x - eps), x + eps).clamp(self.lo, self.hi)


def _unit_l2(t: torch.Tensor) -> torch.Tensor:
    return t / (t.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)


def _window_indices(
    u_top: torch.Tensor, u_left: torch.Tensor, side: int, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the row and column indices ([n, side, 1], [n, 1, side]) of a window."""
    top = (u_top * (h - side + 1)).long().clamp(max=h - side)
    left = (u_left * (w - side + 1)).long().clamp(max=w - side)
    span = torch.arange(side, device=u_top.device)
    return (top[:, None] + span)[:, :, None], (left[:, None] + span)[:, None, :]


def _window(u_top: torch.Tensor, u_left: torch.Tensor, side: int, h: int, w: int) -> torch.Tensor:
    """Per example, a [n, 1, h, w] mask of the window the draws place."""
    rows, cols = _window_indices(u_top, u_left, side, h, w)
    mask = torch.zeros(u_top.shape[0], h, w, dtype=torch.bool, device=u_top.device)
    mask[torch.arange(u_top.shape[0])[:, None, None], rows, cols] = True
    return mask[:, None]


def _rectangles(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """Concentric rectangles weighted 1/(k + 1)², unit L2 norm (the authors' eta_rectangles)."""
    out = torch.zeros(rows, cols, dtype=like.dtype, device=like.device)
    top, left = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        out[
            max(top, 0) : min(top + 2 * k + 1, rows), max(left, 0) : min(left + 2 * k + 1, cols)
        ] += 1.0 / (k + 1) ** 2
        top, left = top - 1, left - 1
    return out / out.norm().clamp_min(1e-12)


def eta(side: int, like: torch.Tensor) -> torch.Tensor:
    """The L2 square's pattern: +rectangles on its upper half, −rectangles on the lower,
    unit norm (Andriushchenko et al. 2020, §3.2)."""
    pattern = torch.zeros(side, side, dtype=like.dtype, device=like.device)
    if side // 2:
        pattern[: side // 2] = _rectangles(side // 2, side, like)
    pattern[side // 2 :] = -_rectangles(side - side // 2, side, like)
    return pattern / pattern.norm().clamp_min(1e-12)
