"""Remediation by selective retraining (docs/method.md §7; Pravin et al. 2024, §6).

The layers the audit labelled fragile are frozen and the robust and antifragile ones are
trained for a few epochs on the training split, optionally mixing in FGSM examples crafted
against the model being trained. A control run trains every analysed layer for the same
budget from the same weights with the same batches, so the report can say whether
selectivity helped. Both runs work on copies: the audited model in memory and its
checkpoint are never changed. Both retrained checkpoints are written (atomically) next to
the report.

Freezing policy. Only analysed layers train: in the selective run the robust and antifragile
ones, in the control all of them. A normalisation module (BatchNorm, LayerNorm, GroupNorm,
InstanceNorm, RMSNorm) that directly consumes an analysed layer's output belongs to that
layer and trains or stays frozen with it, affine parameters and running statistics alike.
It is found in the ``torch.fx`` graph when the network traces and calls the layer as a
module, else by module order: the first module registered after the layer (outside the
layer itself) that owns parameters or buffers, when that module is a normalisation. Every
other tensor (modules never analysed,
such as embeddings or a normalisation of the input, and free parameters) is frozen in both
runs. A module whose tensors are all frozen and that owns buffers runs in eval mode while
the rest trains, so its running statistics stay fixed; afterwards every frozen tensor is
checked bit for bit. Both runs start from the same random state (dropout masks, batch order).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import fx, nn

from .attacks import Attack
from .errors import IntegrityError
from .fileio import atomic_write_bytes
from .progress import Progress, tracked
from .spec import SelectiveRetrainSpec
from .sweep import EvalData

_NORMALISATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
# TorchScript modules keep only their original class name.
_NORMALISATION_NAMES = frozenset(
    [f"{kind}{d}d" for kind in ("BatchNorm", "LazyBatchNorm", "InstanceNorm") for d in (1, 2, 3)]
    + ["SyncBatchNorm", "LayerNorm", "GroupNorm", "RMSNorm"]
)
FOUND_BY_FX = "torch.fx graph"
FOUND_BY_ORDER = "module order (the network does not trace with torch.fx)"


@dataclass(frozen=True)
class RunScores:
    clean_before: float
    clean_after: float
    adversarial_before: float
    adversarial_after: float


def safe_file_stem(name: str) -> str:
    """A file name from a spec's name that cannot leave its folder or hide itself."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return stem[:100]


def _accuracies(model: nn.Module, data: EvalData, attack: Attack) -> tuple[float, float]:
    model.eval()
    clean = adversarial = 0
    for _, xb, yb, out in data.attacked(attack, model):
        with torch.inference_mode():
            logits = out.clean_logits if out.clean_logits is not None else model(xb)
            clean += int((logits.argmax(1) == yb).sum())
            adversarial += int((model(out.adversarial).argmax(1) == yb).sum())
    return clean / data.n, adversarial / data.n


def is_normalisation(module: nn.Module) -> bool:
    """Whether ``module`` normalises its input (and so rescales the layer that feeds it)."""
    if isinstance(module, _NORMALISATION_TYPES):
        return True
    return getattr(module, "original_name", None) in _NORMALISATION_NAMES


def _owns_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )


def _next_normalisation(inner: nn.Module, layer: str) -> list[str]:
    """Module order: the first module after ``layer`` that owns tensors, if it normalises."""
    names = [name for name, _ in inner.named_modules()]
    if layer not in names:
        return []
    for name in names[names.index(layer) + 1 :]:
        if name.startswith(layer + "."):
            continue
        module = inner.get_submodule(name)
        if _owns_tensors(module):
            return [name] if is_normalisation(module) else []
    return []


