"""Selective retraining (DESIGN §1.7): what is frozen stays bit-identical, both runs see the
same randomness, and every number in the remediation entry can be recomputed from the
written checkpoints."""

from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from torch import nn

from inferlink_audit.attack_builder import build_attack
from inferlink_audit.audit import AuditSession
from inferlink_audit.checks import plan_checks
from inferlink_audit.errors import IntegrityError, SpecError
from inferlink_audit.fileio import sha256_file
from inferlink_audit.models import NormalizedModel
from inferlink_audit.remediation import safe_file_stem, selective_retrain
from inferlink_audit.report import report_html
from inferlink_audit.results import AuditResult, write_results
from inferlink_audit.spec import FGSMSpec, SelectiveRetrainSpec
from inferlink_audit.spec_loader import load_spec
from inferlink_audit.sweep import EvalData

from .specs import EXAMPLES, write_spec

DIGITS_LAYERS = ("conv1", "conv2", "fc1", "fc2")
EPS = 0.1
MIN_GAIN = 0.02


def bits(t: torch.Tensor) -> bytes:
    """A tensor's bytes: equal bytes is bit identity (unlike ==, which equates -0.0 and 0.0)."""
    return t.detach().cpu().contiguous().numpy().tobytes()


# --------------------------------------------------------------------------- the digits audit
@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> tuple[AuditSession, Path]:
    folder = tmp_path_factory.mktemp("remediation")
    spec = load_spec(
        write_spec(
            folder,
            name="../../<b>digits</b>",
            data={
                "source": "sklearn_digits",
                "limit": 120,
                "batch_size": 60,
                "normalize": {"mean": [0.5], "std": [0.5]},
                "train": {"source": "sklearn_digits", "split": "train", "limit": 240},
            },
            filtering={"thresholds": 5, "filters": ["low_pass"], "scopes": ["local"]},
            attacks=[{"fgsm": {"eps": EPS}}],
            remediation={
                "selective_retrain": {
                    "epochs": 2,
                    "adversarial_mix": 0.5,
                    "min_adversarial_gain": MIN_GAIN,
                    "response": "clean",
                }
            },
        )
    )
    return AuditSession(spec, output_dir=folder / "out"), folder


def digits_model(state: dict[str, torch.Tensor]) -> nn.Module:
    """The example CNN with ``state`` loaded, behind the spec's normalisation, in eval mode."""
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("digits_example", EXAMPLES / "digits.py")
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    net = module.DigitsCNN(num_classes=10)
    net.load_state_dict(state)
    return NormalizedModel(net, [0.5], [0.5]).eval()


def fgsm_accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Clean and FGSM accuracy by hand: x' = clip(x + ε·sign ∇ₓ Σ CE), one batch at a time."""
    clean = adversarial = 0
    for start in range(0, len(y), 60):
        xb, yb = x[start : start + 60].clone().requires_grad_(True), y[start : start + 60]
        logits = model(xb)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, yb, reduction="sum"), xb)
        adv = (xb + EPS * grad.sign()).clamp(0.0, 1.0)
        with torch.no_grad():
            clean += int((logits.argmax(1) == yb).sum())
            adversarial += int((model(adv).argmax(1) == yb).sum())
    return clean / len(y), adversarial / len(y)


def test_fragile_layers_stay_bit_identical_and_results_list_what_moved(session):
    audit, folder = session
    before = sha256_file(EXAMPLES / "digits_cnn.safetensors")
    result = audit.remediation()
    fragile = {
        s.layer for s in audit.sweeps("low_pass", f"fgsm_eps{EPS}") if s.labels.clean == "fragile"
    }
    assert fragile and fragile != set(DIGITS_LAYERS)  # both kinds, or the test shows nothing
    assert set(result["frozen_layers"]) == fragile
    assert set(result["frozen_layers"]) | set(result["trained_layers"]) == set(DIGITS_LAYERS)
    written = folder / "out" / result["checkpoint"]
    assert written.parent == folder / "out" / "remediated"  # a hostile name cannot escape
    retrained = load_file(written)
    original = load_file(EXAMPLES / "digits_cnn.safetensors")
    assert retrained.keys() == original.keys()
    order = list(audit.prepared.loaded.inner.state_dict())  # results list in state-dict order
    moved = [k for k in order if bits(retrained[k]) != bits(original[k])]
    assert result["trained_tensors"] == moved
    assert result["frozen_tensors"] == [k for k in order if k not in moved]
    assert set(result["frozen_tensors"]) == {
        f"{n}.{p}" for n in fragile for p in ("weight", "bias")
    }
    # the control trains every analysed layer
    control = load_file(folder / "out" / result["control_checkpoint"])
    assert result["control_trained_tensors"] == [
        k for k in order if bits(control[k]) != bits(original[k])
    ]
    assert result["control_trained_tensors"] == order
    assert sha256_file(EXAMPLES / "digits_cnn.safetensors") == before
    # the audited model in memory is untouched
    inner = audit.prepared.loaded.inner.state_dict()
    assert all(bits(inner[k]) == bits(v) for k, v in original.items())
    # results.json carries the lists as computed
    path = write_results(AuditResult(meta={}, models=[audit.model_result([])]), folder / "r.json")
    written_entry = json.loads(path.read_text())["models"][0]["remediation"]
    assert written_entry["trained_tensors"] == moved
    assert written_entry["frozen_tensors"] == result["frozen_tensors"]


