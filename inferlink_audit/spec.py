"""The audit spec (README): validated pydantic models.

Every model forbids unknown keys so a typo is an error, not a silently ignored setting.
Loading (YAML with line positions, error messages that name ``file:line: key``) lives in
``spec_loader``; this module only says what a valid spec is.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    Tag,
    model_validator,
)

FilterName = Literal["low_pass", "high_pass", "pulse"]
ScopeName = Literal["local", "global"]
ResponseName = Literal["clean", "adversarial"]

DEFAULT_LAYER_TYPES = ["Conv1d", "Conv2d", "Conv3d", "Linear"]
DEFAULT_FGSM_EPS = 8 / 255
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|xla(:\d+)?|mps)$")
_FACTORY_PREFIXES = ("torchvision:", "torchscript:")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


# --------------------------------------------------------------------------- model
class ModelSpec(_Strict):
    """How to build the network and which weights to load into it."""

    factory: str = Field(
        description="module.path:Name, file.py:Name (next to the spec), 'torchvision: resnet18' "
        "or 'torchscript: model.pt'"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments passed to the factory as they are",
    )
    checkpoint: Path | None = Field(
        default=None,
        description="the weights: .safetensors, or .pt/.pth/.ckpt/.bin loaded weights_only; "
        "relative to the spec; none: the factory's own weights",
    )
    trust_pickle: bool = Field(
        default=False,
        description="DANGER: allow checkpoints/TorchScript files that can run arbitrary code.",
    )

    @model_validator(mode="after")
    def _factory_form(self) -> ModelSpec:
        f = self.factory.strip()
        if f.startswith(_FACTORY_PREFIXES):
            if not f.split(":", 1)[1].strip():
                raise ValueError(f"factory {self.factory!r} names no model after the prefix")
        elif f.count(":") != 1 or not all(part.strip() for part in f.split(":")):
            raise ValueError(
                f"factory {self.factory!r} is not 'module.path:Name', 'file.py:Name', "
                "'torchvision: <name>' or 'torchscript: <file>'"
            )
        return self

    @property
    def factory_kind(self) -> Literal["import", "file", "torchvision", "torchscript"]:
        f = self.factory.strip()
        if f.startswith("torchvision:"):
            return "torchvision"
        if f.startswith("torchscript:"):
            return "torchscript"
        return "file" if f.split(":", 1)[0].endswith(".py") else "import"

    @property
    def factory_target(self) -> str:
        """What follows a prefix (``resnet18``, ``model.pt``), or the whole import string."""
        f = self.factory.strip()
        if f.startswith(_FACTORY_PREFIXES):
            return f.split(":", 1)[1].strip()
        return f


# --------------------------------------------------------------------------- data
class NormalizeSpec(_Strict):
    """Per-channel (x - mean) / std, applied inside the model wrapper so ε stays in input units."""

    mean: list[float] = Field(
        min_length=1,
        description="per-channel mean subtracted inside the model wrapper",
    )
    std: list[Annotated[float, Field(gt=0.0)]] = Field(
        min_length=1,
        description="per-channel standard deviation (> 0) the inputs are divided by",
    )

    @model_validator(mode="after")
    def _same_length(self) -> NormalizeSpec:
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"mean has {len(self.mean)} values but std has {len(self.std)}: "
                "give one per channel"
            )
        return self


DataSource = Literal["sklearn_digits", "tensors", "torchvision"]
TorchvisionDataset = Literal["MNIST", "FashionMNIST", "CIFAR10", "CIFAR100", "ImageFolder"]


class DataSourceSpec(_Strict):
    """Where examples come from; shared by the test set and the training split."""

    source: DataSource = Field(
        description="where the examples come from: sklearn_digits, tensors (a file) or "
        "torchvision (a local dataset)"
    )
    split: Literal["train", "test"] = Field(
        default="test",
        description="which split of the source: train or test",
    )
    path: Path | None = Field(
        default=None,
        description="source tensors: a .pt dict {x, y} (loaded weights_only) or a .npz with "
        "arrays x, y; relative to the spec",
    )
    name: TorchvisionDataset | None = Field(
        default=None,
        description="source torchvision: MNIST, FashionMNIST, CIFAR10, CIFAR100 or ImageFolder",
    )
    root: Path | None = Field(
        default=None,
        description="source torchvision: the local folder holding the dataset",
    )
    download: bool = Field(
        default=False,
        description="source torchvision: fetch the dataset when missing (the only download there "
        "is)",
    )
    limit: PositiveInt | None = Field(
        default=None,
        description="use only the first N examples (default: all)",
    )

    @model_validator(mode="after")
    def _source_needs(self) -> DataSourceSpec:
        if self.source == "tensors" and self.path is None:
            raise ValueError(
                "source 'tensors' needs 'path' (a .pt dict {x, y} or a .npz with x, y)"
            )
        if self.source == "torchvision" and (self.name is None or self.root is None):
            raise ValueError("source 'torchvision' needs 'name' and 'root' (a local folder)")
        return self


class DataSpec(DataSourceSpec):
    """The test set the audit measures on, and how inputs are scaled."""

    # A number, or "auto": the largest batch that fits the device, measured (see batching).
    batch_size: PositiveInt | Literal["auto"] = Field(
        default=256,
        description="examples per batch, or auto: the largest batch that fits the device, measured",
    )
    input_range: tuple[float, float] = Field(
        default=(0.0, 1.0),
        description="[low, high] of the inputs: the box attacks stay in; ε and σ are in these "
        "units",
    )
    normalize: NormalizeSpec | None = Field(
        default=None,
        description="per-channel (x - mean) / std applied inside the model wrapper, so ε stays in "
        "input units",
    )
    train: DataSourceSpec | None = Field(
        default=None,
        description="the training split remediation retrains on",
    )

    @model_validator(mode="after")
    def _range_order(self) -> DataSpec:
        lo, hi = self.input_range
        if not lo < hi:
            raise ValueError(f"input_range [{lo}, {hi}] must have low < high")
        return self


# --------------------------------------------------------------------------- filtering
class LayerSelectionSpec(_Strict):
    """Which modules are analysed: by type name, then glob include/exclude on qualified names."""

    types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LAYER_TYPES),
        min_length=1,
        description="module class names analysed, a subclass matching its bases (Conv1d, "
        "Conv2d, Conv3d, Linear by default)",
    )
    include: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="glob patterns of qualified module names to analyse",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="glob patterns of qualified module names left out",
    )
    parameters: list[str] = Field(
        default_factory=lambda: ["weight"],
        min_length=1,
        description="which tensors of each module are filtered (weight; bias too if listed)",
    )


def _default_scopes() -> list[ScopeName]:
    return ["local", "global"]


def _default_filters() -> list[FilterName]:
    return ["low_pass", "high_pass", "pulse"]


class FilteringSpec(_Strict):
    """Synaptic filtering (docs/method.md §2–4)."""

    scopes: list[ScopeName] = Field(
        default_factory=_default_scopes,
        min_length=1,
        description="local (one layer at a time) and/or global (all selected layers at once)",
    )
    filters: list[FilterName] = Field(
        default_factory=_default_filters,
        min_length=1,
        description="synaptic filters to sweep: low_pass, high_pass, pulse",
    )
    thresholds: Annotated[int, Field(ge=3, le=10_000)] = Field(
        default=25,
        description="thresholds per sweep, spaced linearly over the scope's values (at least 3)",
    )
    values: Literal["signed", "magnitude"] = Field(
        default="signed",
        description="filter on the signed values, or on |θ| (magnitude, the pruning view)",
    )
    layers: LayerSelectionSpec = Field(
        default_factory=LayerSelectionSpec,
        description="which modules are analysed: by type, then include/exclude globs",
    )
    adversarial_source: Literal["filtered", "original"] = Field(
        default="filtered",
        description="craft adversarial examples on each filtered network (white-box) or once on "
        "the original (transfer, cheaper)",
    )
    tolerance: Annotated[float, Field(ge=0.0)] = Field(
        default=0.05,
        description="τ: how far a score must pass the baseline to label a layer fragile or "
        "antifragile",
    )
    range: tuple[float, float] | None = Field(
        default=None,
        description="[low, high] of the global scope's thresholds (default: the values' min and "
        "max)",
    )
    fast: bool = Field(
        default=False,
        description="opt-in: several thresholds per pass with torch.func.vmap (CUDA and XLA, "
        "local sweeps with fixed adversarial inputs); the arithmetic is compute.precision's",
    )
    # Memory for the activations a local sweep reuses: every storage the cache keeps alive
    # (FGSM's saved autograd tensors, live and skip values) counts, and a scope whose cache
    # would not fit runs whole. 2 GiB keeps an audit within a 7 GB CI runner; on a
    # 16/32/64-channel ResNet with 1,024 32x32 images the deepest FGSM cache needs 1.05 GB and
    # saves 1.45x per variant there (benchmarks/README.md).
    prefix_cache_mb: Annotated[int, Field(ge=0)] = Field(
        default=2048,
        description="memory (MiB) for the activations local sweeps reuse; 0 turns the reuse off",
    )

    @model_validator(mode="after")
    def _unique(self) -> FilteringSpec:
        for key in ("scopes", "filters"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"{key} lists a value twice: {values}")
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range {list(self.range)} must have low < high")
        return self


# --------------------------------------------------------------------------- attacks
def _fmt(value: float) -> str:
    return f"{value:g}"


def _budget_values(values: list[Any], key: str) -> tuple[float, ...]:
    """A list of budgets (an ε curve) checked value by value: numbers > 0, none twice."""
    if not values:
        raise ValueError(
            f"{key} is an empty list: give one number, or a list of numbers for a curve"
        )
    curve: list[float] = []
    for index, value in enumerate(values):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"{key}[{index}] is {value!r}: every value of a list of {key} is a number > 0"
            )
        if float(value) in curve:
            raise ValueError(f"{key} lists {value:g} twice: give each value once")
        curve.append(float(value))
    return tuple(curve)


class _Budgeted(_Strict):
    """An attack with a budget (ε, or σ for noise) that may be given as a list: a curve.

    The model holds one value, the point that filtering sweeps and attack-failure indicators
    use (``sweep_eps``/``sweep_sigma``, else the first listed); ``curve`` keeps every listed
    value and ``points`` gives one single-budget attack per value. A spec with one value is
    exactly the attack it always was (the sweep key is left out of dumps and cache keys).
    """

    budget_key: ClassVar[str] = "eps"
    _curve: tuple[float, ...] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _budget_list(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        key = cls.budget_key
        sweep_key = f"sweep_{key}"
        values = data.get(key) if isinstance(data, dict) else None
        if not isinstance(values, list):
            model = handler(data)
            if getattr(model, sweep_key) is not None and model._curve is None:
                raise ValueError(
                    f"{sweep_key} picks the {key} that filtering sweeps use out of a list: "
                    f"give {key} as a list, or leave {sweep_key} out"
                )
            return model
        curve = _budget_values(values, key)
        chosen = data.get(sweep_key)
        model = handler({**data, key: curve[0] if chosen is None else chosen})
        sweep = getattr(model, sweep_key)
        if sweep is not None and sweep not in curve:
            raise ValueError(
                f"{sweep_key} {sweep:g} is not one of the listed {key} "
                f"({', '.join(_fmt(v) for v in curve)}): pick one of them"
            )
        model._curve = curve
        return model

    @property
    def id(self) -> str:
        raise NotImplementedError  # every attack names itself

    @property
    def label(self) -> str:
        raise NotImplementedError

    @property
    def budget(self) -> float:
        """This attack's ε (σ for noise)."""
        return float(getattr(self, self.budget_key))

    @property
    def curve(self) -> tuple[float, ...] | None:
        """Every listed value, in the spec's order, when the spec gave a list; else None."""
        return self._curve

    def points(self) -> list[Self]:
        """One single-budget attack per listed value (just this one for a single value)."""
        values = self._curve if self._curve is not None else (self.budget,)
        return [self.at(value) for value in values]

    def at(self, value: float) -> Self:
        """This attack with budget ``value`` and no curve."""
        point = self.model_copy(update={self.budget_key: value, f"sweep_{self.budget_key}": None})
        point._curve = None
        return point

    @property
    def curve_label(self) -> str:
        """The label without the budget, naming the attack a curve draws."""
        label = re.sub(rf"\b{self.budget_key}=[^,)]*(, )?", "", self.label)
        return label.removesuffix("()")


