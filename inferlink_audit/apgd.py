"""Auto-PGD: projected gradient ascent whose step size, momentum and restarts need no tuning.

Croce & Hein, *Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks*, ICML 2020 (Algorithm 1, §3). The step size starts at 2ε and is
halved at checkpoints w₀ = 0, w₁ = 0.22·N, wⱼ₊₁ = wⱼ + max(wⱼ − wⱼ₋₁ − 0.03·N, 0.06·N) when

1. the loss increased in at most ρ = 0.75 of the steps since the last checkpoint, or
2. the step size was not halved at the last checkpoint and the best loss has not improved
   since then;

a halving restarts from the best point found so far. Each step mixes the projected gradient
step with the last move (momentum α = 0.75; none on the first step). The attack returns, per
example, a misclassified point when it found one, else the point of highest loss.

Losses: cross-entropy, or the difference of logits ratio (DLR), which is invariant to shifts
and positive rescaling of the logits, so a saturated softmax cannot hide the gradient:
DLR(z, y) = −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3), π the logits sorted in decreasing order.
Targeted DLR for target t: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2), run once per target among
the top ``target_classes`` classes other than the label.

Every example is its own problem (its own step size, checkpoints and best point); examples
only share the network's forward and backward passes, so results do not depend on the batch.
The constants follow the authors' code (github.com/fra31/auto-attack), including its "≤ ρ"
in condition 1 and its counting of condition 2 as met at no first checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import Attack, AttackOutput
from .errors import UnsupportedError
from .spec import APGDSpec

RHO = 0.75  # condition 1: share of the steps that must have increased the loss
MOMENTUM = 0.75
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example vector shaped to broadcast against a batch like ``like``."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def ce_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per example: CE to the label (ascended), or minus CE to the target when targeted."""
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, target, reduction="none")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per example, the difference of logits ratio (untargeted or targeted) of Croce & Hein."""
    ordered, _ = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None])[:, 0]
    if target is None:
        others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        return -(z_y - others) / (ordered[:, 0] - ordered[:, 2] + 1e-12)
    z_t = logits.gather(1, target[:, None])[:, 0]
    scale = ordered[:, 0] - (ordered[:, 2] + ordered[:, 3]) / 2 + 1e-12
    return -(z_y - z_t) / scale


LOSSES: dict[str, Loss] = {"ce": ce_loss, "dlr": dlr_loss}


def checkpoints(steps: int) -> list[int]:
    """The steps (1-based counts) after which the step-size rule is checked."""
    first, least, shrink = (
        max(int(0.22 * steps), 1),
        max(int(0.06 * steps), 1),
        max(int(0.03 * steps), 1),
    )
    marks, at, length = [], 0, first
    while at + length <= steps:
        at += length
        marks.append(at)
        length = max(length - shrink, least)
    return marks


@dataclass
class APGDRun:
    """What one APGD run found for the examples it attacked.

    ``losses`` holds each example's loss at the start and after every step
    (``[steps + 1, n]``), for the convergence indicator.
    """

    adversarial: torch.Tensor  # misclassified point where found, else the highest-loss point
    broken: torch.Tensor  # bool per example: a misclassified point was found
    best_loss: torch.Tensor
    losses: torch.Tensor


class APGD(Attack):
    """Auto-PGD with the CE or DLR loss, L∞ or L2, optionally targeted (APGD-T).

    Croce & Hein, *Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks*, ICML 2020. Only examples the model classifies correctly are
    attacked (others are returned unchanged), and each restart or target runs only on the
    examples no earlier run broke. Cost per call: one clean forward pass, then for every run
    ``steps + 1`` forward-backward passes over the examples still unbroken.
    """

    spec: APGDSpec

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, offset: int
    ) -> AttackOutput:
        with torch.no_grad():
            clean_logits = model(x)
        active = clean_logits.argmax(1) == y
        adversarial, _ = self.perturb(model, x, y, clean_logits, active, offset=offset)
        return AttackOutput(adversarial, clean_logits)

    def perturb(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        clean_logits: torch.Tensor,
        active: torch.Tensor,
        *,
        offset: int,
    ) -> tuple[torch.Tensor, list[APGDRun]]:
        """Attack the rows of ``x`` (examples ``offset ..``) where ``active`` holds.

        Returns the adversarial batch (inactive rows unchanged) and every run's record.
        """
        spec = self.spec
        classes = clean_logits.shape[1]
        need = 4 if spec.targeted and spec.loss == "dlr" else 3 if spec.loss == "dlr" else 2
        if classes < need:
            raise UnsupportedError(
                f"attack {spec.id}: the {'targeted ' if spec.targeted else ''}DLR loss needs at "
                f"least {need} classes; the model has {classes} outputs (use loss: ce)"
            )
        best = x.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=x.dtype)
        robust = active.clone()
        targets: list[int | None] = [None]
        if spec.targeted:
            targets = list(range(1, min(spec.target_classes, classes - 1) + 1))
        ranking = clean_logits.argsort(dim=1, descending=True)
        records: list[APGDRun] = []
        for restart in range(spec.restarts):
            for rank in targets:
                if not robust.any():
                    return best, records
                start = self._start(x, offset=offset, stream=restart * 1000 + (rank or 0))
                index = robust.nonzero()[:, 0]
                target = None if rank is None else self._target(ranking, y, rank)[index]
                run = self.single_run(model, x[index], y[index], start[index], target)
                records.append(run)
                better = run.broken | (run.best_loss > best_loss[index])
                best[index[better]] = run.adversarial[better]
                best_loss[index[better]] = run.best_loss[better]
                robust[index[run.broken]] = False
        return best, records

    @staticmethod
    def _target(ranking: torch.Tensor, y: torch.Tensor, rank: int) -> torch.Tensor:
        """The ``rank``-th most likely class other than the label (1: the runner-up)."""
        others = ranking[ranking != y[:, None]].view(y.shape[0], -1)
        return others[:, rank - 1]

    def _start(self, x: torch.Tensor, *, offset: int, stream: int) -> torch.Tensor:
        """A random point on the ε-sphere of the norm (as the authors' code draws it), clipped."""
        n, shape, eps = x.shape[0], tuple(x.shape[1:]), self.spec.eps
        if self.spec.norm == "linf":
            t = self._random("uniform", n, shape, offset=offset, like=x, stream=stream) * 2 - 1
            t = t / _view(t.flatten(1).abs().amax(1).clamp_min(1e-12), t)
        else:
            t = self._random("normal", n, shape, offset=offset, like=x, stream=stream)
            t = t / _view(_norm(t).clamp_min(1e-12), t)
        return (x + eps * t).clamp(self.lo, self.hi)

    def _project(self, x: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        """``point`` moved into the ε-ball around ``x`` and the input box."""
        eps = self.spec.eps
        if self.spec.norm == "linf":
            point = torch.minimum(torch.maximum(point, x - eps), x + eps)
        else:
            delta = point - x
            length = _norm(delta)
            scale = (eps / length.clamp_min(1e-12)).clamp(max=1.0)
            point = x + delta * _view(scale, delta)
        return point.clamp(self.lo, self.hi)

    def _step(self, point: torch.Tensor, grad: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        if self.spec.norm == "linf":
            return point + _view(size, point) * grad.sign()
        return point + _view(size, point) * grad / _view(_norm(grad).clamp_min(1e-12), grad)

    def _loss_and_grad(
        self, model: nn.Module, point: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        point = point.detach().requires_grad_(True)
        logits = model(point)
        loss = LOSSES[self.spec.loss](logits, y, target)
        # The sum's gradient is each example's own: the examples' losses share no terms.
        (grad,) = torch.autograd.grad(loss.sum(), point)
        return loss.detach(), grad.detach(), logits.detach()

    def single_run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        start: torch.Tensor,
        target: torch.Tensor | None,
    ) -> APGDRun:
        """Algorithm 1 of Croce & Hein from ``start``, for every row at once."""
        steps = self.spec.steps
        marks = set(checkpoints(steps))
        point = start
        loss, grad, logits = self._loss_and_grad(model, point, y, target)
        broken = logits.argmax(1) != y
        found = point.clone()  # a misclassified point per example, once there is one
        best, best_grad, best_loss = point.clone(), grad.clone(), loss.clone()
        size = torch.full_like(loss, 2 * self.spec.eps)
        history = [loss]
        last_check, best_at_check = 0, best_loss.clone()
        halved_at_check = torch.ones_like(broken)
        previous = point
        for i in range(steps):
            momentum = MOMENTUM if i > 0 else 1.0
            move = point - previous
            previous = point
            z = self._project(x, self._step(point, grad, size))
            point = self._project(x, point + momentum * (z - point) + (1 - momentum) * move)
            loss, grad, logits = self._loss_and_grad(model, point, y, target)
            wrong = logits.argmax(1) != y
            found[wrong] = point[wrong]
            broken |= wrong
            history.append(loss)
            improved = loss > best_loss
            best[improved], best_grad[improved] = point[improved], grad[improved]
            best_loss = torch.where(improved, loss, best_loss)
            if i + 1 in marks:
                window = torch.stack(history[last_check:])
                increases = (window[1:] > window[:-1]).sum(0)
                oscillating = increases <= RHO * (i + 1 - last_check)
                stalled = ~halved_at_check & (best_at_check >= best_loss)
                halve = oscillating | stalled
                size = torch.where(halve, size / 2, size)
                point = torch.where(_view(halve, point), best, point)
                grad = torch.where(_view(halve, grad), best_grad, grad)
                halved_at_check, best_at_check, last_check = halve, best_loss.clone(), i + 1
        adversarial = torch.where(_view(broken, x), found, best)
        return APGDRun(adversarial, broken, best_loss, torch.stack(history))
