"""Which tensors of which modules are analysed (docs/method.md §1): the layer selection.

A filter only measures something when it zeroes the tensor the forward pass really reads.
Under a re-parametrisation the module's ``weight`` is rebuilt from stored tensors on every
call, so the stored tensor is filtered instead, where zeroing an entry zeroes the same entry
of the weight the forward pass uses:

* ``torch.nn.utils.parametrizations.weight_norm`` (``parametrizations.weight.original1``) and
  the hook-based ``torch.nn.utils.weight_norm`` (``weight_v``): the direction v, with
  w = g·v/‖v‖ per output slice. The slice's other entries are rescaled so that it keeps its
  norm |g|; a slice whose v is zeroed entirely has no defined weight (0/0: its outputs are
  NaN), which is what that network computes.
* ``torch.nn.utils.parametrizations.spectral_norm`` (``parametrizations.weight.original``) and
  the hook-based ``torch.nn.utils.spectral_norm`` (``weight_orig``): the unnormalised weight
  W, with w = W/σ(W) and σ recomputed from the stored singular vectors u, v (eval mode), so
  every other entry is rescaled by σ(W)/σ(W filtered).

Thresholds run over the stored tensor's values. Any other parametrization (``orthogonal``, a
user's own), ``torch.nn.utils.prune`` and any weight that is not a registered parameter or
buffer are refused with an ``UnsupportedError`` naming the layer, never filtered in vain.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.parametrizations import _SpectralNorm, _WeightNorm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .errors import AuditError, UnsupportedError
from .spec import LayerSelectionSpec

# Parametrizations under which zeroing an entry of the stored tensor zeroes the same entry of
# the weight, and the name of that stored tensor inside ``module.parametrizations.<name>``.
_ZERO_PRESERVING: dict[type[nn.Module], str] = {_WeightNorm: "original1", _SpectralNorm: "original"}


@dataclass
class AnalysedLayer:
    """A module whose selected parameters (by default its ``.weight``) form one local scope.

    ``tensor_names`` are the filtered tensors' names inside the module: ``weight`` usually,
    the stored tensor of a re-parametrised weight (``parametrizations.weight.original1``,
    ``weight_v``, ``weight_orig``) otherwise.
    """

    name: str
    type: str
    parameters: list[nn.Parameter | torch.Tensor]
    tensor_names: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters)


def module_type(module: nn.Module) -> str:
    """The class name a user wrote: ``Conv2d`` for the ``ParametrizedConv2d`` that
    ``torch.nn.utils.parametrize`` substitutes, and a scripted module's original class."""
    if parametrize.is_parametrized(module):
        return parametrize.type_before_parametrizations(module).__name__
    if isinstance(module, torch.jit.ScriptModule):
        return str(getattr(module, "original_name", type(module).__name__))
    return type(module).__name__


def type_names(module: nn.Module) -> set[str]:
    """The names ``filtering.layers.types`` matches: the module's class and its base classes, so
    that an ``nn.Linear`` subclass (``MultiheadAttention.out_proj``, a
    ``NonDynamicallyQuantizableLinear``) is a Linear, as DESIGN §1.1 says."""
    if isinstance(module, torch.jit.ScriptModule):
        return {module_type(module)}
    cls = (
        parametrize.type_before_parametrizations(module)
        if parametrize.is_parametrized(module)
        else type(module)
    )
    return {c.__name__ for c in cls.__mro__ if issubclass(c, nn.Module) and c is not nn.Module}


def _refuse(layer: str, name: str, what: str, fix: str) -> UnsupportedError:
    return UnsupportedError(
        f"filtering.layers selects {layer}.{name}, which {what}: zeroing it would not change "
        f"the weight the forward pass uses, so its curves would not measure that layer. "
        f"{fix}, or leave the layer out with filtering.layers.exclude: ['{layer}']."
    )


def _parametrized_tensor(layer: str, module: nn.Module, name: str) -> tuple[str, torch.Tensor]:
    plist = module.parametrizations[name]  # type: ignore[index]
    kinds = [type(p) for p in plist]
    if len(kinds) == 1 and kinds[0] in _ZERO_PRESERVING:
        stored = _ZERO_PRESERVING[kinds[0]]
        return f"parametrizations.{name}.{stored}", getattr(plist, stored)
    names = " then ".join(k.__name__ for k in kinds)
    raise _refuse(
        layer,
        name,
        f"is rebuilt on every call by the parametrization {names} (torch.nn.utils.parametrize)",
        "Only a single weight_norm or spectral_norm parametrization is filtered (on its stored "
        "tensor); bake the weight in the model factory with torch.nn.utils.parametrize."
        f'remove_parametrizations(module, "{name}")',
    )


def filtered_tensor(layer: str, module: nn.Module, name: str) -> tuple[str, torch.Tensor] | None:
    """The tensor to filter for ``module.<name>`` and its name in the module: the tensor the
    forward pass really reads (see the module docstring); None when there is no such tensor.

    Raises UnsupportedError when ``<name>`` is rebuilt in a way whose filtering would not act.
    """
    if parametrize.is_parametrized(module, name):
        return _parametrized_tensor(layer, module, name)
    for hook in getattr(module, "_forward_pre_hooks", {}).values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return f"{name}_v", getattr(module, f"{name}_v")
        if isinstance(hook, SpectralNorm) and hook.name == name:
            return f"{name}_orig", getattr(module, f"{name}_orig")
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            raise _refuse(
                layer,
                name,
                f"is rebuilt from {name}_orig × {name}_mask by torch.nn.utils.prune on every call",
                f"Make the pruning permanent in the model factory with torch.nn.utils.prune.remove("
                f'module, "{name}")',
            )
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        return None
    if name not in module._parameters and name not in module._buffers:
        raise _refuse(
            layer,
            name,
            "is not a registered parameter or buffer of the module (a hook or the forward pass "
            "may rebuild it on every call)",
            "Register it with nn.Parameter or register_buffer",
        )
    return name, value


def _has_own_parameters(module: nn.Module) -> bool:
    # ``any(module.parameters())`` would ask a tensor for its truth value.
    return next(module.parameters(recurse=False), None) is not None


def select_layers(model: nn.Module, selection: LayerSelectionSpec) -> list[AnalysedLayer]:
    """The analysed layers, in module order: type matches, name included and not excluded."""
    layers = []
    for name, module in model.named_modules():
        kind = module_type(module)
        if not name or not type_names(module) & set(selection.types):
            continue
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in selection.include):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in selection.exclude):
            continue
        found = [filtered_tensor(name, module, p) for p in selection.parameters]
        chosen = [f for f in found if f is not None]
        if chosen:
            layers.append(AnalysedLayer(name, kind, [t for _, t in chosen], [n for n, _ in chosen]))
    if not layers:
        candidates = sorted(
            {
                module_type(m)
                for n, m in model.named_modules()
                if n
                and not isinstance(m, parametrize.ParametrizationList)
                and (parametrize.is_parametrized(m) or _has_own_parameters(m))
            }
        )
        raise AuditError(
            f"filtering.layers selects no layer (types {selection.types}, include "
            f"{selection.include}, exclude {selection.exclude}). The model's module types with "
            f"parameters are: {', '.join(candidates) or 'none'}; adjust filtering.layers."
        )
    return layers