def _budget_field(key: str, what: str) -> Any:
    return Field(
        description=f"{what} in input units; a list of values draws an accuracy curve "
        f"against {key} (each value is its own attack, with its own checks)"
    )


def _sweep_field(key: str) -> Any:
    return Field(
        default=None,
        exclude=True,
        description=f"with a list of {key}: the one that filtering sweeps and attack-failure "
        f"indicators use (default: the first listed)",
    )


class FGSMSpec(_Budgeted):
    """Fast gradient sign method (Goodfellow et al., 2015)."""

    eps: Annotated[float, Field(gt=0.0)] = _budget_field("eps", "the L∞ budget ε")
    sweep_eps: Annotated[float, Field(gt=0.0)] | None = _sweep_field("eps")

    kind: ClassVar[str] = "fgsm"

    @property
    def id(self) -> str:
        return f"fgsm_eps{_fmt(self.eps)}"

    @property
    def label(self) -> str:
        return f"fgsm(eps={_fmt(self.eps)})"


class PGDSpec(_Budgeted):
    """Projected gradient descent (Madry et al., 2018), L∞ or L2."""

    eps: Annotated[float, Field(gt=0.0)] = _budget_field("eps", "the budget ε in the norm")
    sweep_eps: Annotated[float, Field(gt=0.0)] | None = _sweep_field("eps")
    steps: Annotated[int, Field(ge=1, le=10_000)] = Field(default=10, description="gradient steps")
    step_size: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None,
        description="step length in the norm (default: 2.5 ε / steps)",
    )
    norm: Literal["linf", "l2"] = Field(
        default="linf",
        description="the threat model's norm: linf or l2",
    )
    random_start: bool = Field(
        default=False,
        description="start from a random point in the ε-ball instead of the input",
    )

    kind: ClassVar[str] = "pgd"

    @property
    def effective_step_size(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    @property
    def id(self) -> str:
        return f"pgd_{self.norm}_eps{_fmt(self.eps)}_steps{self.steps}"

    @property
    def label(self) -> str:
        return f"pgd-{self.norm}(eps={_fmt(self.eps)}, steps={self.steps})"


class GaussianSpec(_Budgeted):
    """Additive Gaussian noise, clamped to the input range."""

    sigma: Annotated[float, Field(gt=0.0)] = _budget_field("sigma", "the noise's std σ")
    sweep_sigma: Annotated[float, Field(gt=0.0)] | None = _sweep_field("sigma")

    kind: ClassVar[str] = "gaussian"
    budget_key: ClassVar[str] = "sigma"

    @property
    def id(self) -> str:
        return f"gaussian_sigma{_fmt(self.sigma)}"

    @property
    def label(self) -> str:
        return f"gaussian(sigma={_fmt(self.sigma)})"


class LBFGSSpec(_Strict):
    """Box-constrained L-BFGS (Szegedy et al., 2014)."""

    target: Literal["next", "random"] | Annotated[int, Field(ge=0)] = Field(
        default="next",
        description="the class to reach: next (label + 1), random, or a class index",
    )
    max_iter: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=50,
        description="L-BFGS iterations per example and line-search step",
    )

    kind: ClassVar[str] = "lbfgs"

    @property
    def id(self) -> str:
        return f"lbfgs_{self.target}"

    @property
    def label(self) -> str:
        return f"lbfgs(target={self.target})"


