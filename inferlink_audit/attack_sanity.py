"""Attack-failure indicators: measurements that tell when an attack failed silently.

A gate that reports robust accuracy under gradient attacks can be fooled by a model that
masks its gradients or randomises its output (Athalye, Carlini, Wagner, *Obfuscated Gradients
Give a False Sense of Security*, ICML 2018; Tramèr, Carlini, Brendel, Madry, *On Adaptive
Attacks to Adversarial Example Defenses*, NeurIPS 2020). These indicators follow Carlini et
al., *On Evaluating Adversarial Robustness* (2019, §5), Pintor et al., *Indicators of Attack
Failure* (NeurIPS 2022), and AutoAttack's own checks (Croce & Hein, ICML 2020): each is
measured on the unfiltered network, names the examples it concerns, and says what to do.

Every indicator is a number compared with a limit (the item passes when measured ≤ limit):

* ``unstable_predictions``: share of examples whose prediction differs between two forward
  passes of the same input (a randomised model);
* ``masked_gradients``: share of correctly classified examples whose input gradient of the
  attack's loss is zero or not finite;
* ``iterative_weaker``: accuracy under the iterative attack minus accuracy under one step of
  size ε (FGSM for L∞, FGM for L2) at the same ε;
* ``eps_not_monotone``: accuracy at ε minus accuracy at ε/2 (with a list of ε, the largest
  rise in accuracy from one listed ε to the next along the curve);
* ``unbounded_not_broken``: accuracy of the iterative attack when ε covers the whole input
  box (any input is allowed, so it should be ≈ 0);
* ``black_box_stronger``: accuracy under the white-box attack minus accuracy under the
  gradient-free Square attack (1000 queries) at the same ε and norm;
* ``not_converged``: share of unbroken examples whose best APGD loss still rose by more than
  5% of its total rise over the last tenth of the steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal, Protocol

import torch
from torch import nn

from .apgd import APGD, LOSSES
from .attack_builder import build_attack
from .indicators import GUIDE
from .spec import APGDSpec, AttackSpec, AutoAttackSpec, FGSMSpec, PGDSpec, SquareSpec

EpsAttack = FGSMSpec | PGDSpec | APGDSpec | AutoAttackSpec  # the attacks with a budget ε
SQUARE_QUERIES = 1000  # the black-box reference's budget
LATE_SHARE = 0.1  # the last tenth of APGD's steps ...
LATE_GAIN = 0.05  # ... may add at most this share of the loss's total rise
SHOWN = 8  # example indices a detail lists


@dataclass(frozen=True)
class Indicator:
    """One indicator's reading: passes when ``measured <= limit``."""

    name: str
    attack: str | None
    measured: float
    limit: float
    detail: str
    examples: tuple[int, ...]  # data indices of the examples concerned
    count: int | None = None  # how many they are, when ``examples`` lists only the first

    @property
    def passed(self) -> bool:
        return self.measured <= self.limit


class ExampleData(Protocol):
    """The audit's examples, on the model's device, and the batch size to use."""

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _examples(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[:, 0].tolist())


def _listed(examples: tuple[int, ...]) -> str:
    shown = ", ".join(str(i) for i in examples[:SHOWN])
    more = f", … {len(examples) - SHOWN} more" if len(examples) > SHOWN else ""
    return f"examples {shown}{more}" if examples else "no examples"


def _advice(name: str) -> str:
    return f": {GUIDE[name].action}"


def iterative(spec: AttackSpec) -> bool:
    return isinstance(spec, PGDSpec | APGDSpec | AutoAttackSpec)


def applicable(spec: AttackSpec) -> list[str]:
    """The indicators that apply to an attack (besides the model's ``unstable_predictions``)."""
    if not isinstance(spec, EpsAttack):
        return []  # noise, L-BFGS (no ε) and Square (the black-box reference itself)
    names = ["masked_gradients", "eps_not_monotone"]
    if iterative(spec):
        names += ["iterative_weaker", "unbounded_not_broken"]
        standard = isinstance(spec, AutoAttackSpec) and spec.version == "standard"
        if not standard:  # the standard ensemble runs Square itself
            names.append("black_box_stronger")
    if isinstance(spec, APGDSpec):
        names.append("not_converged")
    return names


