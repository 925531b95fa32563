"""Real architectures the other hostile-model tests do not build: every curve equals a naive
deep-copy evaluation, the layers analysed are the ones docs/method.md §1 names, and a network
whose numbers could not be the model's (random or stateful at inference, batch-dependent,
integer inputs) is refused before any number is reported.

The torchvision networks are the library's own classes (``MobileNetV3``, ``ConvNeXt``,
``EfficientNet``, ``VisionTransformer``) built tiny: hard-swish in place and squeeze-excitation,
LayerNorm2d and layer-scale parameters, stochastic depth and SiLU, ``nn.MultiheadAttention``
(its native fast path in eval) with a class token. Each sweep is compared with
``naive_reference.naive_sweep`` (or its PGD twin below): a ``copy.deepcopy`` per threshold.
"""

from __future__ import annotations

import copy
import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.efficientnet import EfficientNet, MBConvConfig
from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3
from torchvision.models.vision_transformer import VisionTransformer

from inferlink_audit.audit import AuditSession
from inferlink_audit.devices import deterministic_settings
from inferlink_audit.errors import ModelLoadError
from inferlink_audit.spec_loader import load_spec
from inferlink_audit.sweep import Evaluator

from .naive_reference import naive_sweep, thresholds, zeroed

EPS = 0.1
N_THRESHOLDS = 5
PGD_STEPS, PGD_STEP = 3, 0.05


# --------------------------------------------------------------------------- the networks
def mobilenet_v3() -> nn.Module:
    bneck = partial(InvertedResidualConfig, width_mult=1.0)
    setting = [bneck(4, 3, 8, 4, True, "RE", 2, 1), bneck(4, 3, 12, 6, True, "HS", 1, 1)]
    return MobileNetV3(setting, last_channel=8, num_classes=4)


def convnext() -> nn.Module:
    blocks = [CNBlockConfig(4, 8, 1), CNBlockConfig(8, None, 1)]
    return ConvNeXt(blocks, stochastic_depth_prob=0.1, layer_scale=0.5, num_classes=4)


def efficientnet() -> nn.Module:
    setting = [MBConvConfig(1, 3, 1, 4, 4, 1, 1.0, 1.0), MBConvConfig(4, 3, 2, 4, 6, 1, 1.0, 1.0)]
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=4)


def vision_transformer() -> nn.Module:
    return VisionTransformer(
        image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
        num_classes=4,
    )  # fmt: skip


class Recurrent(nn.Module):
    """A GRU or LSTM over the rows of an 8×8 image (its weights live in ``_flat_weights``)."""

    def __init__(self, kind: str = "gru") -> None:
        super().__init__()
        self.rnn = (nn.GRU if kind == "gru" else nn.LSTM)(8, 6, batch_first=True, num_layers=2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(x.shape[0], 8, 8))
        return self.fc(out[:, -1])


class Grouped(nn.Module):
    """A depthwise and a grouped convolution, a residual add and hard-swish."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.gc = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.dw(h)) + h
        return self.fc(F.hardswish(self.gc(h)).flatten(1))


class AutocastInside(nn.Module):
    """``Grouped`` run under a ``torch.autocast`` block inside forward(): a trace records the
    operations but not the block, so a prefix cut from it would compute in fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Grouped()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.body(x).float()