Norm = Literal["linf", "l2"]


class APGDSpec(_Budgeted):
    """Auto-PGD (Croce & Hein, 2020): step size, momentum and restarts set by the method."""

    eps: Annotated[float, Field(gt=0.0)] = _budget_field("eps", "the budget ε in the norm")
    sweep_eps: Annotated[float, Field(gt=0.0)] | None = _sweep_field("eps")
    norm: Norm = Field(default="linf", description="the threat model's norm: linf or l2")
    loss: Literal["ce", "dlr"] = Field(
        default="ce",
        description="the loss maximised: ce (cross-entropy) or dlr (difference of logits ratio)",
    )
    steps: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=100,
        description="iterations per restart",
    )
    restarts: Annotated[int, Field(ge=1, le=100)] = Field(
        default=1,
        description="random restarts; an example counts as broken if any breaks it",
    )
    targeted: bool = Field(
        default=False,
        description="run targeted against each of the top target_classes other classes",
    )
    target_classes: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=9, description="with targeted: how many of the top other classes are tried"
    )

    kind: ClassVar[str] = "apgd"

    @property
    def id(self) -> str:
        extra = f"_r{self.restarts}" if self.restarts != 1 else ""
        if self.targeted:
            extra += f"_t{self.target_classes}"
        return f"apgd_{self.loss}_{self.norm}_eps{_fmt(self.eps)}_steps{self.steps}{extra}"

    @property
    def label(self) -> str:
        what = f"{self.loss}, targeted" if self.targeted else self.loss
        return f"apgd-{self.norm}(eps={_fmt(self.eps)}, {what}, steps={self.steps})"