def test_scores_are_those_of_the_written_checkpoints(session):
    audit, folder = session
    result = audit.remediation()
    x, y = audit.prepared.data.x.cpu(), audit.prepared.data.y.cpu()
    before = fgsm_accuracies(digits_model(load_file(EXAMPLES / "digits_cnn.safetensors")), x, y)
    for run, name in (("selective", "checkpoint"), ("control", "control_checkpoint")):
        after = fgsm_accuracies(digits_model(load_file(folder / "out" / result[name])), x, y)
        scores = result[run]
        assert (scores["clean_before"], scores["adversarial_before"]) == before, run
        assert (scores["clean_after"], scores["adversarial_after"]) == after, run


def test_gain_check_measures_the_recomputed_gain_and_fails_below_its_limit(session):
    audit, folder = session
    (planned,) = [p for p in plan_checks(audit.spec) if p.check == "min_adversarial_gain"]
    assert planned.line == audit.spec.line_of(
        "remediation", "selective_retrain", "min_adversarial_gain"
    )
    assert planned.limit == MIN_GAIN
    x, y = audit.prepared.data.x.cpu(), audit.prepared.data.y.cpu()
    checkpoint = folder / "out" / f"remediated/{safe_file_stem(audit.spec.name)}.safetensors"
    result = audit.evaluate(planned)  # runs the remediation, which writes the checkpoint
    _, adversarial_before = fgsm_accuracies(
        digits_model(load_file(EXAMPLES / "digits_cnn.safetensors")), x, y
    )
    _, adversarial_after = fgsm_accuracies(digits_model(load_file(checkpoint)), x, y)
    gain = adversarial_after - adversarial_before
    assert result.measured == pytest.approx(gain, abs=1e-12)
    assert result.passed == (gain >= MIN_GAIN)
    at_limit = audit.evaluate(dataclasses.replace(planned, limit=gain))
    assert at_limit.passed and at_limit.measured == pytest.approx(gain, abs=1e-12)
    above = audit.evaluate(dataclasses.replace(planned, limit=gain + 1 / len(y)))
    assert not above.passed and above.limit == pytest.approx(gain + 1 / len(y))


def test_remediation_with_only_the_global_scope_is_refused(tmp_path):
    path = write_spec(
        tmp_path,
        data={
            "source": "sklearn_digits",
            "train": {"source": "sklearn_digits", "split": "train"},
        },
        filtering={"scopes": ["global"]},
        remediation={"selective_retrain": {"epochs": 1}},
    )
    (line,) = [n for n, text in enumerate(path.read_text().splitlines(), 1) if "scopes:" in text]
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).splitlines()[0] == (
        f"{path}:{line}: filtering.scopes: remediation freezes the layers labelled fragile "
        "one by one: add 'local' to filtering.scopes"
    )
    assert info.value.key == "filtering.scopes"
    # the same spec with a local scope loads
    spec = yaml.safe_load(path.read_text())
    spec["filtering"]["scopes"] = ["local", "global"]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert load_spec(path).remediation is not None


# --------------------------------------------------------------------------- the freezing policy
TRACE: list[tuple[str, torch.Tensor]] = []  # what training forwards saw, across deep copies


