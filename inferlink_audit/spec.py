"""The audit spec (README): validated pydantic models.

Every model forbids unknown keys so a typo is an error, not a silently ignored setting.
Loading (YAML with line positions, error messages that name ``file:line: key``) lives in
``spec_loader``; this module only says what a valid spec is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

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
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path | None = None
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

    mean: list[float] = Field(min_length=1)
    std: list[Annotated[float, Field(gt=0.0)]] = Field(min_length=1)

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

    source: DataSource
    split: Literal["train", "test"] = "test"
    path: Path | None = None
    name: TorchvisionDataset | None = None
    root: Path | None = None
    download: bool = False
    limit: PositiveInt | None = None

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
    batch_size: PositiveInt | Literal["auto"] = 256
    input_range: tuple[float, float] = (0.0, 1.0)
    normalize: NormalizeSpec | None = None
    train: DataSourceSpec | None = None

    @model_validator(mode="after")
    def _range_order(self) -> DataSpec:
        lo, hi = self.input_range
        if not lo < hi:
            raise ValueError(f"input_range [{lo}, {hi}] must have low < high")
        return self


# --------------------------------------------------------------------------- filtering
class LayerSelectionSpec(_Strict):
    """Which modules are analysed: by type name, then glob include/exclude on qualified names."""

    types: list[str] = Field(default_factory=lambda: list(DEFAULT_LAYER_TYPES), min_length=1)
    include: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    exclude: list[str] = Field(default_factory=list)
    parameters: list[str] = Field(default_factory=lambda: ["weight"], min_length=1)


def _default_scopes() -> list[ScopeName]:
    return ["local", "global"]


def _default_filters() -> list[FilterName]:
    return ["low_pass", "high_pass", "pulse"]


class FilteringSpec(_Strict):
    """Synaptic filtering (docs/method.md §2–4)."""

    scopes: list[ScopeName] = Field(default_factory=_default_scopes, min_length=1)
    filters: list[FilterName] = Field(default_factory=_default_filters, min_length=1)
    thresholds: Annotated[int, Field(ge=3, le=10_000)] = 25
    values: Literal["signed", "magnitude"] = "signed"
    layers: LayerSelectionSpec = Field(default_factory=LayerSelectionSpec)
    adversarial_source: Literal["filtered", "original"] = "filtered"
    tolerance: Annotated[float, Field(ge=0.0)] = 0.05
    range: tuple[float, float] | None = None
    fast: bool = False
    # Memory for the activations a local sweep reuses: every storage the cache keeps alive
    # (FGSM's saved autograd tensors, live and skip values) counts, and a scope whose cache
    # would not fit runs whole. 2 GiB keeps an audit within a 7 GB CI runner; on a
    # 16/32/64-channel ResNet with 1,024 32x32 images the deepest FGSM cache needs 1.05 GB and
    # saves 1.45x per variant there (benchmarks/README.md).
    prefix_cache_mb: Annotated[int, Field(ge=0)] = 2048

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


class FGSMSpec(_Strict):
    """Fast gradient sign method (Goodfellow et al., 2015)."""

    eps: Annotated[float, Field(gt=0.0)]

    kind: ClassVar[str] = "fgsm"

    @property
    def id(self) -> str:
        return f"fgsm_eps{_fmt(self.eps)}"

    @property
    def label(self) -> str:
        return f"fgsm(eps={_fmt(self.eps)})"


class PGDSpec(_Strict):
    """Projected gradient descent (Madry et al., 2018), L∞ or L2."""

    eps: Annotated[float, Field(gt=0.0)]
    steps: Annotated[int, Field(ge=1, le=10_000)] = 10
    step_size: Annotated[float, Field(gt=0.0)] | None = None
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = False

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


class GaussianSpec(_Strict):
    """Additive Gaussian noise, clamped to the input range."""

    sigma: Annotated[float, Field(gt=0.0)]

    kind: ClassVar[str] = "gaussian"

    @property
    def id(self) -> str:
        return f"gaussian_sigma{_fmt(self.sigma)}"

    @property
    def label(self) -> str:
        return f"gaussian(sigma={_fmt(self.sigma)})"


class LBFGSSpec(_Strict):
    """Box-constrained L-BFGS (Szegedy et al., 2014)."""

    target: Literal["next", "random"] | Annotated[int, Field(ge=0)] = "next"
    max_iter: Annotated[int, Field(ge=1, le=10_000)] = 50

    kind: ClassVar[str] = "lbfgs"

    @property
    def id(self) -> str:
        return f"lbfgs_{self.target}"

    @property
    def label(self) -> str:
        return f"lbfgs(target={self.target})"


Norm = Literal["linf", "l2"]


class APGDSpec(_Strict):
    """Auto-PGD (Croce & Hein, 2020): step size, momentum and restarts set by the method."""

    eps: Annotated[float, Field(gt=0.0)]
    norm: Norm = "linf"
    loss: Literal["ce", "dlr"] = "ce"
    steps: Annotated[int, Field(ge=1, le=10_000)] = 100
    restarts: Annotated[int, Field(ge=1, le=100)] = 1
    targeted: bool = False
    target_classes: Annotated[int, Field(ge=1, le=1000)] = 9  # top classes tried when targeted

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


class SquareSpec(_Strict):
    """Square attack (Andriushchenko et al., 2020): score-based, gradient-free, L∞ or L2."""

    eps: Annotated[float, Field(gt=0.0)]
    norm: Norm = "linf"
    queries: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    p_init: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8

    kind: ClassVar[str] = "square"

    @property
    def id(self) -> str:
        return f"square_{self.norm}_eps{_fmt(self.eps)}_q{self.queries}"

    @property
    def label(self) -> str:
        return f"square-{self.norm}(eps={_fmt(self.eps)}, queries={self.queries})"


class AutoAttackSpec(_Strict):
    """AutoAttack (Croce & Hein, 2020): an ensemble, the worst case per example."""

    eps: Annotated[float, Field(gt=0.0)]
    norm: Norm = "linf"
    version: Literal["standard", "fast"] = "standard"

    kind: ClassVar[str] = "autoattack"

    @property
    def id(self) -> str:
        suffix = "_fast" if self.version == "fast" else ""
        return f"autoattack_{self.norm}_eps{_fmt(self.eps)}{suffix}"

    @property
    def label(self) -> str:
        return f"autoattack-{self.norm}(eps={_fmt(self.eps)}, {self.version})"


AttackSpec = FGSMSpec | PGDSpec | GaussianSpec | LBFGSSpec | APGDSpec | SquareSpec | AutoAttackSpec
GRADIENT_ATTACKS = (FGSMSpec, PGDSpec, LBFGSSpec, APGDSpec, AutoAttackSpec)


class AttackItem(_Strict):
    """One entry of ``attacks:``, a one-key mapping such as ``- fgsm: {eps: 0.1}``."""

    fgsm: FGSMSpec | None = None
    pgd: PGDSpec | None = None
    gaussian: GaussianSpec | None = None
    lbfgs: LBFGSSpec | None = None
    apgd: APGDSpec | None = None
    square: SquareSpec | None = None
    autoattack: AutoAttackSpec | None = None

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
    value: Fraction
    on: ResponseName = "adversarial"


class ChecksSpec(_Strict):
    """Thresholds the audit asserts; each absent key is simply not checked."""

    min_clean_accuracy: Fraction | None = None
    min_adversarial_accuracy: Fraction | None = None
    max_fragile_fraction: FragileFractionCheck | None = None
    max_targeted_layers: Annotated[int, Field(ge=0)] | None = None
    max_lipschitz_upper_bound: Annotated[float, Field(gt=0.0)] | None = None
    no_new_fragile_layers: bool = False
    max_score_drop: Annotated[float, Field(ge=0.0)] | None = None
    # Attack-failure indicators (attack_sanity): None: on when pgd, apgd or autoattack is listed.
    attack_sanity: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_fraction(cls, data: Any) -> Any:
        """``max_fragile_fraction: 0.4`` is shorthand for ``{value: 0.4, on: adversarial}``."""
        if isinstance(data, dict):
            value = data.get("max_fragile_fraction")
            if isinstance(value, int | float) and not isinstance(value, bool):
                data = {**data, "max_fragile_fraction": {"value": value}}
        return data


# --------------------------------------------------------------------------- remediation, report
class SelectiveRetrainSpec(_Strict):
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 2
    lr: Annotated[float, Field(gt=0.0)] = 1.0e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    adversarial_mix: Fraction = 0.0
    min_adversarial_gain: float | None = None
    response: ResponseName = "adversarial"


class RemediationSpec(_Strict):
    selective_retrain: SelectiveRetrainSpec = Field(default_factory=SelectiveRetrainSpec)


class ReportSpec(_Strict):
    dir: Path = Path("inferlink-report")


class StatisticsSpec(_Strict):
    """How sure each number and decision is (opt-in; docs/method.md). The seed is the spec's."""

    confidence: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.95
    resamples: Annotated[int, Field(ge=100, le=100_000)] = 1000
    decide: Literal["estimate", "strict", "lenient"] = "estimate"