class SquareSpec(_Budgeted):
    """Square attack (Andriushchenko et al., 2020): score-based, gradient-free, L∞ or L2."""

    eps: Annotated[float, Field(gt=0.0)] = _budget_field("eps", "the budget ε in the norm")
    sweep_eps: Annotated[float, Field(gt=0.0)] | None = _sweep_field("eps")
    norm: Norm = Field(default="linf", description="the threat model's norm: linf or l2")
    queries: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=1000,
        description="model queries per example",
    )
    p_init: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default=0.8,
        description="initial fraction of the input a square covers",
    )

    kind: ClassVar[str] = "square"

    @property
    def id(self) -> str:
        return f"square_{self.norm}_eps{_fmt(self.eps)}_q{self.queries}"

    @property
    def label(self) -> str:
        return f"square-{self.norm}(eps={_fmt(self.eps)}, queries={self.queries})"


class AutoAttackSpec(_Budgeted):
    """AutoAttack (Croce & Hein, 2020): an ensemble, the worst case per example."""

    eps: Annotated[float, Field(gt=0.0)] = _budget_field("eps", "the budget ε in the norm")
    sweep_eps: Annotated[float, Field(gt=0.0)] | None = _sweep_field("eps")
    norm: Norm = Field(default="linf", description="the threat model's norm: linf or l2")
    version: Literal["standard", "fast"] = Field(
        default="standard",
        description="standard: APGD-CE, APGD-T and Square; fast: APGD-CE and APGD-DLR",
    )

    kind: ClassVar[str] = "autoattack"

    @property
    def id(self) -> str:
        suffix = "_fast" if self.version == "fast" else ""
        return f"autoattack_{self.norm}_eps{_fmt(self.eps)}{suffix}"

    @property
    def label(self) -> str:
        return f"autoattack-{self.norm}(eps={_fmt(self.eps)}, {self.version})"