class RecordingDropout(nn.Module):
    """Dropout from the global generator, as nn.Dropout draws it, recording each mask."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        mask = F.dropout(torch.ones_like(x), self.p, training=True)
        TRACE.append(("mask", mask))
        return x * mask


class NormNet(nn.Module):
    """BatchNorm on the input (never analysed), conv→BN twice, dropout, fc→LayerNorm, fc, and
    a free scale parameter (never analysed)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(1)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.drop = RecordingDropout(0.25)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.ln1 = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 10)
        self.scale = nn.Parameter(torch.ones(()))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(self.bn_in(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.ln1(self.fc1(self.drop(x.flatten(1)))))
        return self.fc2(x) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.body(x)
        if self.training:
            TRACE.append(("input", x.detach().clone()))
            TRACE.append(("logits", logits.detach().clone()))
        return logits


class UntraceableNormNet(NormNet):
    """The same network with a data-dependent branch, which torch.fx cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            return super().forward(x)
        return x  # pragma: no cover


class Counter(nn.Module):
    """Counts its calls in a buffer in every mode: a tensor no eval mode can keep frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


class CountingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.counter = Counter()
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.counter(torch.relu(self.fc1(x.flatten(1)))))


def tensors(*modules: str, bn: bool = False) -> set[str]:
    kinds = (
        "weight",
        "bias",
        *(("running_mean", "running_var", "num_batches_tracked") if bn else ()),
    )
    return {f"{m}.{k}" for m in modules for k in kinds}


CONV1_UNIT = tensors("conv1") | tensors("bn1", bn=True)
CONV2_UNIT = tensors("conv2") | tensors("bn2", bn=True)
FC1_UNIT = tensors("fc1", "ln1")
FC2_UNIT = tensors("fc2")
UNANALYSED = tensors("bn_in", bn=True) | {"scale"}
N_TRAIN, TRAIN_BATCH, EPOCHS = 96, 32, 2
STEPS = EPOCHS * -(-N_TRAIN // TRAIN_BATCH)


def retrain(
    folder: Path,
    net: nn.Module,
    fragile: list[str],
    trained: list[str],
    adversarial_mix: float = 0.0,
) -> dict[str, Any]:
    """``selective_retrain`` on sklearn digits (96 to train on, 64 to score), FGSM ε = 0.1."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    attack = build_attack(FGSMSpec(eps=EPS), (0.0, 1.0), 0)
    return selective_retrain(
        NormalizedModel(net, [0.5], [0.5]).eval(),
        inner_prefix="model.",
        fragile_layers=fragile,
        trained_layers=trained,
        test=EvalData(x[-64:], y[-64:], 32),
        train=EvalData(x[:N_TRAIN], y[:N_TRAIN], TRAIN_BATCH),
        attack=attack,
        mix_attack=attack,
        settings=SelectiveRetrainSpec(epochs=EPOCHS, lr=1e-2, adversarial_mix=adversarial_mix),
        seed=0,
        checkpoint_path=folder / "remediated" / "net.safetensors",
        checkpoint_name="remediated/net.safetensors",
    )


def seeded(kind: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return kind().eval()


@pytest.mark.parametrize(
    "kind,found_by", [(NormNet, "torch.fx graph"), (UntraceableNormNet, "module order")]
)
def test_frozen_layers_keep_their_normalisation_and_running_statistics(tmp_path, kind, found_by):
    net = seeded(kind)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = retrain(tmp_path, net, fragile=["conv1", "fc1"], trained=["conv2", "fc2"])
    selective = load_file(tmp_path / "remediated" / "net.safetensors")
    assert selective.keys() == before.keys()
    frozen = CONV1_UNIT | FC1_UNIT | UNANALYSED
    assert {k for k in before if bits(selective[k]) == bits(before[k])} == frozen
    assert result["normalisation"] == {"conv1": ["bn1"], "conv2": ["bn2"], "fc1": ["ln1"]}
    assert result["normalisation_found_by"].startswith(found_by)
    assert set(result["frozen_tensors"]) == frozen
    assert set(result["trained_tensors"]) == CONV2_UNIT | FC2_UNIT
    # the control trains every analysed layer with its normalisation, and nothing else
    control = load_file(tmp_path / "remediated" / "control" / "net.safetensors")
    assert {k for k in before if bits(control[k]) == bits(before[k])} == UNANALYSED
    assert set(result["control_trained_tensors"]) == CONV1_UNIT | CONV2_UNIT | FC1_UNIT | FC2_UNIT
    assert result["checkpoint"] == "remediated/net.safetensors"
    assert result["control_checkpoint"] == "remediated/control/net.safetensors"


def test_selective_and_control_runs_draw_the_same_dropout_masks_and_batches(tmp_path):
    net = seeded(NormNet)
    TRACE.clear()
    state = torch.get_rng_state()
    retrain(tmp_path, net, fragile=["conv1"], trained=["conv2", "fc1", "fc2"])
    for kind in ("mask", "input"):
        seen = [t for k, t in TRACE if k == kind]
        assert len(seen) == 2 * STEPS, kind
        selective, control = seen[:STEPS], seen[STEPS:]
        assert all(bits(a) == bits(b) for a, b in zip(selective, control, strict=True)), kind
    masks = [t for k, t in TRACE if k == "mask"]
    assert bits(masks[0]) != bits(masks[1])  # the masks are random, not one mask reused
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left as it was


def test_with_no_fragile_layer_both_runs_are_identical_bit_for_bit(tmp_path):
    net = seeded(NormNet)
    TRACE.clear()
    result = retrain(
        tmp_path, net, fragile=[], trained=["conv1", "conv2", "fc1", "fc2"], adversarial_mix=0.5
    )
    logits = [t for k, t in TRACE if k == "logits"]
    assert len(logits) == 2 * STEPS
    assert all(bits(a) == bits(b) for a, b in zip(logits[:STEPS], logits[STEPS:], strict=True))
    selective = load_file(tmp_path / "remediated" / "net.safetensors")
    control = load_file(tmp_path / "remediated" / "control" / "net.safetensors")
    assert all(bits(selective[k]) == bits(control[k]) for k in selective)
    assert result["selective"] == result["control"]
    assert result["trained_tensors"] == result["control_trained_tensors"]


class OutOfOrderNet(nn.Module):
    """Registers bn_b right after conv_a, but calls bn_a on conv_a's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 2, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(2)
        self.conv_b = nn.Conv2d(2, 2, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.conv_a(x)))
        return self.fc(torch.relu(self.bn_b(self.conv_b(x))).flatten(1))