class NoGradStem(nn.Module):
    """A frozen stem under ``torch.no_grad()`` inside forward() and a differentiable skip of the
    input: the trace keeps the stem's operations but not the block, so a split would let FGSM's
    gradient flow through the stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.conv = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h0 = torch.tanh(self.stem(x))
        h = torch.tanh(self.conv(torch.cat([h0, 0.1 * x], 1)))
        return self.fc(h.flatten(1))


class SoftTokens(nn.Module):
    """Soft one-hot tokens (N×4×6 probabilities) read through an Embedding's weight by a
    product; the head, a Linear, shares that weight: one tensor, two module types."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 6)
        self.head.weight = self.emb.weight
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 4, 6) @ self.emb.weight
        h = torch.tanh(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.out(torch.tanh(self.head(h.mean(1))))


ORIGINAL = {"adversarial_source": "original"}
TIED = {"types": ["Embedding", "Linear", "Conv1d"]}
LAYER_SCALE = {"types": ["CNBlock", "LayerNorm"], "parameters": ["layer_scale", "weight"]}
ATTENTION = {
    "types": ["MultiheadAttention", "Encoder"],
    "parameters": ["in_proj_weight", "pos_embedding"],
}
GRU = {"types": ["GRU", "Linear"], "parameters": ["weight", "weight_ih_l0", "weight_hh_l1"]}
LSTM = {"types": ["LSTM", "Linear"], "parameters": ["weight", "weight_hh_l0"]}
# Each case: factory, input shape, settings that vary the engine's path, and the layer selection.
CASES: dict[str, tuple[str, tuple[int, ...], dict[str, Any], dict[str, Any] | None]] = {
    "mobilenet_v3": ("mobilenet_v3", (3, 8, 8), {}, None),
    "mobilenet_v3_fast_original": ("mobilenet_v3", (3, 8, 8), {"fast": True, **ORIGINAL}, None),
    "convnext_original_magnitude": (
        "convnext",
        (3, 8, 8),
        {**ORIGINAL, "values": "magnitude"},
        None,
    ),
    "convnext_layer_scale": ("convnext", (3, 8, 8), {}, LAYER_SCALE),
    "efficientnet_no_prefix_cache": ("efficientnet", (3, 8, 8), {"prefix_cache_mb": 0}, None),
    "vit": ("vision_transformer", (3, 8, 8), {}, None),
    "vit_pgd_original": ("vision_transformer", (3, 8, 8), {"attack": "pgd", **ORIGINAL}, None),
    "vit_in_proj_and_pos_embedding": ("vision_transformer", (3, 8, 8), {}, ATTENTION),
    "gru_flat_weights": ("Recurrent", (1, 8, 8), {"kwargs": {"kind": "gru"}}, GRU),
    "lstm_flat_weights_fast": (
        "Recurrent",
        (1, 8, 8),
        {"kwargs": {"kind": "lstm"}, "fast": True, **ORIGINAL},
        LSTM,
    ),
    "grouped_pgd_original": ("Grouped", (3, 8, 8), {"attack": "pgd", **ORIGINAL}, None),
    "autocast_inside_forward": ("AutocastInside", (3, 8, 8), {}, None),
    "autocast_inside_forward_original": ("AutocastInside", (3, 8, 8), ORIGINAL, None),
    "no_grad_inside_forward": ("NoGradStem", (3, 8, 8), {}, None),
    "embedding_tied_to_linear": ("SoftTokens", (1, 4, 6), {}, TIED),
    "embedding_tied_to_linear_magnitude": ("SoftTokens", (1, 4, 6), {"values": "magnitude"}, TIED),
}


def _build(factory: str, kwargs: dict[str, Any]) -> nn.Module:
    """A seeded network whose predictions move when its weights are filtered."""
    torch.manual_seed(0)
    model: nn.Module = globals()[factory](**kwargs)
    with torch.no_grad():
        # Weights scaled by fan-in and biases drawn (torchvision starts a ViT's head and class
        # token at zero, ConvNeXt's weights at 0.02): the logits depend on the input.
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 2.0 / p[0].numel() ** 0.5)
            elif not p.any():
                p.normal_(0.0, 0.1)
    return model.eval()