AttackSpec = FGSMSpec | PGDSpec | GaussianSpec | LBFGSSpec | APGDSpec | SquareSpec | AutoAttackSpec
CurveSpec = FGSMSpec | PGDSpec | GaussianSpec | APGDSpec | SquareSpec | AutoAttackSpec
GRADIENT_ATTACKS = (FGSMSpec, PGDSpec, LBFGSSpec, APGDSpec, AutoAttackSpec)


class AttackItem(_Strict):
    """One entry of ``attacks:``, a one-key mapping such as ``- fgsm: {eps: 0.1}``."""

    fgsm: FGSMSpec | None = Field(
        default=None,
        description="fast gradient sign method (Goodfellow et al., 2015)",
    )
    pgd: PGDSpec | None = Field(
        default=None,
        description="projected gradient descent (Madry et al., 2018), L∞ or L2",
    )
    gaussian: GaussianSpec | None = Field(
        default=None,
        description="additive Gaussian noise, clamped to the input range",
    )
    lbfgs: LBFGSSpec | None = Field(
        default=None,
        description="box-constrained L-BFGS (Szegedy et al., 2014), per example",
    )
    apgd: APGDSpec | None = Field(default=None, description="Auto-PGD (Croce & Hein, 2020)")
    square: SquareSpec | None = Field(
        default=None,
        description="Square attack: score-based, gradient-free",
    )
    autoattack: AutoAttackSpec | None = Field(
        default=None,
        description="AutoAttack ensemble: the worst case per example",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> AttackItem:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "each attack is one mapping such as '- fgsm: {eps: 0.1}'"
                + (f"; this one names {', '.join(given)}" if given else "")
            )
        return self

    @property
    def spec(self) -> AttackSpec:
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is not None:
                return value
        raise AssertionError("validated AttackItem has no attack")


# --------------------------------------------------------------------------- checks
class FragileFractionCheck(_Strict):
    value: Fraction = Field(
        description="the largest fraction of analysed parameters allowed in fragile layers"
    )
    on: ResponseName = Field(
        default="adversarial",
        description="which response labels the layers: clean or adversarial",
    )


class AccuracyAtEps(_Strict):
    """One point of ``min_adversarial_accuracy`` given per ε: the limit of every attack at
    that ε."""

    eps: Annotated[float, Field(gt=0.0)] = Field(
        description="an ε that some attack lists (each attack with this ε gets this limit)"
    )
    value: Fraction = Field(description="the least adversarial accuracy allowed at this ε")


def _limit_shape(value: Any) -> str:
    return "per_eps" if isinstance(value, list) else "one"


# One fraction for every attack, or a list of {eps, value}; the discriminator keeps a wrong
# list's errors to the list (never "expected a number" as well).
PerEpsLimit = Annotated[
    Annotated[Fraction, Tag("one")]
    | Annotated[Annotated[list[AccuracyAtEps], Field(min_length=1)], Tag("per_eps")],
    Discriminator(_limit_shape),
]


