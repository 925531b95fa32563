"""The network an audit runs: built, loaded and wrapped, then checked on a first batch.

:func:`load_model` builds the user's network (:mod:`.factories`), loads its checkpoint
(:mod:`.checkpoints`), refuses non-finite weights, and wraps it in :class:`NormalizedModel`
so attacks work in input units; one forward pass tells the number of classes.
:func:`check_batch` then runs a whole batch forward and backward, as the attacks will.
Every failure is one :class:`ModelLoadError` or :class:`DataError` paragraph that names the
file or key and says what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import load_checkpoint
from .data import data_key, example_input_shape
from .errors import DataError, ModelLoadError, listing, one_line
from .factories import FACTORY_KEY, build_network, resolve_path, source_sha256
from .spec import DataSpec, ModelSpec

__all__ = ["LoadedModel", "NormalizedModel", "check_batch", "load_model"]

# When no example input is given and the data's shape is unknown, probe the model on this.
_FALLBACK_SHAPE = (3, 224, 224)


class NormalizedModel(nn.Module):
    """The user's network behind a per-channel ``(x - mean) / std``.

    Attacks and their ε work in input units (pixels in ``input_range``); normalising inside
    the module keeps every gradient step and clamp in those units. ``mean`` and ``std`` are
    non-persistent buffers, so they follow ``.to(device)`` but never appear in a state dict,
    and the filters (which look at Conv/Linear weights) never see them.
    """

    mean: torch.Tensor | None
    std: torch.Tensor | None

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.model = model
        if mean is not None and std is not None:
            if len(mean) != len(std) or not len(mean):
                raise ValueError(f"mean {list(mean)} and std {list(std)} need one value a channel")
            if any(s <= 0 for s in std):
                raise ValueError(f"std {list(std)} must be positive")
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        else:
            self.mean = None
            self.std = None

    @property
    def channels(self) -> int | None:
        """Channels the normalisation expects (1 broadcasts to any), or None without one."""
        return None if self.mean is None else int(self.mean.numel())

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return x
        if x.dim() < 2 or (self.mean.numel() != 1 and x.shape[1] != self.mean.numel()):
            raise ValueError(
                f"normalisation has {self.mean.numel()} channel(s) but the input has shape "
                f"{tuple(x.shape)} (channels are dimension 1)"
            )
        # (C,) -> (1, C, 1, ...) so one value applies to each channel of an N×C×... batch.
        view = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(view)) / self.std.view(view)

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(self.normalize(x))


@dataclass
class LoadedModel:
    """A network ready to audit: the wrapper the engine runs and the user's inner module."""

    module: NormalizedModel
    inner: nn.Module
    checkpoint_sha256: str
    num_outputs: int
    description: str
    # Of the code that builds the network (see factories.source_sha256): the sweep cache keys on it.
    source_sha256: str = ""


def load_model(
    spec: ModelSpec,
    data: DataSpec,
    *,
    spec_dir: Path,
    example_input: torch.Tensor | None = None,
) -> LoadedModel:
    """Build ``spec.factory(**spec.kwargs)``, load ``spec.checkpoint`` into it and wrap it.

    The result is in eval mode on the CPU (the engine moves it). ``num_outputs`` comes from
    one forward pass on the first example of ``example_input``; without one, on zeros shaped
    like one example of ``data`` (when that shape is known without reading the data).
    The checkpoint file is only read, never written.
    """
    spec_dir = Path(spec_dir)
    inner, built_from = build_network(spec, spec_dir)
    sha = ""
    if spec.checkpoint is not None:
        path = resolve_path(spec.checkpoint, spec_dir)
        sha = load_checkpoint(inner, path, spec)
        weights = f"weights from {path.name} (sha256 {sha[:12]})"
    else:
        weights = "the factory's initial weights (no checkpoint)"
    _require_finite(inner, spec, "the checkpoint" if spec.checkpoint is not None else None)
    inner = inner.to("cpu")
    norm = data.normalize
    wrapper = NormalizedModel(
        inner, None if norm is None else norm.mean, None if norm is None else norm.std
    )
    wrapper.eval()
    probe = _probe_input(data, example_input)
    if wrapper.channels not in (None, 1) and (
        probe.dim() < 2 or probe.shape[1] != wrapper.channels
    ):
        raise DataError(
            f"data.normalize gives {wrapper.channels} channel values but the inputs have shape "
            f"{tuple(probe.shape[1:])} (channels first): give one mean/std per input channel, "
            "or a single value for all.",
            key=data_key(data),
        )
    source = f"{data.path.name} (data.path)" if data.path is not None else f"{data.source} data"
    num_outputs = _count_outputs(wrapper, probe, spec, source)
    n_params = sum(p.numel() for p in inner.parameters())
    kwargs = ", ".join(f"{k}={v!r}" for k, v in spec.kwargs.items())
    call = "" if spec.factory_kind == "torchscript" else f"({kwargs})"
    description = (
        f"{type(inner).__name__} from {built_from}{call}, {n_params:,} parameters, "
        f"{num_outputs} outputs, {weights}"
        + ("" if norm is None else f", inputs normalised with mean {norm.mean} std {norm.std}")
    )
    return LoadedModel(
        module=wrapper,
        inner=inner,
        checkpoint_sha256=sha,
        num_outputs=num_outputs,
        description=description,
        source_sha256=source_sha256(spec, spec_dir, inner),
    )


