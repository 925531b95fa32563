"""An independent, deliberately naive implementation of DESIGN §1.2-1.4 for cross-checking.

It follows the definitions literally: for every threshold a deep copy of the model, an
element-wise mask, FGSM crafted with a fresh forward pass, and accuracies over the whole
set. Nothing is shared with the engine but ``scipy.integrate.simpson``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from scipy.integrate import simpson
from torch import nn


def thresholds(values: np.ndarray, filter_name: str, n: int) -> np.ndarray:
    grid = np.linspace(values.min(), values.max(), n)
    return grid[::-1] if filter_name == "low_pass" else grid


def zeroed(values: np.ndarray, filter_name: str, alpha: float, delta: float) -> np.ndarray:
    if filter_name == "low_pass":
        return values >= alpha
    if filter_name == "high_pass":
        return values <= alpha
    return (values >= alpha - delta) & (values < alpha + delta)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lo: float, hi: float):
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return (x + eps * grad.sign()).clamp(lo, hi).detach()


def accuracies(model, x, y, eps, lo, hi, source_adv=None):
    model.eval()
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum()) / len(y)
    x_adv = source_adv if source_adv is not None else fgsm(model, x, y, eps, lo, hi)
    with torch.no_grad():
        adv = int((model(x_adv).argmax(1) == y).sum()) / len(y)
    return clean, adv


def naive_sweep(
    model,
    param_names,
    filter_name,
    n,
    x,
    y,
    eps,
    lo=0.0,
    hi=1.0,
    magnitude=False,
    original=False,
    attack=None,
):
    """Curves of one scope (the named parameters) for one filter, the literal way; ``attack``
    (model, x, y) -> x_adv replaces FGSM as the stress, crafted against each variant."""
    state = model.state_dict()
    values = np.concatenate([state[name].double().numpy().ravel() for name in param_names])
    if magnitude:
        values = np.abs(values)
    grid = thresholds(values, filter_name, n)
    delta = (values.max() - values.min()) / (2 * n)
    fixed_adv = fgsm(model, x, y, eps, lo, hi) if original else None
    clean, adv, removed = [], [], []
    for alpha in grid:
        variant = copy.deepcopy(model)
        sd = variant.state_dict()
        for name in param_names:
            v = sd[name].double().numpy()
            v = np.abs(v) if magnitude else v
            sd[name][torch.from_numpy(zeroed(v, filter_name, alpha, delta))] = 0
        variant.load_state_dict(sd)
        source = fixed_adv
        if attack is not None and source is None:
            source = attack(variant.eval(), x, y)
        c, a = accuracies(variant, x, y, eps, lo, hi, source)
        clean.append(c)
        adv.append(a)
        removed.append(zeroed(values, filter_name, alpha, delta).mean())
    return np.array(clean), np.array(adv), np.array(removed), grid


def naive_scores(clean, adv, removed, psi_c0, psi_a0, tau):
    a_hat = np.arange(len(clean)) / (len(clean) - 1)
    rc = clean / psi_c0
    ra = adv / (psi_a0 if psi_a0 > 0 else psi_c0)
    b = 1 - removed
    out = {}
    for name, r in (("clean", rc), ("adversarial", ra)):
        phi = simpson(r - b, x=a_hat)
        gain = simpson(np.maximum(0, r - 1), x=a_hat)
        out[name] = (phi, "antifragile" if gain > tau else "fragile" if phi < -tau else "robust")
    out["difference"] = simpson(ra - rc, x=a_hat)
    return out
