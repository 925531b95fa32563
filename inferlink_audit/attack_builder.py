"""Every attack a spec can name, built from its spec entry: one table for all of them.

``attacks`` holds the base interface and the classic attacks; the AutoAttack family lives in
its own modules, which import that interface, so the table that knows them all sits here,
above both (imports run one way).
"""

from __future__ import annotations

from collections.abc import Callable

from .apgd import APGD
from .attacks import FGSM, PGD, Attack, BoxLBFGS, GaussianNoise
from .autoattack import AutoAttack
from .spec import (
    APGDSpec,
    AttackSpec,
    AutoAttackSpec,
    FGSMSpec,
    GaussianSpec,
    LBFGSSpec,
    PGDSpec,
    SquareSpec,
)
from .square import Square

ATTACKS: dict[type, Callable[..., Attack]] = {
    FGSMSpec: FGSM,
    PGDSpec: PGD,
    GaussianSpec: GaussianNoise,
    LBFGSSpec: BoxLBFGS,
    APGDSpec: APGD,
    SquareSpec: Square,
    AutoAttackSpec: AutoAttack,
}


def build_attack(spec: AttackSpec, input_range: tuple[float, float], seed: int) -> Attack:
    """The attack a spec entry names."""
    attack = ATTACKS.get(type(spec))
    if attack is None:
        raise TypeError(f"unknown attack spec {spec!r}")
    return attack(spec, input_range, seed)