def attached_normalisation(
    inner: nn.Module, layers: Sequence[str]
) -> tuple[dict[str, list[str]], str]:
    """The normalisation modules that belong to each analysed layer, and how they were found.

    A normalisation belongs to a layer when it is called on the layer's output directly, so
    freezing the layer without it would still let its output be rescaled.
    """
    try:
        graph: fx.Graph | None = fx.symbolic_trace(inner).graph
    except Exception:  # any tracing failure: fall back to the documented module order
        graph = None
    attached: dict[str, list[str]] = {}
    for layer in layers:
        calls = (
            [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
            if graph is not None
            else []
        )
        if calls:
            found = [
                str(user.target)
                for node in calls
                for user in node.users
                if user.op == "call_module"
                and user.args[:1] == (node,)
                and is_normalisation(inner.get_submodule(str(user.target)))
            ]
        else:
            found = _next_normalisation(inner, layer)
        if found:
            attached[layer] = list(dict.fromkeys(found))
    return attached, FOUND_BY_FX if graph is not None else FOUND_BY_ORDER


def _tensor_ids(inner: nn.Module, modules: Sequence[str]) -> set[int]:
    ids: set[int] = set()
    for name in modules:
        module = inner.get_submodule(name)
        ids.update(id(t) for t in module.parameters())
        ids.update(id(t) for t in module.buffers())
    return ids


def _trained_ids(inner: nn.Module, trained: Sequence[str], frozen: Sequence[str]) -> set[int]:
    """Tensors of the trained modules that no frozen module shares (freezing wins)."""
    return _tensor_ids(inner, trained) - _tensor_ids(inner, frozen)


def _trained_names(inner: nn.Module, trained_ids: set[int]) -> list[str]:
    """Checkpoint names of the trained tensors, in state-dict order."""
    return [k for k, t in inner.state_dict(keep_vars=True).items() if id(t) in trained_ids]


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    try:
        return torch.equal(
            a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8)
        )
    except (RuntimeError, TypeError):  # dtypes without a byte view (quantised tensors)
        return torch.equal(a, b)


def _set_modes(model: nn.Module, trained_ids: set[int]) -> None:
    """Train mode, except modules owning a frozen buffer: their running statistics stay put."""
    model.train()
    for module in model.modules():
        if any(id(b) not in trained_ids for b in module.buffers(recurse=False)):
            module.training = False  # this module only, not its children


@contextmanager
def _same_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """Each run draws its dropout masks from ``seed``; the caller's generators are restored."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _train(
    model: nn.Module,
    trained_ids: set[int],
    train: EvalData,
    settings: SelectiveRetrainSpec,
    mix_attack: Attack,
    seed: int,
    label: str = "retrain",
    progress: Progress | None = None,
) -> None:
    """Train the tensors in ``trained_ids`` of ``model`` in place; every other one stays."""
    for p in model.parameters():
        p.requires_grad_(id(p) in trained_ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        return
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(trainable, lr=settings.lr)
        if settings.optimizer == "adam"
        else torch.optim.SGD(trainable, lr=settings.lr, momentum=0.9)
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in tracked(progress, range(settings.epochs), label, settings.epochs, "epoch", train.n):
        order = torch.randperm(train.n, generator=generator).to(train.x.device)
        for start in range(0, train.n, train.batch_size):
            batch = order[start : start + train.batch_size]
            x, y = train.x[batch], train.y[batch]
            n_adv = round(settings.adversarial_mix * len(batch))
            if n_adv:
                # the attack runs in eval mode, so the examples are crafted against the model
                # as it is now, without touching BatchNorm statistics
                x = x.clone()
                x[:n_adv] = mix_attack(model, x[:n_adv], y[:n_adv], offset=start).adversarial
            _set_modes(model, trained_ids)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()


def _check_frozen(
    run: str, before: dict[str, torch.Tensor], inner: nn.Module, trained: Sequence[str]
) -> None:
    """Every tensor the run did not train must be bit-identical to the audited model's."""
    after, kept = inner.state_dict(), set(before) - set(trained)
    moved = [k for k, v in before.items() if k in kept and not _bit_equal(v, after[k])]
    if moved:
        raise IntegrityError(
            f"remediation: the {run} run changed tensors it was to keep frozen: "
            f"{', '.join(moved[:8])}{', …' if len(moved) > 8 else ''}. A module of the network "
            "writes them in its forward pass even in eval mode, so selective retraining cannot "
            "freeze them; no retrained checkpoint was written."
        )


