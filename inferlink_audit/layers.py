"""Which tensors of which modules are analysed (DESIGN §1.1): the layer selection."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .errors import AuditError
from .spec import LayerSelectionSpec


@dataclass
class AnalysedLayer:
    """A module whose selected parameters (by default its ``.weight``) form one local scope."""

    name: str
    type: str
    parameters: list[nn.Parameter | torch.Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters)


def select_layers(model: nn.Module, selection: LayerSelectionSpec) -> list[AnalysedLayer]:
    """The analysed layers, in module order: type matches, name included and not excluded."""
    layers = []
    for name, module in model.named_modules():
        if not name or type(module).__name__ not in selection.types:
            continue
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in selection.include):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in selection.exclude):
            continue
        params = [
            getattr(module, p)
            for p in selection.parameters
            if isinstance(getattr(module, p, None), torch.Tensor)
        ]
        if params:
            layers.append(AnalysedLayer(name, type(module).__name__, params))
    if not layers:
        candidates = sorted(
            {
                type(m).__name__
                for n, m in model.named_modules()
                if n and any(m.parameters(recurse=False))
            }
        )
        raise AuditError(
            f"filtering.layers selects no layer (types {selection.types}, include "
            f"{selection.include}, exclude {selection.exclude}). The model's module types with "
            f"parameters are: {', '.join(candidates) or 'none'}; adjust filtering.layers."
        )
    return layers