class ChecksSpec(_Strict):
    """Thresholds the audit asserts; each absent key is simply not checked."""

    min_clean_accuracy: Fraction | None = Field(
        default=None,
        description="the least clean accuracy allowed on the test set",
    )
    min_adversarial_accuracy: PerEpsLimit | None = Field(
        default=None,
        description="the least accuracy under each attack: one fraction for every attack "
        "(and every eps of a list), or a list of {eps, value} giving the limit per eps",
    )
    max_fragile_fraction: FragileFractionCheck | None = Field(
        default=None,
        description="per filter and attack: the largest fragile-parameter fraction, {value, on} "
        "or a bare number (on: adversarial)",
    )
    max_targeted_layers: Annotated[int, Field(ge=0)] | None = Field(
        default=None,
        description="per filter and attack: the most layers an attack may target",
    )
    max_lipschitz_upper_bound: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None,
        description="the largest upper bound of the network's L2 Lipschitz constant allowed",
    )
    no_new_fragile_layers: bool = Field(
        default=False,
        description="per filter and attack: fail when a layer is fragile that was not in the "
        "baseline",
    )
    max_score_drop: Annotated[float, Field(ge=0.0)] | None = Field(
        default=None,
        description="per filter and attack: the largest drop of a layer's score against the "
        "baseline",
    )
    # Attack-failure indicators (attack_sanity): None: on when pgd, apgd or autoattack is listed.
    attack_sanity: bool | None = Field(
        default=None,
        description="attack-failure indicators as checks (default: on when pgd, apgd or "
        "autoattack is listed)",
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_fraction(cls, data: Any) -> Any:
        """``max_fragile_fraction: 0.4`` is shorthand for ``{value: 0.4, on: adversarial}``."""
        if isinstance(data, dict):
            per_eps = data.get("min_adversarial_accuracy")
            if isinstance(per_eps, dict):
                raise ValueError(
                    "checks.min_adversarial_accuracy is one fraction, or a list of "
                    "{eps, value} such as [{eps: 0.03, value: 0.6}, {eps: 0.1, value: 0.3}]"
                )
            value = data.get("max_fragile_fraction")
            if isinstance(value, int | float) and not isinstance(value, bool):
                data = {**data, "max_fragile_fraction": {"value": value}}
        return data

    @model_validator(mode="after")
    def _eps_once(self) -> ChecksSpec:
        limits = self.min_adversarial_accuracy
        if isinstance(limits, list):
            listed = [point.eps for point in limits]
            twice = sorted({eps for eps in listed if listed.count(eps) > 1})
            if twice:
                raise ValueError(
                    f"min_adversarial_accuracy gives eps {', '.join(_fmt(e) for e in twice)} "
                    "more than once: keep one limit per eps"
                )
        return self

    def min_adversarial_limit(self, attack: AttackSpec) -> float | None:
        """``min_adversarial_accuracy`` for one attack (one ε): the fraction, or the limit
        listed at the attack's ε; None when that ε has no limit."""
        limits = self.min_adversarial_accuracy
        if not isinstance(limits, list):
            return limits
        if not isinstance(attack, _Budgeted) or attack.budget_key != "eps":
            return None
        return next((p.value for p in limits if p.eps == attack.budget), None)


# --------------------------------------------------------------------------- remediation, report
class SelectiveRetrainSpec(_Strict):
    epochs: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=2,
        description="training epochs, for the selective run and its control alike",
    )
    lr: Annotated[float, Field(gt=0.0)] = Field(default=1.0e-3, description="learning rate")
    optimizer: Literal["adam", "sgd"] = Field(default="adam", description="adam or sgd")
    adversarial_mix: Fraction = Field(
        default=0.0,
        description="fraction of each batch replaced by FGSM examples crafted on the model in "
        "training",
    )
    min_adversarial_gain: float | None = Field(
        default=None,
        description="the least adversarial-accuracy gain of selective retraining, asserted as an "
        "item of its own",
    )
    response: ResponseName = Field(
        default="adversarial",
        description="which response's fragile labels choose the frozen layers: clean or "
        "adversarial",
    )


class RemediationSpec(_Strict):
    selective_retrain: SelectiveRetrainSpec = Field(
        default_factory=SelectiveRetrainSpec,
        description="freeze the fragile layers, retrain the others, compare with retraining all",
    )


class ReportSpec(_Strict):
    dir: Path = Field(
        default=Path("inferlink-report"),
        description="folder for results.json and report.html, relative to the spec",
    )


class SequentialSpec(_Strict):
    """Sequential evaluation: the test set in rounds, each sweep stopping once everything that
    reads it is decided (docs/method.md §8, sequential.py)."""

    round: Annotated[int, Field(ge=1)] = Field(
        default=256,
        description="examples added to every undecided sweep per round (whole blocks: "
        "rounded up to a multiple of block)",
    )
    block: Annotated[int, Field(ge=1)] = Field(
        default=32,
        description="consecutive test examples kept together: the seeded order permutes "
        "blocks, and a round's batches are cut at block starts so each example is attacked "
        "exactly as in the full run (capped by data.batch_size)",
    )


class StatisticsSpec(_Strict):
    """How sure each number and decision is (opt-in; docs/method.md). The seed is the spec's."""

    confidence: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        default=0.95,
        description="confidence level of every interval",
    )
    resamples: Annotated[int, Field(ge=100, le=100_000)] = Field(
        default=1000,
        description="bootstrap resamples of the per-example outcomes",
    )
    decide: Literal["estimate", "strict", "lenient"] = Field(
        default="estimate",
        description="estimate (compare the estimate), strict (pass only if sure) or lenient (fail "
        "only if sure)",
    )
    sequential: SequentialSpec | None = Field(
        default=None,
        description="evaluate in rounds and stop each sweep once its labels, targeted flag "
        "and checks are decided at the confidence (Bonferroni over the rounds)",
    )


# --------------------------------------------------------------------------- analyses
class UnitsSpec(_Strict):
    """Unit semantics (Szegedy et al. 2014, §3): the test images that most activate single
    units of a layer next to those that most align with random directions (docs/method.md §9)."""

    layer: str = Field(
        min_length=1,
        description="the module whose output is analysed, named as model.named_modules() "
        "names it (e.g. 'conv2', 'fc1', 'layer3.1.relu'); a conv output is averaged over its "
        "spatial positions",
    )
    units: Annotated[int, Field(ge=1, le=64)] = Field(
        default=4,
        description="natural-basis units shown: the most variable over the test set",
    )
    directions: Annotated[int, Field(ge=1, le=64)] = Field(
        default=4,
        description="random unit-length directions of the activation space shown, drawn "
        "from the spec's seed",
    )
    k: Annotated[int, Field(ge=1, le=64)] = Field(
        default=8,
        description="test images shown per unit and per direction: the k with the largest "
        "activation or projection",
    )