def _write(path: Path, inner: nn.Module) -> None:
    # a copy of each tensor: safetensors refuses tied weights (two names, one storage)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in inner.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={"remediated_by": "inferlink-audit"}))


def control_checkpoint_name(checkpoint_name: str) -> str:
    """Where the control run's weights go: a ``control/`` folder beside the selective ones
    (a spec name cannot contain ``/``, so the two never collide)."""
    head, _, tail = checkpoint_name.rpartition("/")
    return f"{head}/control/{tail}" if head else f"control/{tail}"


def selective_retrain(
    wrapped: nn.Module,
    *,
    inner_prefix: str,
    fragile_layers: Sequence[str],
    trained_layers: Sequence[str],
    test: EvalData,
    train: EvalData,
    attack: Attack,
    mix_attack: Attack,
    settings: SelectiveRetrainSpec,
    seed: int,
    checkpoint_path: Path,
    checkpoint_name: str,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the selective retraining and its control; return the results.json entry.

    ``wrapped`` is the model the audit runs (normalisation included); ``inner_prefix`` is the
    prefix of the user's network inside it (its weights are what the checkpoint holds).
    ``fragile_layers`` and ``trained_layers`` are the analysed layers (names in the user's
    network), frozen and trained in the selective run. ``attack`` measures adversarial
    accuracy before and after; ``mix_attack`` (FGSM) crafts the training examples of
    ``adversarial_mix``. ``checkpoint_name`` is how results.json names the written file
    (relative to the report folder); the control's weights go to
    :func:`control_checkpoint_name` of it.
    """

    def inner_of(model: nn.Module) -> nn.Module:
        return model.get_submodule(inner_prefix.rstrip(".")) if inner_prefix else model

    original = inner_of(wrapped)
    position = {name: i for i, (name, _) in enumerate(original.named_modules())}
    analysed = sorted([*fragile_layers, *trained_layers], key=lambda n: position.get(n, -1))
    normalisation, found_by = attached_normalisation(original, analysed)

    def unit(layers: Sequence[str]) -> list[str]:
        return [m for layer in layers for m in (layer, *normalisation.get(layer, []))]

    plans = {
        "selective": (unit(trained_layers), unit(fragile_layers)),
        "control": (unit(analysed), []),
    }
    before_state = {k: v.detach().clone() for k, v in original.state_dict().items()}
    before = _accuracies(wrapped, test, attack)
    runs: dict[str, RunScores] = {}
    trained_names: dict[str, list[str]] = {}
    models: dict[str, nn.Module] = {}
    for run, (trained_modules, frozen_modules) in plans.items():
        candidate = copy.deepcopy(wrapped)
        inner = inner_of(candidate)
        ids = _trained_ids(inner, trained_modules, frozen_modules)
        trained_names[run] = _trained_names(inner, ids)
        with _same_randomness(seed, train.x.device):
            _train(candidate, ids, train, settings, mix_attack, seed, f"retrain {run}", progress)
        _check_frozen(run, before_state, inner, trained_names[run])
        after = _accuracies(candidate, test, attack)
        runs[run] = RunScores(before[0], after[0], before[1], after[1])
        models[run] = inner
    _write(checkpoint_path, models["selective"])
    _write(checkpoint_path.parent / "control" / checkpoint_path.name, models["control"])
    selective_trained = set(trained_names["selective"])
    return {
        "frozen_layers": list(fragile_layers),
        "trained_layers": list(trained_layers),
        "normalisation": normalisation,
        "normalisation_found_by": found_by,
        "trained_tensors": trained_names["selective"],
        "frozen_tensors": [k for k in before_state if k not in selective_trained],
        "control_trained_tensors": trained_names["control"],
        "checkpoint": checkpoint_name,
        "control_checkpoint": control_checkpoint_name(checkpoint_name),
        "epochs": settings.epochs,
        "optimizer": settings.optimizer,
        "lr": settings.lr,
        "adversarial_mix": settings.adversarial_mix,
        "response": settings.response,
        "attack": attack.id,
        "selective": vars(runs["selective"]),
        "control": vars(runs["control"]),
    }
