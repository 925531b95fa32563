"""``inferlink-audit init``: a starter spec written from what the user already knows.

The spec is rendered through the YAML emitter (every value quoted as it needs) and validated
by the spec loader before it is written. When the model can be built and the data read, the
model is inspected: its convolution and linear layers fill ``filtering.layers`` (all of them
for a small model; for a big one the first, the last and the largest of each stage), the
checkpoint is loaded (so a mismatch is reported now) and one filtered variant is timed, which
gives the audit's estimated cost. What could not be settled is returned as a list of things
still to edit, which is all the closing message shows.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import AuditError
from .schema import SCHEMA_FILENAME, editor_line
from .spec import DEFAULT_FGSM_EPS

if TYPE_CHECKING:
    from .layers import AnalysedLayer
    from .spec import AuditSpec

# A model with at most this many filterable layers is audited whole.
MAX_ALL_LAYERS = 8
# For a bigger one: the first, the last, and the largest layer of at most this many stages.
MAX_STAGES = 6
DATA_SOURCES = ("sklearn_digits",)
TORCHVISION_DATASETS = ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100")
PLACEHOLDER_FACTORY = "models.py:Net"
PLACEHOLDER_CHECKPOINT = "model.safetensors"
# Passes over the test set per filtered variant with FGSM crafted against the filtered
# network: forward (clean prediction and loss), input-only backward, adversarial forward.
PASSES_PER_VARIANT = 3


@dataclass(frozen=True)
class StarterOptions:
    """What ``init`` was told; ``None`` where the user gave nothing (a placeholder is written)."""

    name: str = "my-model"
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    data: dict[str, Any] | None = None
    input_range: tuple[float, float] = (0.0, 1.0)
    normalize: tuple[list[float], list[float]] | None = None
    device: str = "auto"


@dataclass(frozen=True)
class LayerChoice:
    """The layers ``filtering.layers.include`` names, and why."""

    include: list[str]  # ["*"] for all
    total: int
    kinds: list[str]
    reason: str


@dataclass
class Inspection:
    """What inspecting the model found; ``todo`` is what the user still has to edit."""

    todo: list[str] = field(default_factory=list)
    layers: LayerChoice | None = None
    report: list[str] = field(default_factory=list)  # lines printed before the closing message


# --------------------------------------------------------------------------- options
def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``--kwargs``: a YAML mapping (``"{num_classes: 10}"`` or ``"num_classes: 10"``) or
    ``key=value`` pairs separated by commas (``num_classes=10,width=2``)."""
    if text is None or not text.strip():
        return {}
    stripped = text.strip()
    if "=" in stripped and not stripped.startswith("{") and ":" not in stripped:
        pairs = [part.split("=", 1) for part in stripped.split(",")]
        if any(len(pair) != 2 or not pair[0].strip() for pair in pairs):
            raise AuditError(f"--kwargs {text!r}: write key=value pairs separated by commas.")
        return {key.strip(): _yaml_value(value.strip(), text) for key, value in pairs}
    value = _yaml_value(stripped if stripped.startswith("{") else "{" + stripped + "}", text)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise AuditError(
            f"--kwargs {text!r} is not a mapping of names to values; write e.g. "
            '--kwargs "num_classes: 10" or --kwargs num_classes=10.'
        )
    return value


