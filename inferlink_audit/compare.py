"""Several models in one audit (``compare:``): label consistency and transferability.

Consistency is the paper's invariance analysis (Pravin et al. 2024, §5.3): for models of the
same architecture, how often does a layer get the same label under the same filter, attack
and response? Transferability is Szegedy et al.'s (ICLR 2014, §4.2): adversarial examples
crafted on one model, accuracy measured on the others, on the same test set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .results import RESPONSES, ModelResult

if TYPE_CHECKING:
    from .audit import AuditSession


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


def transferability(sessions: Sequence[AuditSession]) -> list[dict[str, Any]]:
    """Accuracy of every model on every other model's adversarial examples (same test set)."""
    rows: list[dict[str, Any]] = []
    for source in sessions:
        for spec in source.spec.attack_specs:
            attack = source._attack(spec.id)
            model = source.prepared.loaded.module
            crafted = [out.adversarial for *_, out in source.prepared.data.attacked(attack, model)]
            x_adv = torch.cat(crafted)
            for target in sessions:
                data = target.prepared.data
                if data.x.shape != source.prepared.data.x.shape or not torch.equal(
                    data.y.cpu(), source.prepared.data.y.cpu()
                ):
                    continue  # transfer is only meaningful on the same examples
                correct = 0
                with torch.inference_mode():
                    for start in range(0, data.n, data.batch_size):
                        xb = x_adv[start : start + data.batch_size].to(data.x.device)
                        logits = target.prepared.loaded.module(xb)
                        correct += int(
                            (logits.argmax(1) == data.y[start : start + data.batch_size]).sum()
                        )
                rows.append(
                    {
                        "attack": spec.id,
                        "source": source.spec.name,
                        "target": target.spec.name,
                        "accuracy": correct / data.n,
                        "white_box": target is source,
                    }
                )
    return rows