def _write_audit(
    folder: Path,
    factory: str,
    shape: tuple[int, ...],
    settings: dict[str, Any],
    layers: dict[str, Any] | None,
) -> Path:
    """A checkpoint, a labelled test set (a quarter of the labels flipped) and a spec."""
    settings = dict(settings)
    kwargs = settings.pop("kwargs", {})
    attack = settings.pop("attack", "fgsm")
    model = _build(factory, kwargs)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(32, *shape, generator=gen)
    with torch.no_grad():
        y = model((x - 0.5) / 0.25).argmax(1)
    y = torch.where(torch.rand(32, generator=gen) < 0.25, (y + 1) % 4, y)
    torch.save(model.state_dict(), folder / "model.pt")
    torch.save({"x": x, "y": y}, folder / "test.pt")
    filtering: dict[str, Any] = {"thresholds": N_THRESHOLDS, "filters": ["pulse"], **settings}
    if layers is not None:
        filtering["layers"] = layers
    spec = {
        "version": 1,
        "name": factory.lower(),
        "model": {
            "factory": f"tests.test_unusual_models:{factory}",
            "kwargs": kwargs,
            "checkpoint": "model.pt",
        },
        "data": {
            "source": "tensors",
            "path": "test.pt",
            "batch_size": 16,
            "normalize": {"mean": [0.5], "std": [0.25]},  # centred inputs: varied predictions
        },
        "device": "cpu",
        "filtering": filtering,
        "attacks": [
            {"fgsm": {"eps": EPS}}
            if attack == "fgsm"
            else {"pgd": {"eps": EPS, "steps": PGD_STEPS, "step_size": PGD_STEP}}
        ],
    }
    path = folder / "audit.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    delta = torch.zeros_like(x)
    for _ in range(PGD_STEPS):
        leaf = (x + delta).requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(leaf), y, reduction="sum"), leaf)
        delta = (delta + PGD_STEP * grad.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0.0, 1.0) - x
    return (x + delta).detach()


