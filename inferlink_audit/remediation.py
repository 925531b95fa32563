"""Remediation by selective retraining (DESIGN §1.7; Pravin et al. 2024, §6).

The layers the audit labelled fragile are frozen and the robust and antifragile ones are
trained for a few epochs on the training split, optionally mixing in FGSM examples crafted
against the model being trained. A control run trains every layer for the same budget from
the same weights with the same batches, so the report can say whether selectivity helped.
Both runs work on copies: the audited model in memory and its checkpoint are never changed.
The selectively retrained weights are written (atomically) next to the report.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn

from .attacks import Attack
from .fileio import atomic_write_bytes
from .spec import SelectiveRetrainSpec
from .sweep import EvalData


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


def _train(
    model: nn.Module,
    frozen_modules: Sequence[str],
    train: EvalData,
    settings: SelectiveRetrainSpec,
    mix_attack: Attack,
    seed: int,
) -> None:
    """Train ``model`` in place with the modules in ``frozen_modules`` held fixed."""
    frozen = {id(p) for name in frozen_modules for p in model.get_submodule(name).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        return
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(trainable, lr=settings.lr)
        if settings.optimizer == "adam"
        else torch.optim.SGD(trainable, lr=settings.lr, momentum=0.9)
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in range(settings.epochs):
        order = torch.randperm(train.n, generator=generator).to(train.x.device)
        for start in range(0, train.n, train.batch_size):
            batch = order[start : start + train.batch_size]
            x, y = train.x[batch], train.y[batch]
            n_adv = round(settings.adversarial_mix * len(batch))
            if n_adv:
                # the attack switches to eval mode and back, so the examples are crafted
                # against the model as it is now, without touching BatchNorm statistics
                x = x.clone()
                x[:n_adv] = mix_attack(model, x[:n_adv], y[:n_adv], offset=start).adversarial
            model.train()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)


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
) -> dict[str, Any]:
    """Run the selective retraining and its control; return the results.json entry.

    ``wrapped`` is the model the audit runs (normalisation included); ``inner_prefix`` is the
    prefix of the user's network inside it (its weights are what the checkpoint holds).
    ``attack`` measures adversarial accuracy before and after; ``mix_attack`` (FGSM) crafts
    the training examples of ``adversarial_mix``. ``checkpoint_name`` is how results.json
    names the written file (relative to the report folder).
    """
    before = _accuracies(wrapped, test, attack)
    runs: dict[str, RunScores] = {}
    selective_model: nn.Module | None = None
    for run, frozen in (("selective", list(fragile_layers)), ("control", [])):
        candidate = copy.deepcopy(wrapped)
        _train(
            candidate,
            [f"{inner_prefix}{name}" for name in frozen],
            train,
            settings,
            mix_attack,
            seed,
        )
        after = _accuracies(candidate, test, attack)
        runs[run] = RunScores(before[0], after[0], before[1], after[1])
        if run == "selective":
            selective_model = candidate
    assert selective_model is not None
    inner = (
        selective_model.get_submodule(inner_prefix.rstrip(".")) if inner_prefix else selective_model
    )
    state = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    atomic_write_bytes(checkpoint_path, save(state, metadata={"remediated_by": "inferlink-audit"}))
    return {
        "frozen_layers": list(fragile_layers),
        "trained_layers": list(trained_layers),
        "checkpoint": checkpoint_name,
        "epochs": settings.epochs,
        "optimizer": settings.optimizer,
        "lr": settings.lr,
        "adversarial_mix": settings.adversarial_mix,
        "response": settings.response,
        "attack": attack.id,
        "selective": vars(runs["selective"]),
        "control": vars(runs["control"]),
    }