def _yaml_value(text: str, given: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise AuditError(
            f'--kwargs {given!r}: {problem}; write e.g. --kwargs "num_classes: 10".'
        ) from None


def relative_to_spec(path: str | None, spec_path: Path) -> str | None:
    """A path given on the command line (relative to the current folder, as the shell
    completes it) rewritten relative to the spec's folder, where the spec resolves it."""
    if path is None or os.path.isabs(os.path.expanduser(path)) or path.startswith("~"):
        return path
    spec_dir = os.path.dirname(os.path.abspath(spec_path))
    return os.path.relpath(os.path.abspath(path), spec_dir)


def parse_data(text: str | None, spec_path: Path) -> dict[str, Any] | None:
    """``--data``: ``sklearn_digits``, a ``.pt``/``.npz`` tensors file, a folder of images
    (``ImageFolder``), or ``CIFAR10:~/datasets`` (a torchvision data set's name and local root)."""
    if text is None:
        return None
    if text in DATA_SOURCES:
        return {"source": text, "split": "test"}
    name, sep, root = text.partition(":")
    if sep and name in TORCHVISION_DATASETS and root.strip():
        folder = relative_to_spec(root.strip(), spec_path)
        return {"source": "torchvision", "name": name, "root": folder, "split": "test"}
    if Path(text).expanduser().is_dir():
        folder = relative_to_spec(text, spec_path)
        return {"source": "torchvision", "name": "ImageFolder", "root": folder, "split": "test"}
    if Path(text).suffix.lower() in (".pt", ".pth", ".npz"):
        return {"source": "tensors", "path": relative_to_spec(text, spec_path)}
    raise AuditError(
        f"--data {text!r} is not a .pt/.npz tensors file, an image folder, sklearn_digits, or "
        f"NAME:ROOT with NAME one of {', '.join(TORCHVISION_DATASETS)}."
    )


def parse_floats(text: str, option: str) -> list[float]:
    """``0.485,0.456,0.406`` → three floats (``option`` names the flag in the message)."""
    try:
        return [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise AuditError(
            f"{option} {text!r}: give numbers separated by commas, e.g. 0.485,0.456,0.406."
        ) from None


# --------------------------------------------------------------------------- rendering
def scalar(value: Any) -> str:
    """``value`` as one line of YAML that reads back as the same value; strings are always
    double-quoted (``torchvision: resnet18``, ``#``, quotes, spaces, non-ASCII letters)."""
    style = '"' if isinstance(value, str) else None
    dumped = yaml.safe_dump(value, default_style=style, allow_unicode=True, width=2**31)
    return dumped.removesuffix("\n...\n").rstrip("\n")


def _flow(value: Any) -> str:
    dumped = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=2**31)
    return dumped.removesuffix("\n...\n").rstrip("\n")


def _number(value: float) -> str:
    return f"{value:g}" if "e" not in f"{value:g}" else repr(value)


def render_spec(options: StarterOptions, layers: LayerChoice | None = None) -> str:
    """The starter spec's text. Line 5 is ``model.factory`` (errors point at it)."""
    lo, hi = options.input_range
    eps = DEFAULT_FGSM_EPS * (hi - lo)
    data = options.data or {"source": "sklearn_digits", "split": "test"}
    lines = [
        # Editors that speak the YAML language server complete and check keys with the schema
        # init writes next to the spec (a relative path: it works offline and moves with it).
        editor_line(f"./{SCHEMA_FILENAME}"),
        "version: 1                    # inferlink-audit spec (init): README.md lists every key",
        f"name: {scalar(options.name)}",
        "model:",
        f"  factory: {scalar(options.factory or PLACEHOLDER_FACTORY)}",
        f"  kwargs: {_flow(options.kwargs)}",
        f"  checkpoint: {scalar(options.checkpoint or PLACEHOLDER_CHECKPOINT)}",
        "data:",
        *(f"  {key}: {scalar(value)}" for key, value in data.items()),
        "  limit: 512                 # the first N examples; the cost is linear in it",
        "  batch_size: 256            # or auto: the largest batch that fits the device",
        f"  input_range: [{_number(lo)}, {_number(hi)}]    # the box attacks stay in",
    ]
    if options.normalize is not None:
        mean, std = options.normalize
        lines.append(f"  normalize: {{mean: {_flow(mean)}, std: {_flow(std)}}}")
    lines += [
        f"device: {scalar(options.device)}",
        "seed: 0",
        "filtering:",
        "  scopes: [local, global]",
        "  filters: [low_pass, high_pass, pulse]",
        "  thresholds: 25",
    ]
    if layers is not None:
        lines += [
            "  layers:",
            f"    # {layers.reason}",
            "    include:",
            *(f"      - {scalar(_glob_literal(name))}" for name in layers.include),
        ]
    lines += [
        "attacks:",
        f"  - fgsm: {{eps: {_number(round(eps, 4))}}}     # 8/255 of the input range",
        "checks:                       # placeholder limits: set what this model must meet",
        "  min_clean_accuracy: 0.90",
        "  min_adversarial_accuracy: 0.30",
        "  max_fragile_fraction: {value: 0.40, on: adversarial}",
    ]
    return "\n".join(lines) + "\n"


def _glob_literal(name: str) -> str:
    """A module name as an include pattern matching only itself (``[`` → ``[[]``)."""
    if name == "*":
        return name
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


# --------------------------------------------------------------------------- layers
def choose_layers(layers: Sequence[AnalysedLayer]) -> LayerChoice:
    """All layers of a small model; of a big one the first, the last and the largest of
    each stage (modules grouped by the shallowest name prefix that gives ≥ 3 groups, at most
    ``MAX_STAGES`` of them, evenly spaced)."""
    names = [layer.name for layer in layers]
    kinds = sorted({layer.type for layer in layers})
    kind_text = "/".join(kinds)
    if len(names) <= MAX_ALL_LAYERS:
        return LayerChoice(
            ["*"], len(names), kinds, f"all {len(names)} {kind_text} layers of the model"
        )
    stages = _stages(names)
    if len(stages) > MAX_STAGES:
        step = (len(stages) - 1) / (MAX_STAGES - 1)
        stages = [stages[round(i * step)] for i in range(MAX_STAGES)]
    size = {layer.name: layer.numel for layer in layers}
    chosen = {names[0], names[-1]}
    for members in stages:
        chosen.add(max(members, key=lambda n: (size[n], -names.index(n))))
    include = [name for name in names if name in chosen]
    reason = (
        f"{len(include)} of the model's {len(names)} {kind_text} layers: the first, the last "
        "and the largest of each stage. Each listed layer is one local sweep; "
        f'include: ["*"] audits all {len(names)}.'
    )
    return LayerChoice(include, len(names), kinds, reason)


def _stages(names: list[str]) -> list[list[str]]:
    depth = 1
    deepest = max(name.count(".") + 1 for name in names)
    while True:
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(".".join(name.split(".")[:depth]), []).append(name)
        if len(groups) >= 3 or depth >= deepest:
            return list(groups.values())
        depth += 1


# --------------------------------------------------------------------------- inspection
def missing_files(spec: AuditSpec, options: StarterOptions) -> list[str]:
    """What the spec names but is not there yet (or was never given): the user's to-do."""
    todo = []
    where = spec.spec_dir
    if options.factory is None:
        todo.append(
            f"model.factory: {PLACEHOLDER_FACTORY} is a placeholder; name your model "
            '(module.path:Name, file.py:Name next to the spec, or "torchvision: <name>")'
        )
    elif spec.model.factory_kind == "file":
        file = where / spec.model.factory_target.split(":", 1)[0]
        if not file.is_file():
            todo.append(f"model.factory: {file} does not exist yet")
    elif spec.model.factory_kind == "torchscript":
        file = where / spec.model.factory_target
        if not file.is_file():
            todo.append(f"model.factory: {file} does not exist yet")
    if options.checkpoint is None:
        todo.append(
            f"model.checkpoint: {PLACEHOLDER_CHECKPOINT} is a placeholder; point it at your "
            "weights (.safetensors, .pt)"
        )
    elif spec.model.checkpoint is not None and not spec.model.checkpoint.is_file():
        todo.append(f"model.checkpoint: {spec.model.checkpoint} does not exist yet")
    if options.data is None:
        todo.append(
            "data: the starter audits scikit-learn's digits; point it at your test set "
            "(--data test.pt, a .npz, an image folder)"
        )
    elif spec.data.path is not None and not spec.data.path.is_file():
        todo.append(f"data.path: {spec.data.path} does not exist yet")
    return todo


def inspect(spec: AuditSpec, options: StarterOptions) -> Inspection:
    """Build the model, load the checkpoint and the data, choose the layers, time one variant.

    Files that do not exist yet are things to edit; a checkpoint that does not fit the model,
    or data that do not fit it, are errors (``AuditError``, located in the spec).
    """
    result = Inspection(todo=missing_files(spec, options))
    if any(item.startswith(("model.factory", "model.checkpoint", "data")) for item in result.todo):
        if result.todo:
            result.todo.append(
                "then run init again with --force: it fills filtering.layers from the model "
                "and estimates the audit's cost"
            )
        return result
    from .data import load_dataset, validate_dataset
    from .devices import resolve_device, seed_everything
    from .layers import select_layers
    from .models import load_model
    from .spec_loader import located_errors

    seed_everything(spec.seed)
    data_key = ("data", "path") if spec.data.path is not None else ("data",)
    with located_errors(spec, data_key):
        dataset = load_dataset(spec.data)
    with located_errors(
        spec, lambda exc: ("model", "checkpoint") if "checkpoint" in str(exc) else ("model",)
    ):
        loaded = load_model(
            spec.model, spec.data, spec_dir=spec.spec_dir, example_input=dataset.x[:1]
        )
    with located_errors(spec, data_key):
        validate_dataset(
            dataset,
            num_outputs=loaded.num_outputs,
            input_range=spec.data.input_range,
            where=dataset.description,
        )
    with located_errors(spec, ("filtering", "layers")):
        layers = select_layers(loaded.inner, spec.filtering.layers)
    result.layers = choose_layers(layers)
    with located_errors(spec, ("device",)):
        device = resolve_device(spec.device)
    seconds, clean, adversarial = _time_one_variant(
        loaded.module, dataset.x, dataset.y, spec, device
    )
    batch = spec.data.batch_size if isinstance(spec.data.batch_size, int) else 256
    result.report += [
        f"model: {loaded.description}",
        f"data: {dataset.description}",
        f"layers: {result.layers.reason}",
    ]
    result.report += _estimate(spec, layers, result.layers, len(dataset), seconds, device, batch)
    attack = spec.attack_specs[0] if spec.attack_specs else None
    label = attack.label if attack is not None else "fgsm"
    result.todo.append(
        "checks: the limits are placeholders; set what this model must meet (measured now: "
        f"clean accuracy {clean:.3f}, {label} accuracy {adversarial:.3f})"
    )
    return result


def _time_one_variant(
    module: Any, x: Any, y: Any, spec: AuditSpec, device: Any
) -> tuple[float, float, float]:
    """Seconds for one filtered variant as a sweep runs it (FGSM against the network: forward,
    input gradient, adversarial forward, over the whole test set), and the clean and
    adversarial accuracies measured on the way."""
    import torch

    from .attacks import FGSM
    from .devices import synchronize
    from .spec import FGSMSpec

    first = spec.attack_specs[0] if spec.attack_specs else None
    eps = first.eps if isinstance(first, FGSMSpec) else DEFAULT_FGSM_EPS
    attack = FGSM(FGSMSpec(eps=eps), spec.data.input_range, spec.seed)
    batch = spec.data.batch_size if isinstance(spec.data.batch_size, int) else 256
    module = module.to(device).eval()
    x, y = x.to(device), y.to(device)
    for p in module.parameters():
        p.requires_grad_(False)

    def one_pass() -> tuple[int, int]:
        clean = adversarial = 0
        for start in range(0, len(x), batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            out = attack(module, xb, yb, offset=start)
            assert out.clean_logits is not None
            clean += int((out.clean_logits.argmax(1) == yb).sum())
            with torch.no_grad():
                adversarial += int((module(out.adversarial).argmax(1) == yb).sum())
        return clean, adversarial

    one_pass()  # warm-up: first calls allocate and pick kernels
    synchronize(device)
    started = time.perf_counter()
    clean, adversarial = one_pass()
    synchronize(device)
    seconds = time.perf_counter() - started
    return seconds, clean / len(x), adversarial / len(x)


def _estimate(
    spec: AuditSpec,
    layers: Sequence[AnalysedLayer],
    choice: LayerChoice,
    examples: int,
    seconds: float,
    device: Any,
    batch: int,
) -> list[str]:
    n = spec.filtering.thresholds
    chosen = [
        layer
        for layer in layers
        if any(fnmatch.fnmatchcase(layer.name, _glob_literal(p)) for p in choice.include)
    ]
    scopes = spec.filtering.scopes
    local = sum(min(n, layer.numel + 1) for layer in chosen) if "local" in scopes else 0
    per_filter = local + (n if "global" in scopes else 0)
    filters = len(spec.filtering.filters)
    attacks = max(1, len(spec.attacks))
    variants = per_filter * filters * attacks
    total = variants * seconds
    sweeps = f"{len(chosen)} layers" if "local" in scopes else "no local sweeps"
    return [
        f"estimated cost: ({sweeps}{' + global' if 'global' in scopes else ''}) × {n} "
        f"thresholds × {filters} filters × {attacks} attack(s) = {variants} variants × "
        f"{PASSES_PER_VARIANT} passes × {examples} examples",
        f"one variant took {seconds:.2f} s here ({device}, batch {batch}, "
        f"{_threads()} thread(s)): about {_duration(total)} in all, an upper bound (repeated "
        "masks are skipped; local sweeps reuse the unfiltered layers before the cut)",
        "what changes it: data.limit and filtering.thresholds (linear), the layers in "
        "filtering.layers.include (one sweep each), filtering.filters and filtering.scopes; "
        "filtering.adversarial_source: original crafts the examples once (about half)",
    ]


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