class SanityRunner:
    """Measures the indicators of one model's attacks, each attack run at most once."""

    def __init__(
        self, model: nn.Module, data: ExampleData, input_range: tuple[float, float], seed: int
    ) -> None:
        self.model, self.data = model, data
        self.input_range, self.seed = input_range, seed
        self._correct: dict[str, torch.Tensor] = {}

    def _batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        x, y, size = self.data.x, self.data.y, self.data.batch_size
        for start in range(0, len(y), size):
            yield start, x[start : start + size], y[start : start + size]

    def clean_correct(self) -> torch.Tensor:
        if "clean" not in self._correct:
            with torch.no_grad(), _eval_mode(self.model):
                self._correct["clean"] = torch.cat(
                    [self.model(xb).argmax(1) == yb for _, xb, yb in self._batches()]
                )
        return self._correct["clean"]

    def correct_under(self, spec: AttackSpec) -> torch.Tensor:
        """Per example, whether the model still classifies it correctly under ``spec``."""
        if spec.id not in self._correct:
            attack = build_attack(spec, self.input_range, self.seed)
            parts = []
            for start, xb, yb in self._batches():
                adversarial = attack(self.model, xb, yb, offset=start).adversarial
                with torch.no_grad(), _eval_mode(self.model):
                    parts.append(self.model(adversarial).argmax(1) == yb)
            self._correct[spec.id] = torch.cat(parts)
        return self._correct[spec.id]

    def remember(self, spec: AttackSpec, correct: torch.Tensor) -> None:
        """Per-example outcomes of ``spec`` measured elsewhere on the same model, data and
        batches (the audit's attack table), so the attack is not run twice."""
        self._correct.setdefault(spec.id, correct.to(self.data.y.device))

    def accuracy(self, spec: AttackSpec) -> float:
        return float(self.correct_under(spec).float().mean())

    def measure(
        self, name: str, spec: AttackSpec | None, limit: float, curve: Sequence[AttackSpec] = ()
    ) -> Indicator:
        """The indicator ``name`` of the attack ``spec`` (None for the model's own); ``curve``
        is the attack at every ε of its list, ascending, when the spec gave several."""
        if name == "unstable_predictions" or spec is None:
            return self.unstable_predictions(limit)
        if not isinstance(spec, EpsAttack) or name not in applicable(spec):
            raise ValueError(f"indicator {name!r} does not apply to attack {spec.id}")
        if name == "eps_not_monotone" and len(curve) >= 2:
            return self.eps_curve_not_monotone(spec, curve, limit)
        measured: Indicator = getattr(self, name)(spec, limit)
        return measured

    # ----------------------------------------------------------------- the indicators
    def unstable_predictions(self, limit: float) -> Indicator:
        with torch.no_grad(), _eval_mode(self.model):
            differ = torch.cat(
                [
                    self.model(xb).argmax(1) != self.model(xb).argmax(1)
                    for _, xb, _ in self._batches()
                ]
            )
        examples, measured = _examples(differ), float(differ.float().mean())
        detail = (
            f"two forward passes of the same input disagree on {measured:.1%} of the examples "
            f"({_listed(examples)})"
        )
        if measured > limit:
            detail += _advice("unstable_predictions")
        return Indicator("unstable_predictions", None, measured, limit, detail, examples)

    def masked_gradients(self, spec: EpsAttack, limit: float) -> Indicator:
        loss_name = self._loss_of(spec)
        loss_fn = LOSSES[loss_name]
        parts = []
        with _eval_mode(self.model), torch.enable_grad():
            for _, xb, yb in self._batches():
                point = xb.detach().clone().requires_grad_(True)
                logits = self.model(point)
                (grad,) = torch.autograd.grad(loss_fn(logits, yb, None).sum(), point)
                flat = grad.flatten(1)
                parts.append(~torch.isfinite(flat).all(1) | (flat == 0).all(1))
        masked = torch.cat(parts) & self.clean_correct()
        correct = int(self.clean_correct().sum())
        measured = float(masked.sum()) / correct if correct else 0.0
        examples = _examples(masked)
        detail = (
            f"input gradient of the {loss_name.upper()} loss is zero or not finite on "
            f"{measured:.1%} of the correctly classified examples ({_listed(examples)})"
        )
        if measured > limit:
            detail += _advice("masked_gradients")
        return Indicator("masked_gradients", spec.id, measured, limit, detail, examples)

    def iterative_weaker(self, spec: EpsAttack, limit: float) -> Indicator:
        eps = spec.eps
        norm = "linf" if isinstance(spec, FGSMSpec) else spec.norm
        one_step = PGDSpec(eps=eps, steps=1, step_size=eps, norm=norm)
        name = "FGSM" if norm == "linf" else "FGM (one L2 step)"
        accuracy, single = self.accuracy(spec), self.accuracy(one_step)
        measured = accuracy - single
        examples = _examples(self.correct_under(spec) & ~self.correct_under(one_step))
        detail = (
            f"accuracy {accuracy:.4f} under {spec.label} vs {single:.4f} under {name} at the "
            f"same eps; {_listed(examples)} resist the iterative attack but not the single step"
        )
        if measured > limit:
            detail += _advice("iterative_weaker")
        return Indicator("iterative_weaker", spec.id, measured, limit, detail, examples)

    def _loss_of(self, spec: EpsAttack) -> Literal["ce", "dlr"]:
        """The loss whose gradient the attack follows. AutoAttack's is DLR (its APGD-T and
        APGD-DLR do not saturate with the softmax) unless the model has fewer than 3 classes."""
        if isinstance(spec, APGDSpec):
            return spec.loss
        if isinstance(spec, AutoAttackSpec):
            x = self.data.x[:1]
            with torch.no_grad(), _eval_mode(self.model):
                classes = self.model(x).shape[1]
            return "dlr" if classes >= 3 else "ce"
        return "ce"

    def _cheap(self, spec: EpsAttack, eps: float) -> AttackSpec:
        """The attack at another ε; AutoAttack's ensemble is stood in for by its APGD on the
        same loss as :meth:`_loss_of` (100 steps)."""
        if isinstance(spec, AutoAttackSpec):
            return APGDSpec(eps=eps, norm=spec.norm, loss=self._loss_of(spec))
        return spec.model_copy(update={"eps": eps})

    def eps_not_monotone(self, spec: EpsAttack, limit: float) -> Indicator:
        eps = spec.eps
        half = self._cheap(spec, eps / 2)
        at_eps = spec if not isinstance(spec, AutoAttackSpec) else self._cheap(spec, eps)
        accuracy, at_half = self.accuracy(at_eps), self.accuracy(half)
        measured = accuracy - at_half
        examples = _examples(self.correct_under(at_eps) & ~self.correct_under(half))
        detail = (
            f"accuracy {accuracy:.4f} at eps={eps:g} vs {at_half:.4f} at eps={eps / 2:g} "
            f"({at_eps.label}); {_listed(examples)} broken at the smaller eps only"
        )
        if measured > limit:
            detail += _advice("eps_not_monotone")
        return Indicator("eps_not_monotone", spec.id, measured, limit, detail, examples)

    def eps_curve_not_monotone(
        self, spec: EpsAttack, curve: Sequence[AttackSpec], limit: float
    ) -> Indicator:
        """``eps_not_monotone`` read off the spec's own ε curve: the largest rise in accuracy
        from one listed ε to the next (the curve's attacks, not a stand-in at ε/2)."""
        correct = [self.correct_under(point) for point in curve]
        accuracy = [float(c.float().mean()) for c in correct]
        rises = [after - before for before, after in pairwise(accuracy)]
        worst = max(range(len(rises)), key=lambda k: rises[k])
        measured = rises[worst]
        examples = _examples(correct[worst + 1] & ~correct[worst])
        small, large = getattr(curve[worst], "eps", 0.0), getattr(curve[worst + 1], "eps", 0.0)
        shown = ", ".join(
            f"{a:.4f} at eps={getattr(p, 'eps', 0.0):g}"
            for a, p in zip(accuracy, curve, strict=True)
        )
        detail = (
            f"accuracy along the eps curve: {shown}; largest rise {measured:+.4f} from "
            f"eps={small:g} to eps={large:g}; {_listed(examples)} broken at the smaller eps only"
        )
        if measured > limit:
            detail += _advice("eps_not_monotone")
        return Indicator("eps_not_monotone", spec.id, measured, limit, detail, examples)

    def unbounded_not_broken(self, spec: EpsAttack, limit: float) -> Indicator:
        lo, hi = self.input_range
        norm = getattr(spec, "norm", "linf")
        features = self.data.x[0].numel()
        eps = (hi - lo) * (1.0 if norm == "linf" else features**0.5)
        whole = self._cheap(spec, eps)
        measured = self.accuracy(whole)
        examples = _examples(self.correct_under(whole))
        detail = (
            f"accuracy {measured:.4f} under {whole.label}, an eps that covers the whole input "
            f"box ({_listed(examples)} still correct)"
        )
        if measured > limit:
            detail += _advice("unbounded_not_broken")
        return Indicator("unbounded_not_broken", spec.id, measured, limit, detail, examples)

    def black_box_stronger(self, spec: EpsAttack, limit: float) -> Indicator:
        eps = spec.eps
        if self.data.x.dim() != 4:
            detail = "not measured: the Square attack needs image inputs [N, C, H, W]"
            return Indicator("black_box_stronger", spec.id, 0.0, limit, detail, ())
        norm = "linf" if isinstance(spec, FGSMSpec) else spec.norm
        square = SquareSpec(eps=eps, norm=norm, queries=SQUARE_QUERIES)
        accuracy, black = self.accuracy(spec), self.accuracy(square)
        measured = accuracy - black
        examples = _examples(self.correct_under(spec) & ~self.correct_under(square))
        detail = (
            f"accuracy {accuracy:.4f} under {spec.label} vs {black:.4f} under {square.label}; "
            f"{_listed(examples)} broken by the black-box attack only"
        )
        if measured > limit:
            detail += _advice("black_box_stronger")
        return Indicator("black_box_stronger", spec.id, measured, limit, detail, examples)

    def not_converged(self, spec: EpsAttack, limit: float) -> Indicator:
        assert isinstance(spec, APGDSpec)
        attack = APGD(spec, self.input_range, self.seed)
        late = max(1, round(LATE_SHARE * spec.steps))
        parts = []
        with _eval_mode(self.model):
            for start, xb, yb in self._batches():
                with torch.no_grad():
                    clean_logits = self.model(xb)
                active = clean_logits.argmax(1) == yb
                _, runs = attack.perturb(self.model, xb, yb, clean_logits, active, offset=start)
                still = torch.zeros_like(active)
                if runs:  # the last run per example is the one that ended unbroken
                    last = runs[-1]
                    best = last.losses.cummax(0).values
                    gain, total = best[-1] - best[-1 - late], best[-1] - best[0]
                    rising = ~last.broken & (gain > LATE_GAIN * total) & (total > 0)
                    index = active.nonzero()[:, 0]
                    for run in runs[:-1]:
                        index = index[~run.broken]
                    still[index] = rising
                parts.append(still)
        unconverged = torch.cat(parts)
        robust = self.correct_under(spec)
        measured = float(unconverged.sum()) / max(int(robust.sum()), 1)
        examples = _examples(unconverged)
        detail = (
            f"APGD's best loss still rose over its last {late} of {spec.steps} steps on "
            f"{measured:.1%} of the examples it left correct ({_listed(examples)})"
        )
        if measured > limit:
            detail += _advice("not_converged")
        return Indicator("not_converged", spec.id, measured, limit, detail, examples)