class AnalysisSpec(_Strict):
    """Analyses that are reported and never asserted (each is an item that passes once
    computed)."""

    units: UnitsSpec | None = Field(
        default=None,
        description="unit semantics of one layer: top test images of units and of random "
        "directions, shown as image grids in the report",
    )


class ComputeSpec(_Strict):
    """The arithmetic of the sweeps (opt-in; docs/method.md, "Precision"). fp32 is exact and
    the definition; bf16 is an approximation whose error the run measures and confirms."""

    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="fp32: exact (the default). bf16: the sweeps run under bf16 autocast, "
        "only on hardware with native bf16 (CUDA Ampere or later; CPUs with AMX or AVX-512 "
        "BF16); the unfiltered network, attacks and checks on it stay fp32.",
    )
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        default="auto",
        description="Layout of 4-D inputs during the sweeps. auto: channels_last under bf16 "
        "(oneDNN and cuDNN run bf16 convolutions fastest in it), contiguous under fp32.",
    )
    confirm: bool | None = Field(
        default=None,
        description="Re-run in fp32 every bf16 sweep whose label, targeted flag or check "
        "value lies within the calibrated bf16 error of its boundary, so that final labels "
        "and decisions are fp32's. Default: true with bf16. Needs precision: bf16.",
    )

    @model_validator(mode="after")
    def _confirm_needs_bf16(self) -> ComputeSpec:
        if self.confirm and self.precision != "bf16":
            raise ValueError(
                "confirm re-runs bf16 sweeps in fp32: set precision: bf16, or leave confirm out"
            )
        return self

    @property
    def confirms(self) -> bool:
        """Whether bf16 sweeps near a boundary are re-run in fp32 (true by default with bf16)."""
        return self.precision == "bf16" and self.confirm is not False

    def channels_last(self, input_dims: int) -> bool:
        """Whether inputs of ``input_dims`` dimensions run in channels_last."""
        if input_dims != 4 or self.memory_format == "contiguous":
            return False
        return self.memory_format == "channels_last" or self.precision == "bf16"


