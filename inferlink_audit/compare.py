"""Several models in one audit (``compare:``): label consistency and transferability.

Consistency is the paper's invariance analysis (Pravin et al. 2024, §5.3): for models of the
same architecture, how often does a layer get the same label under the same filter, attack
and response? Transferability is Szegedy et al.'s (ICLR 2014, §4.2): adversarial examples
crafted on one model, accuracy measured on the others, on the same test set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attacks import Attack
from .results import RESPONSES, ModelResult


@dataclass(frozen=True)
class TransferModel:
    """One model of a transfer matrix, as plain data: what crafting on it and measuring it need."""

    name: str
    model: nn.Module  # inputs in the input range; normalisation inside
    x: torch.Tensor  # the test set, on the model's device
    y: torch.Tensor
    batch_size: int
    attacks: Mapping[str, Attack]  # by attack id, in the spec's order


def _architecture(model: ModelResult) -> tuple[tuple[str, str, int], ...]:
    return tuple((layer["name"], layer["type"], layer["numel"]) for layer in model.layers)


def label_consistency(models: Sequence[ModelResult]) -> dict[str, Any]:
    """Agreement of layer labels across the models that share the first model's architecture."""
    reference = _architecture(models[0])
    group = [m for m in models if _architecture(m) == reference]
    if len(group) < 2:
        return {
            "agreement": None,
            "models": [m.name for m in group],
            "layers": [],
            "note": "no other model shares the architecture of the first: nothing to compare",
        }
    labels: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for model in group:
        for sweep in model.sweeps:
            if sweep.scope != "local":
                continue
            for response in RESPONSES:
                key = (sweep.layer or "", sweep.filter, sweep.attack, response)
                labels.setdefault(key, {})[model.name] = getattr(sweep.labels, response)
    names = [m.name for m in group]
    rows = [
        {"layer": layer, "filter": f, "attack": a, "response": r, "labels": by_model}
        for (layer, f, a, r), by_model in labels.items()
        if set(by_model) == set(names)
    ]
    agreeing = sum(
        1
        for (*_, r), by_model in labels.items()
        if set(by_model) == set(names) and len(set(by_model.values())) == 1
    )
    return {
        "agreement": agreeing / len(rows) if rows else None,
        "models": names,
        "layers": rows,
        "note": f"{agreeing} of {len(rows)} (layer, filter, attack, response) labels agree",
    }


def _craft(source: TransferModel, attack: Attack) -> torch.Tensor:
    """The attack's examples on ``source``, each at its place in the data (as in the audit)."""
    parts = []
    for start in range(0, int(source.y.shape[0]), source.batch_size):
        stop = start + source.batch_size
        xb, yb = source.x[start:stop], source.y[start:stop]
        parts.append(attack(source.model, xb, yb, offset=start).adversarial)
    return torch.cat(parts)


def _accuracy(target: TransferModel, x_adv: torch.Tensor) -> float:
    correct = 0
    with torch.inference_mode():
        for start in range(0, int(target.y.shape[0]), target.batch_size):
            stop = start + target.batch_size
            logits = target.model(x_adv[start:stop].to(target.x.device))
            correct += int((logits.argmax(1) == target.y[start:stop]).sum())
    return correct / int(target.y.shape[0])


def _same_examples(a: TransferModel, b: TransferModel) -> bool:
    """Transfer is only meaningful when both models are tested on the very same examples."""
    return (
        a.x.shape == b.x.shape
        and torch.equal(a.x.cpu(), b.x.cpu())
        and torch.equal(a.y.cpu(), b.y.cpu())
    )


def transferability(models: Sequence[TransferModel]) -> list[dict[str, Any]]:
    """Accuracy of every model on every model's adversarial examples (same test set).

    The row whose source is its target is the white-box accuracy of the attack itself.
    """
    rows: list[dict[str, Any]] = []
    for source in models:
        for attack_id, attack in source.attacks.items():
            x_adv = _craft(source, attack)
            for target in models:
                if not _same_examples(source, target):
                    continue
                rows.append(
                    {
                        "attack": attack_id,
                        "source": source.name,
                        "target": target.name,
                        "accuracy": _accuracy(target, x_adv),
                        "white_box": target is source,
                    }
                )
    return rows
