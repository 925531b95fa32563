"""Every attack a spec can name, built from its spec entry.

``attacks`` holds the base interface and the classic attacks; the AutoAttack family lives in
its own modules, which import that interface, so the table that knows them all sits here,
above both (imports run one way).
"""

from __future__ import annotations

from .apgd import APGD
from .attacks import Attack
from .attacks import build_attack as build_classic_attack
from .autoattack import AutoAttack
from .spec import APGDSpec, AttackSpec, AutoAttackSpec, SquareSpec
from .square import Square


def build_attack(spec: AttackSpec, input_range: tuple[float, float], seed: int) -> Attack:
    """The attack a spec entry names."""
    if isinstance(spec, APGDSpec):
        return APGD(spec, input_range, seed)
    if isinstance(spec, SquareSpec):
        return Square(spec, input_range, seed)
    if isinstance(spec, AutoAttackSpec):
        return AutoAttack(spec, input_range, seed)
    return build_classic_attack(spec, input_range, seed)