def _naive_pgd_sweep(
    model: nn.Module, names: list[str], filter_name: str, x: torch.Tensor, y: torch.Tensor,
    magnitude: bool, original: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``naive_sweep`` with PGD (no random start) instead of FGSM."""
    state = model.state_dict()
    values = np.concatenate([state[name].double().numpy().ravel() for name in names])
    values = np.abs(values) if magnitude else values
    grid = thresholds(values, filter_name, N_THRESHOLDS)
    delta = (values.max() - values.min()) / (2 * N_THRESHOLDS)
    fixed = _pgd(model, x, y) if original else None
    clean, adv, removed = [], [], []
    for alpha in grid:
        variant = copy.deepcopy(model)
        sd = variant.state_dict()
        for name in names:
            v = sd[name].double().numpy()
            mask = zeroed(np.abs(v) if magnitude else v, filter_name, alpha, delta)
            sd[name][torch.from_numpy(mask)] = 0
        variant.load_state_dict(sd)
        x_adv = fixed if fixed is not None else _pgd(variant, x, y)
        with torch.no_grad():
            clean.append(int((variant(x).argmax(1) == y).sum()) / len(y))
            adv.append(int((variant(x_adv).argmax(1) == y).sum()) / len(y))
        removed.append(zeroed(values, filter_name, alpha, delta).mean())
    return np.array(clean), np.array(adv), np.array(removed)  # fmt: skip


def _session(tmp_path: Path, case: str) -> AuditSession:
    return AuditSession(load_spec(_write_audit(tmp_path, *CASES[case])))


@pytest.mark.parametrize("case", list(CASES))
def test_every_curve_of_an_unusual_architecture_equals_a_naive_evaluation(
    tmp_path, monkeypatch, case
):
    _, _, settings, _ = CASES[case]
    # filtering.fast batches variants with vmap on CUDA and XLA only; here on the CPU too, so
    # its path is checked (an LSTM in the suffix has no batching rule: evaluated in turn).
    monkeypatch.setattr(Evaluator, "batching_devices", ("cpu", "cuda", "xla"))
    session = _session(tmp_path, case)
    model = session.prepared.loaded.module
    x, y = session.prepared.data.x, session.prepared.data.y
    layers = session.prepared.layers
    magnitude = settings.get("values") == "magnitude"
    original = settings.get("adversarial_source") == "original"
    pgd = settings.get("attack") == "pgd"
    attack_id = f"pgd_linf_eps{EPS}_steps{PGD_STEPS}" if pgd else f"fgsm_eps{EPS}"
    sweeps = session.sweeps("pulse", attack_id)
    assert [s.layer for s in sweeps] == [*(layer.name for layer in layers), None]
    assert any(len(set(s.clean_accuracy + s.adversarial_accuracy)) > 1 for s in sweeps)
    for sweep in sweeps:
        held = {
            id(t): f"model.{layer.name}.{name}"  # a tied tensor once, under its last holder
            for layer in layers
            if sweep.layer in (None, layer.name)
            for name, t in zip(layer.tensor_names, layer.parameters, strict=True)
        }
        names = list(held.values())
        if pgd:
            clean, adv, removed = _naive_pgd_sweep(model, names, "pulse", x, y, magnitude, original)
        else:
            clean, adv, removed, _ = naive_sweep(
                model,
                names,
                "pulse",
                N_THRESHOLDS,
                x,
                y,
                EPS,
                magnitude=magnitude,
                original=original,
            )
        where = f"{case} {sweep.layer or 'global'}"
        assert sweep.clean_accuracy == clean.tolist(), where
        assert sweep.adversarial_accuracy == adv.tolist(), where
        assert sweep.removed_fraction == pytest.approx(removed.tolist(), abs=1e-12), where
        state = model.state_dict()
        assert sweep.numel == sum(state[name].numel() for name in names), where


def test_the_attention_output_projection_is_analysed_as_the_linear_layer_it_is(tmp_path):
    """``MultiheadAttention.out_proj`` is an ``nn.Linear`` subclass: DESIGN §1.1 analyses every
    nn.Linear, so it is in the local scopes, the global scope and the fragile fraction's
    denominator (matched by class name, ``NonDynamicallyQuantizableLinear``, it was left out)."""
    session = _session(tmp_path, "vit")
    inner = session.prepared.loaded.inner
    expected = [
        name
        for name, module in inner.named_modules()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    ]
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" in expected
    assert [layer.name for layer in session.prepared.layers] == expected
    global_sweep = session.sweeps("pulse", f"fgsm_eps{EPS}")[-1]
    modules = dict(inner.named_modules())
    assert global_sweep.numel == sum(modules[name].weight.numel() for name in expected)


# --------------------------------------------------------------------------- refused networks
class Dropped(nn.Module):
    """Dropout active at inference: ``F.dropout(training=True)`` (Monte-Carlo dropout) or an
    ``nn.Dropout`` that a ``train()`` override keeps training after ``eval()``."""

    def __init__(self, how: str = "functional") -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 64, 4)

    def train(self, mode: bool = True) -> Dropped:
        super().train(mode)
        self.drop.training = self.how == "stuck" or mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        h = F.dropout(h, 0.3, training=True) if self.how == "functional" else self.drop(h)
        return self.fc(h)


class Stateful(nn.Module):
    """Writes a buffer in forward: a call counter, or a running input mean it subtracts."""

    def __init__(self, how: str = "counter") -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "counter":
            self.calls += 1
        else:
            with torch.no_grad():
                self.running.mul_(0.9).add_(0.1 * x.mean((0, 2, 3))[:, None, None])
        return self.fc(torch.tanh(self.conv(x - self.running)).flatten(1))


class BatchStatistics(nn.Module):
    """BatchNorm without running statistics normalises by each batch's, also in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.fc = nn.Linear(4 * 64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


class Tokens(nn.Module):
    """Integer token ids (stored as numbers in the test set) through an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x.long()).mean(1))


def _tensor_session(tmp_path: Path, name: str, factory: str, **data: Any) -> AuditSession:
    """A session on ``model.pt`` and ``test.pt`` written in ``tmp_path`` by the test."""
    spec = {
        "version": 1,
        "name": name,
        "model": {"factory": f"tests.test_unusual_models:{factory}", "checkpoint": "model.pt"},
        "data": {"source": "tensors", "path": "test.pt", **data},
        "device": "cpu",
    }
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return AuditSession(load_spec(tmp_path / "audit.yaml"))


def _prepare(tmp_path: Path, factory: str, kwargs: dict[str, Any]) -> AuditSession:
    path = _write_audit(tmp_path, factory, (3, 8, 8), {"kwargs": kwargs}, None)
    return AuditSession(load_spec(path))


@pytest.mark.parametrize(
    ("how", "named"),
    [("functional", "forward\\(\\) of the model itself"), ("stuck", "It comes from drop\\.")],
)
def test_a_model_random_at_inference_is_refused_naming_where(tmp_path, how, named):
    session = _prepare(tmp_path, "Dropped", {"how": how})
    with pytest.raises(ModelLoadError, match="random at inference") as info:
        session.clean_accuracy()
    assert info.value.key == "model.factory"
    assert info.match(named)
    assert ("training mode after eval(): drop." in str(info.value)) == (how == "stuck")


@pytest.mark.parametrize(("how", "buffer"), [("counter", "calls"), ("running_mean", "running")])
def test_a_forward_that_writes_its_buffers_is_refused_before_any_accuracy(tmp_path, how, buffer):
    session = _prepare(tmp_path, "Stateful", {"how": how})
    with pytest.raises(ModelLoadError, match=f"changed these buffers of the model: {buffer}\\."):
        session.clean_accuracy()


def test_logits_that_depend_on_the_rest_of_the_batch_are_refused(tmp_path):
    session = _prepare(tmp_path, "BatchStatistics", {})
    with pytest.raises(ModelLoadError, match=r"data\.batch_size") as info:
        session.clean_accuracy()
    assert info.match("BatchNorm layers without running statistics: bn\\.")
    assert info.value.key == "model.factory"


def test_integer_token_inputs_are_refused_naming_the_model_factory(tmp_path):
    torch.manual_seed(0)
    model = Tokens()
    x = torch.randint(0, 12, (32, 5))
    with torch.no_grad():
        y = model(x).argmax(1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save({"x": x, "y": y}, tmp_path / "test.pt")
    session = _tensor_session(tmp_path, "tokens", "Tokens", input_range=[0, 11])
    with pytest.raises(ModelLoadError, match="integer inputs") as info:
        session.clean_accuracy()
    assert info.value.key == "model.factory"


# --------------------------------------------------------------------------- exact fp32 on CUDA
def test_a_cuda_audit_runs_fp32_convolutions_in_ieee_not_tf32():
    """cuDNN's default runs fp32 convolutions and RNNs in TF32 on Ampere and later GPUs; an
    audit's fp32 is exact, so the device settings turn it off (only flags: no GPU needed)."""
    saved = torch.backends.fp32_precision
    conv, rnn = torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision
    determinism = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        settings = deterministic_settings(torch.device("cuda", 0))
        assert settings["fp32_precision"] == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cudnn.rnn.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.fp32_precision = saved
        torch.backends.cudnn.conv.fp32_precision = conv
        torch.backends.cudnn.rnn.fp32_precision = rnn
        torch.use_deterministic_algorithms(determinism[0], warn_only=determinism[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = determinism[2:]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


class SingleLogit(nn.Module):
    """A binary classifier with one score per example (a sigmoid's input)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_a_single_logit_classifier_is_refused_not_perfect(tmp_path):
    """With one output the argmax is always 0: on labels that can only be 0 (the labels are
    checked against the outputs) every accuracy read 1.0 and every gate passed."""
    torch.manual_seed(0)
    torch.save(SingleLogit().state_dict(), tmp_path / "model.pt")
    torch.save(
        {"x": torch.rand(16, 3, 8, 8), "y": torch.zeros(16, dtype=torch.long)}, tmp_path / "test.pt"
    )
    session = _tensor_session(tmp_path, "single", "SingleLogit")
    with pytest.raises(ModelLoadError, match="returns two logits") as info:
        session.clean_accuracy()
    assert info.value.key == "model.factory"