def _require_finite(inner: nn.Module, spec: ModelSpec, source: str | None) -> None:
    """NaN or Inf weights make every accuracy meaningless, and NaN never compares equal, so
    the bit-exact restore check after a sweep could not hold: refuse them before any work."""
    bad = [
        name
        for name, tensor in (*inner.named_parameters(), *inner.named_buffers())
        if (tensor.is_floating_point() or tensor.is_complex())
        and not bool(torch.isfinite(tensor.detach()).all())
    ]
    if bad:
        origin = source or f"the initial weights of model.factory {spec.factory!r}"
        raise ModelLoadError(
            f"after loading {origin}, the model's tensors {listing(bad)} contain NaN or Inf; "
            "an audit needs finite weights. Fix the initialisation or give a checkpoint.",
            key=FACTORY_KEY,
        )


# --------------------------------------------------------------------------- probing
def _probe_input(data: DataSpec, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        if example_input.dim() < 2:
            raise DataError(
                f"the data's inputs have shape {tuple(example_input.shape)}; they must be N×... "
                "with one row per example (e.g. N×C×H×W images or N×D features).",
                key=data_key(data),
            )
        example = example_input[:1].detach().to("cpu", torch.float32)
        # An empty data set still tells the shape; validate_dataset reports the emptiness.
        return example if len(example) else torch.zeros((1, *example_input.shape[1:]))
    shape = example_input_shape(data) or _FALLBACK_SHAPE
    return torch.zeros((1, *shape), dtype=torch.float32)


def _count_outputs(module: nn.Module, probe: torch.Tensor, spec: ModelSpec, source: str) -> int:
    shape = tuple(probe.shape)
    try:
        with torch.no_grad():
            out = module(probe)
    except (Exception, SystemExit) as exc:
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: a forward pass on an input of shape {shape} (one "
            f"example of {source}) failed with {type(exc).__name__}: {one_line(exc)}. "
            "Check that the model's expected input (channels, size) matches the data.",
            key=FACTORY_KEY,
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != shape[0]:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: on an input of shape {shape} the model returned "
            f"{got}; an audited classifier must return logits of shape N×classes. Wrap it so "
            "forward() returns only the logits.",
            key=FACTORY_KEY,
        )
    if out.shape[1] == 1:
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: on an input of shape {shape} the model returned "
            f"logits of shape {tuple(out.shape)}, one score per example: the predicted class "
            "(the argmax) would always be 0, so every accuracy would only count the labels 0 "
            "and no attack could change it. Wrap a single-logit binary classifier so that "
            "forward() returns two logits, e.g. torch.cat([-z, z], dim=1) or [0, z].",
            key=FACTORY_KEY,
        )
    if out.shape[1] == 0:
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: on an input of shape {shape} the model returned "
            f"logits of shape {tuple(out.shape)}, with no classes; check model.kwargs "
            "(e.g. num_classes).",
            key=FACTORY_KEY,
        )
    return int(out.shape[1])


