"""AutoAttack: a fixed ensemble of parameter-free attacks, the worst case per example.

Croce & Hein, *Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks*, ICML 2020. The components run in order, each only on the examples
that every earlier component left correctly classified; an example counts as robust only if
all of them fail on it.

* ``standard``: APGD-CE (100 steps), APGD-T (targeted DLR, 100 steps, the 9 most likely other
  classes), and the Square attack (5000 queries, L∞ or L2). The published ensemble also runs
  FAB-T; it is not implemented here, and the authors report it rarely breaks an example the
  other three leave (Croce & Hein 2020, Table 2).
* ``fast``: APGD-CE and APGD-DLR (untargeted), 100 steps each: gradient attacks only, about a
  tenth of the cost of ``standard``.
"""

from __future__ import annotations

import torch
from torch import nn

from .apgd import APGD
from .attacks import Attack, AttackOutput
from .spec import APGDSpec, AutoAttackSpec, SquareSpec
from .square import Square

STEPS = 100
TARGETS = 9
SQUARE_QUERIES = 5000


def components(spec: AutoAttackSpec, input_range: tuple[float, float], seed: int) -> list[Attack]:
    """The ensemble's attacks, in the order they run."""
    ce = APGDSpec(eps=spec.eps, norm=spec.norm, loss="ce", steps=STEPS)
    if spec.version == "fast":
        dlr = APGDSpec(eps=spec.eps, norm=spec.norm, loss="dlr", steps=STEPS)
        return [APGD(ce, input_range, seed), APGD(dlr, input_range, seed)]
    targeted = APGDSpec(
        eps=spec.eps,
        norm=spec.norm,
        loss="dlr",
        steps=STEPS,
        targeted=True,
        target_classes=TARGETS,
    )
    attacks: list[Attack] = [APGD(ce, input_range, seed), APGD(targeted, input_range, seed)]
    square = SquareSpec(eps=spec.eps, norm=spec.norm, queries=SQUARE_QUERIES)
    attacks.append(Square(square, input_range, seed))
    return attacks


class AutoAttack(Attack):
    """The AutoAttack ensemble (Croce & Hein, ICML 2020): worst case per example.

    Each component draws its randomness from its own stream of the audit seed, for the whole
    slice of the data, so an example's result does not depend on the batch or on which other
    examples earlier components broke. Targeted APGD needs at least four classes: with fewer,
    its place is taken by untargeted APGD-DLR (three classes) or left out (two).
    """

    spec: AutoAttackSpec

    def __init__(self, spec: AutoAttackSpec, input_range: tuple[float, float], seed: int) -> None:
        super().__init__(spec, input_range, seed)
        self.components = components(spec, input_range, seed)

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, offset: int
    ) -> AttackOutput:
        adversarial, clean_logits, _ = self.worst_case(model, x, y, offset=offset)
        return AttackOutput(adversarial, clean_logits)

    def worst_case(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The ensemble's batch, the clean logits and, per component run, the examples it was
        the first to break."""
        with torch.no_grad():
            clean_logits = model(x)
        robust = clean_logits.argmax(1) == y
        adversarial = x.clone()
        firsts: list[torch.Tensor] = []
        for attack in self.usable(clean_logits.shape[1]):
            if not robust.any():
                firsts.append(torch.zeros_like(robust))
                continue
            if isinstance(attack, APGD):
                out, _ = attack.perturb(model, x, y, clean_logits, robust, offset=offset)
            else:
                assert isinstance(attack, Square)
                with torch.no_grad():
                    out, _ = attack.perturb(model, x, y, robust, offset=offset)
            with torch.no_grad():
                broken = robust & (model(out).argmax(1) != y)
            adversarial[robust] = out[robust]
            robust &= ~broken
            firsts.append(broken)
        return adversarial, clean_logits, firsts

    def usable(self, classes: int) -> list[Attack]:
        """The components that apply to a model with ``classes`` outputs, in order."""
        usable: list[Attack] = []
        for attack in self.components:
            if isinstance(attack, APGD) and attack.spec.loss == "dlr":
                if attack.spec.targeted and classes < 4 and classes >= 3:
                    spec = attack.spec.model_copy(update={"targeted": False})
                    attack = APGD(spec, (self.lo, self.hi), self.seed)
                if classes < (4 if attack.spec.targeted else 3):
                    continue
            usable.append(attack)
        return usable