def test_the_graph_not_the_registration_order_decides_which_normalisation_is_frozen(tmp_path):
    net = seeded(OutOfOrderNet)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = retrain(tmp_path, net, fragile=["conv_a"], trained=["conv_b", "fc"])
    selective = load_file(tmp_path / "remediated" / "net.safetensors")
    kept = {k for k in before if bits(selective[k]) == bits(before[k])}
    assert kept == tensors("conv_a") | tensors("bn_a", bn=True)
    assert result["normalisation"] == {"conv_a": ["bn_a"], "conv_b": ["bn_b"]}


class TiedNet(nn.Module):
    """fc_b uses fc_a's weight (weight tying): freezing fc_a freezes that weight under both
    names, while fc_b's own bias trains."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_a = nn.Linear(64, 64)
        self.fc_b = nn.Linear(64, 64)
        self.fc_b.weight = self.fc_a.weight
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc_b(torch.relu(self.fc_a(x.flatten(1))))))


def test_a_weight_tied_to_a_frozen_layer_stays_frozen_under_both_names(tmp_path):
    net = seeded(TiedNet)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = retrain(tmp_path, net, fragile=["fc_a"], trained=["fc_b", "fc"])
    selective = load_file(tmp_path / "remediated" / "net.safetensors")
    kept = {k for k in before if bits(selective[k]) == bits(before[k])}
    assert kept == {"fc_a.weight", "fc_a.bias", "fc_b.weight"}
    assert result["trained_tensors"] == ["fc_b.bias", "fc.weight", "fc.bias"]


def test_report_names_the_normalisation_and_the_trained_tensors(tmp_path, session):
    audit, _ = session
    result = retrain(tmp_path, seeded(NormNet), fragile=["conv1", "fc1"], trained=["conv2", "fc2"])
    model = dataclasses.replace(audit.model_result([]), remediation=result)
    page = report_html(AuditResult(meta=audit.meta(1.0), models=[model]))
    section = page[page.index('<section id="remediation">') :]
    text = re.sub(
        r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", section[: section.index("</section>")]))
    )
    assert "conv1 → bn1, conv2 → bn2, fc1 → ln1" in text
    assert f"trained_tensors {', '.join(result['trained_tensors'])} " in text
    assert "remediated/control/net.safetensors" in text


def test_a_frozen_tensor_written_by_the_forward_pass_is_an_integrity_error(tmp_path):
    with pytest.raises(
        IntegrityError, match=r"changed tensors it was to keep frozen: counter\.calls"
    ):
        retrain(tmp_path, seeded(CountingNet), fragile=["fc1"], trained=["fc2"])
    assert not (tmp_path / "remediated" / "net.safetensors").exists()


@pytest.mark.parametrize(
    "name,stem",
    [
        ("digits-cnn", "digits-cnn"),
        ("../../etc/passwd", "etc_passwd"),
        ("<script>", "script"),
        ("...", "model"),
    ],
)
def test_safe_file_stem(name, stem):
    assert safe_file_stem(name) == stem