# --------------------------------------------------------------------------- the audit
class AuditSpec(_Strict):
    """A whole audit: one model, its test set, the stress to apply and the checks to assert."""

    version: Literal[1] = Field(description="version of the spec format: 1")
    name: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        description="the model's name in item ids, results and the report"
    )
    model: ModelSpec = Field(description="how to build the network and which weights to load")
    data: DataSpec = Field(
        description="the test set the audit measures on, and how inputs are scaled"
    )
    device: str = Field(
        default="auto",
        description="auto, cpu, cuda, cuda:N, xla, xla:N or mps (auto: CUDA when available, else "
        "the CPU)",
        json_schema_extra={"pattern": _DEVICE_RE.pattern},  # editors check it; the model too
    )
    seed: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="seeds Python, NumPy and torch: random attacks and sampling repeat exactly",
    )
    filtering: FilteringSpec = Field(
        default_factory=FilteringSpec,
        description="synaptic filtering: scopes, filters, thresholds and layers swept",
    )
    attacks: list[AttackItem] = Field(
        default_factory=lambda: [AttackItem(fgsm=FGSMSpec(eps=DEFAULT_FGSM_EPS))],
        description="the external stress, one mapping per attack such as '- fgsm: {eps: 0.1}' "
        "(default: FGSM with ε = 8/255)",
    )
    checks: ChecksSpec = Field(
        default_factory=ChecksSpec,
        description="limits the audit asserts; each absent key is not checked",
    )
    baseline: Path | None = Field(
        default=None,
        description="results.json of the released model, for the regression checks",
    )
    compare: list[Path] = Field(
        default_factory=list,
        description="further specs audited into the same report (label consistency, "
        "transferability)",
    )
    remediation: RemediationSpec | None = Field(
        default=None,
        description="selective retraining of a failing model (needs data.train)",
    )
    report: ReportSpec = Field(default_factory=ReportSpec, description="where the report goes")
    statistics: StatisticsSpec | None = Field(
        default=None,
        description="opt-in intervals for every number and decision",
    )
    compute: ComputeSpec = Field(
        default_factory=ComputeSpec,
        description="arithmetic of the sweeps: precision, memory format, fp32 confirmation",
    )
    analysis: AnalysisSpec = Field(
        default_factory=AnalysisSpec,
        description="informational analyses (unit semantics), reported but never asserted",
    )

    # Set by the loader: where the spec came from, so errors and reports can point into it.
    _source_path: Path | None = PrivateAttr(default=None)
    _positions: dict[tuple[str | int, ...], int] = PrivateAttr(default_factory=dict)
    _sha256: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _consistent(self) -> AuditSpec:
        if not _DEVICE_RE.match(self.device):
            raise ValueError(
                f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N, xla, mps"
            )
        ids = [attack.id for attack in self.attack_points]
        if len(set(ids)) != len(ids):
            raise ValueError(f"attacks lists the same attack twice: {ids}")
        self._per_eps_limits_used()
        if not self.attacks:
            raise ValueError(
                "attacks is empty: leave the key out for the default FGSM, or list one"
            )
        needs_local = [
            key
            for key in ("max_fragile_fraction", "max_targeted_layers")
            if getattr(self.checks, key) is not None
        ]
        if needs_local and "local" not in self.filtering.scopes:
            raise ValueError(
                f"checks {', '.join(needs_local)} label layers one by one: "
                "add 'local' to filtering.scopes"
            )
        needs_baseline = [
            key
            for key in ("no_new_fragile_layers", "max_score_drop")
            if getattr(self.checks, key) not in (None, False)
        ]
        if needs_baseline and self.baseline is None:
            raise ValueError(
                f"checks {', '.join(needs_baseline)} compare with a released model: "
                "set 'baseline: path/to/results.json'"
            )
        sequential = self.statistics is not None and self.statistics.sequential is not None
        if sequential and self.filtering.fast:
            raise ValueError(
                "statistics.sequential decides each sweep from its per-example outcomes, which "
                "filtering.fast's batched passes do not keep: remove filtering.fast, or "
                "statistics.sequential"
            )
        if self.remediation is not None and self.data.train is None:
            raise ValueError("remediation retrains the model: set data.train (the training split)")
        if self.remediation is not None and "local" not in self.filtering.scopes:
            # the global scope labels no single layer, so there would be nothing to freeze
            raise ValueError(
                "remediation freezes the layers labelled fragile one by one: "
                "add 'local' to filtering.scopes"
            )
        return self

    # ----------------------------------------------------------------- loader-set metadata
    @property
    def source_path(self) -> Path | None:
        return self._source_path

    @property
    def spec_dir(self) -> Path:
        return self._source_path.parent if self._source_path is not None else Path.cwd()

    @property
    def sha256(self) -> str:
        return self._sha256

    def line_of(self, *keys: str | int) -> int | None:
        """1-based line of a key path in the spec file (nearest known ancestor), if loaded from
        one."""
        path = tuple(keys)
        while path:
            if path in self._positions:
                return self._positions[path]
            path = path[:-1]
        return self._positions.get((), None)

    def _per_eps_limits_used(self) -> None:
        """Every ε that ``min_adversarial_accuracy`` lists is the ε of some attack."""
        limits = self.checks.min_adversarial_accuracy
        if not isinstance(limits, list):
            return
        used = sorted(
            {a.budget for a in self.attack_points if isinstance(a, _Budgeted)}
            - {a.budget for a in self.attack_points if isinstance(a, GaussianSpec)}
        )
        unused = [p.eps for p in limits if p.eps not in used]
        if unused:
            raise ValueError(
                f"checks.min_adversarial_accuracy gives a limit at eps "
                f"{', '.join(_fmt(e) for e in unused)}, which no attack uses (the attacks' "
                f"eps: {', '.join(_fmt(e) for e in used) or 'none'}); list eps that an "
                "attack uses, or add them to an attack's eps"
            )

    @property
    def attack_specs(self) -> list[AttackSpec]:
        """One attack per entry, in spec order (FGSM with ε = 8/255 when the spec lists none);
        for an entry with a list of ε, the ε that filtering sweeps and indicators use."""
        return [
            item.spec.at(item.spec.budget) if isinstance(item.spec, _Budgeted) else item.spec
            for item in self.attacks
        ]

    @property
    def attack_points(self) -> list[AttackSpec]:
        """Every attack the audit measures on the unfiltered network: one per listed ε, entry
        by entry (the same as ``attack_specs`` when no entry lists several ε)."""
        return [
            point
            for item in self.attacks
            for point in (item.spec.points() if isinstance(item.spec, _Budgeted) else [item.spec])
        ]

    @property
    def curves(self) -> list[CurveSpec]:
        """The entries that list several budgets: each draws an accuracy curve."""
        return [
            item.spec
            for item in self.attacks
            if isinstance(item.spec, _Budgeted) and item.spec.curve is not None
        ]

    def curve_of(self, attack_id: str) -> CurveSpec | None:
        """The curve whose sweep point is ``attack_id`` (None for a single-budget attack)."""
        return next(
            (c for c in self.curves if c.at(c.budget).id == attack_id),
            None,
        )

    def attack(self, attack_id: str) -> AttackSpec:
        for attack in self.attack_points:
            if attack.id == attack_id:
                return attack
        raise KeyError(attack_id)