def check_batch(module: nn.Module, x: torch.Tensor, y: torch.Tensor, num_outputs: int) -> None:
    """Run the first batch forward and backward to the input, as the attacks will.

    The model was probed on one example; a forward that only works for one (``view(1, -1)``),
    logits that are NaN, a forward that is not differentiable with respect to its input, or a
    batch that does not fit in memory then fail here with the batch's shape named, rather
    than from deep inside an attack. Parameters and their ``.grad`` are left untouched (only
    the input's gradient is taken). Running out of memory is re-raised as it is, for the
    caller to name the batch size.
    """
    from .devices import is_out_of_memory

    shape = tuple(x.shape)
    # The persistent buffers, as the audit's restore check sees them (a non-persistent cache
    # refilled per input shape is not state; one that moves the logits fails repeatability).
    persistent = module.state_dict().keys()
    buffers = {n: b.detach().clone() for n, b in module.named_buffers() if n in persistent}
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        try:
            out = module(leaf)
        except (Exception, SystemExit) as exc:
            if isinstance(exc, Exception) and is_out_of_memory(exc):
                raise
            raise DataError(
                f"the model fails on a batch of shape {shape} (data.batch_size {shape[0]}) with "
                f"{type(exc).__name__}: {one_line(exc)}. It ran on one example, so check that "
                "forward() handles any batch size."
            ) from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (shape[0], num_outputs):
            got = (
                f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            )
            raise DataError(
                f"on a batch of shape {shape} the model returned {got}, not logits of shape "
                f"{(shape[0], num_outputs)}; forward() must handle any batch size."
            )
        if not bool(torch.isfinite(out.detach()).all()):
            raise DataError(
                f"the model's logits on the first batch (shape {shape}) contain NaN or Inf; "
                "accuracies would be meaningless. Check the weights and data.normalize."
            )
        try:
            loss = torch.nn.functional.cross_entropy(out, y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, leaf)
        except (Exception, SystemExit) as exc:
            if isinstance(exc, Exception) and is_out_of_memory(exc):
                raise
            raise ModelLoadError(
                f"the model's logits are not differentiable with respect to its input "
                f"({type(exc).__name__}: {one_line(exc)}); attacks need that gradient. Remove "
                "torch.no_grad(), .detach() or non-differentiable steps from forward(). A model "
                "of integer inputs (token ids cast with .long() for an nn.Embedding) cannot be "
                "audited: attacks move inputs by real amounts.",
                key=FACTORY_KEY,
            ) from exc
        if grad is None or not bool(torch.isfinite(grad).all()):
            raise ModelLoadError(
                "the gradient of the model's loss with respect to its input on the first batch "
                "contains NaN or Inf; attacks could not use it. Check forward() for divisions "
                "by zero or logs of zero.",
                key=FACTORY_KEY,
            )
        _require_stateless(module, buffers, shape)
        _require_repeatable(module, leaf, out.detach(), shape)
    _require_per_example(module, x, out.detach(), shape)


# How far, relative to the largest logit, two passes over the same examples may differ by
# rounding alone: the same batch again (deterministic kernels: bit-identical or nearly), the
# same examples in a smaller batch (another kernel, another summation order; a model computing
# in bf16 or fp16 inside rounds to its own precision). Dropout or batch statistics move the
# logits by far more.
_REPEAT_TOLERANCE = 1e-3
_BATCH_TOLERANCE = 1e-2


def _differ(a: torch.Tensor, b: torch.Tensor, tolerance: float = _REPEAT_TOLERANCE) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return True
    if not a.is_floating_point() or a.numel() == 0:
        return not torch.equal(a, b)
    scale = max(1.0, float(a.abs().max()))
    tolerance = max(tolerance, 8 * torch.finfo(a.dtype).eps)
    return bool((a.float() - b.float()).abs().max() > tolerance * scale)


def _user_name(name: str) -> str:
    """A wrapper's name (``model.drop``) as the user's network names it (``drop``)."""
    return name.removeprefix("model.") if name != "model" else "forward() of the model itself"