# --------------------------------------------------------------------------- the audit
class AuditSpec(_Strict):
    """A whole audit: one model, its test set, the stress to apply and the checks to assert."""

    version: Literal[1]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    model: ModelSpec
    data: DataSpec
    device: str = "auto"
    seed: Annotated[int, Field(ge=0)] = 0
    filtering: FilteringSpec = Field(default_factory=FilteringSpec)
    attacks: list[AttackItem] = Field(
        default_factory=lambda: [AttackItem(fgsm=FGSMSpec(eps=DEFAULT_FGSM_EPS))]
    )
    checks: ChecksSpec = Field(default_factory=ChecksSpec)
    baseline: Path | None = None
    compare: list[Path] = Field(default_factory=list)
    remediation: RemediationSpec | None = None
    report: ReportSpec = Field(default_factory=ReportSpec)
    statistics: StatisticsSpec | None = None

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
        ids = [attack.id for attack in self.attack_specs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"attacks lists the same attack twice: {ids}")
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

    @property
    def attack_specs(self) -> list[AttackSpec]:
        """The attacks in spec order (FGSM with ε = 8/255 when the spec lists none)."""
        return [item.spec for item in self.attacks]

    def attack(self, attack_id: str) -> AttackSpec:
        for attack in self.attack_specs:
            if attack.id == attack_id:
                return attack
        raise KeyError(attack_id)