def _require_stateless(
    module: nn.Module, before: dict[str, torch.Tensor], shape: tuple[int, ...]
) -> None:
    """A forward pass that writes its buffers makes each pass see another network: every
    accuracy would depend on how many passes ran before it (and the audit's restore check
    would void the run only after the work)."""
    changed = [
        _user_name(name)
        for name, b in module.named_buffers()
        if name in before and not torch.equal(b.detach(), before[name])
    ]
    if changed:
        raise ModelLoadError(
            f"one forward and backward pass on a batch of shape {shape} changed these buffers "
            f"of the model: {listing(changed)}. A model whose forward pass updates its own "
            "state in eval mode (running statistics, counters, caches) is a different network "
            "at every pass, so no accuracy of the audit would be the model's. Make forward() "
            "leave its buffers unchanged in eval mode.",
            key=FACTORY_KEY,
        )


def _require_repeatable(
    module: nn.Module, leaf: torch.Tensor, first: torch.Tensor, shape: tuple[int, ...]
) -> None:
    """The same batch twice must give the same logits: a random forward (dropout left active,
    noise) makes every accuracy a random draw that no re-run or reference reproduces."""
    with torch.enable_grad():
        second = module(leaf).detach()
    if not _differ(first, second):
        return
    culprits = _random_modules(module, leaf.detach()[:1])
    training = [_user_name(n) for n, m in module.named_modules() if n and m.training]
    where = f" It comes from {listing(culprits)}." if culprits else ""
    stuck = (
        f" Modules still in training mode after eval(): {listing(training)}." if training else ""
    )
    raise ModelLoadError(
        f"two forward passes on the same batch (shape {shape}) gave different logits: the model "
        f"is random at inference, so every accuracy would be a random draw.{where}{stuck} "
        "Dropout or noise active in eval mode (F.dropout(..., training=True), a train() that "
        "keeps dropout on) cannot be audited; make forward() deterministic in eval mode.",
        key=FACTORY_KEY,
    )


def _random_modules(module: nn.Module, x: torch.Tensor) -> list[str]:
    """The innermost modules whose output differs between two passes on one input although
    their input did not."""
    calls: list[list[tuple[str, list[torch.Tensor], list[torch.Tensor]]]] = [[], []]
    run = 0

    def tensors(value: Any) -> list[torch.Tensor]:
        flat = value if isinstance(value, (tuple, list)) else (value,)
        return [t.detach().clone() for t in flat if isinstance(t, torch.Tensor)]

    def hook(name: str) -> Any:
        def record(_: nn.Module, args: Any, output: Any) -> None:
            calls[run].append((name, tensors(args), tensors(output)))

        return record

    handles = []
    try:
        for n, m in module.named_modules():
            if not isinstance(m, torch.jit.ScriptModule):  # scripted modules take no hooks
                handles.append(m.register_forward_hook(hook(n)))
        with torch.no_grad():
            module(x)
            run = 1
            module(x)
        found: list[str] = []
        for (name, in_a, out_a), (_, in_b, out_b) in zip(calls[0], calls[1], strict=False):
            same_in = len(in_a) == len(in_b) and all(map(torch.equal, in_a, in_b))
            same_out = len(out_a) == len(out_b) and not any(map(_differ, out_a, out_b))
            if same_in and not same_out and name not in found:
                found.append(name)
    except Exception:  # naming the module is a courtesy: the refusal stands without it
        return []
    finally:
        for handle in handles:
            handle.remove()
    innermost = [n for n in found if not any(o.startswith(f"{n}.") or (o and not n) for o in found)]
    return [_user_name(n) for n in innermost if n]


def _require_per_example(
    module: nn.Module, x: torch.Tensor, full: torch.Tensor, shape: tuple[int, ...]
) -> None:
    """An example's logits must not depend on the other examples of its batch (BatchNorm on
    batch statistics in eval): the audit's accuracies would then depend on data.batch_size."""
    half = x.shape[0] // 2
    if half == 0:
        return
    with torch.no_grad():
        part = module(x[:half])
    if not _differ(full[:half], part, _BATCH_TOLERANCE):
        return
    norms = [
        _user_name(n)
        for n, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
    ]
    where = f" BatchNorm layers without running statistics: {listing(norms)}." if norms else ""
    raise ModelLoadError(
        f"the logits of the first {half} examples of a batch of shape {shape} change when they "
        f"are run as a batch of {half}: each example's output depends on the other examples in "
        f"its batch, so the audit's accuracies would depend on data.batch_size.{where} Use "
        "running statistics in eval mode (BatchNorm with track_running_stats=True) or "
        "per-example normalisation.",
        key=FACTORY_KEY,
    )
