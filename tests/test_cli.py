"""``inferlink-audit`` end to end: exit codes 0 / 1 / 2, outputs, and the model left untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from scipy.integrate import simpson

from inferlink_audit.cli import main
from inferlink_audit.fileio import sha256_file
from inferlink_audit.results import read_results

from .specs import EXAMPLES, write_spec

CHECKPOINT = EXAMPLES / "digits_cnn.safetensors"
TOLERANCE = 0.05  # filtering.tolerance, left at its default by write_spec


def digits_accuracy_by_hand(limit: int, fgsm_eps: float = 0.0) -> float:
    """The digits CNN's accuracy on the first ``limit`` test digits, from sklearn and torch
    alone: the split the data docs give, ``images / 16``, normalised by mean 0.5, std 0.5;
    with ``fgsm_eps``, on x + ε·sign ∇ₓ Σ CE clamped to [0, 1] (FGSM written out)."""
    from safetensors.torch import load_file
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from example_audits.digits import DigitsCNN

    digits = load_digits()
    _, test = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, random_state=0, stratify=digits.target
    )
    index = np.sort(test)[:limit]
    x = torch.from_numpy((digits.images[index] / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target[index]).long()
    model = DigitsCNN(num_classes=10)
    model.load_state_dict(load_file(CHECKPOINT))
    model.eval()
    if fgsm_eps:
        point = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model((point - 0.5) / 0.5), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, point)
        x = (x + fgsm_eps * grad.sign()).clamp(0.0, 1.0)
    with torch.no_grad():
        predicted = model((x - 0.5) / 0.5).argmax(1)
    return float(np.mean((predicted == y).numpy()))


def fragile_fractions_by_hand(model: dict[str, Any]) -> dict[str, float]:
    """Per filter, the adversarial fragile fraction recomputed from results.json's raw curves:
    labels from scipy's Simpson rule on r = ψa/ψa⁰ against b = 1 − ρ, sizes from the checkpoint."""
    from safetensors.torch import load_file

    sizes = {k: v.numel() for k, v in load_file(CHECKPOINT).items()}
    (attack,) = model["attacks"]
    fragile: dict[str, int] = {}
    total: dict[str, int] = {}
    for sweep in model["sweeps"]:
        if sweep["scope"] != "local":
            continue
        assert sweep["adversarial_normalised_by"] == "adversarial"
        size = sizes[sweep["layer"] + ".weight"]
        assert sweep["numel"] == size
        response = np.array(sweep["adversarial_accuracy"]) / attack["accuracy"]
        x = np.linspace(0.0, 1.0, len(response))
        phi = simpson(response - (1.0 - np.array(sweep["removed_fraction"])), x=x)
        gain = simpson(np.maximum(0.0, response - 1.0), x=x)
        is_fragile = bool(gain <= TOLERANCE and phi < -TOLERANCE)
        fragile[sweep["filter"]] = fragile.get(sweep["filter"], 0) + (size if is_fragile else 0)
        total[sweep["filter"]] = total.get(sweep["filter"], 0) + size
    return {name: fragile[name] / total[name] for name in total}


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run whose limit of 0 every fragile layer exceeds: the fractions it measures, and
    the same fractions recomputed by hand, place the limits of the tests below."""
    folder = tmp_path_factory.mktemp("measure")
    spec = write_spec(folder, checks={"max_fragile_fraction": 0.0})
    code = main(["run", str(spec), "--out", str(folder / "out"), "--quiet"])
    data = json.loads((folder / "out" / "results.json").read_text())
    (model,) = data["models"]
    by_hand = fragile_fractions_by_hand(model)
    # Half the smallest layer's share of the analysed weights: a count off by any one layer
    # lands on the other side of a limit placed this far from the measured fraction.
    sizes = [
        s["numel"] for s in model["sweeps"] if s["scope"] == "local" and s["filter"] == "pulse"
    ]
    margin = min(sizes) / sum(sizes) / 2
    return {"code": code, "model": model, "by_hand": by_hand, "margin": margin}


def test_fragile_fraction_check_measures_the_fraction_the_curves_give(measured):
    by_hand = measured["by_hand"]
    assert sorted(by_hand) == ["high_pass", "low_pass", "pulse"]
    assert max(by_hand.values()) > 0, (
        "no filter finds a fragile layer: the limits below say nothing"
    )
    checks = {c["id"]: c for c in measured["model"]["checks"]}
    for name, fraction in by_hand.items():
        check = checks[f"{name}-fgsm_eps0.1-max_fragile_fraction"]
        assert check["measured"] == pytest.approx(fraction, abs=1e-12)
        assert check["passed"] is (fraction == 0.0)
    assert measured["code"] == 1


def test_passing_audit_exits_0_and_writes_results_and_report(tmp_path, capsys, measured):
    limit = max(measured["by_hand"].values()) + measured["margin"]
    spec = write_spec(
        tmp_path, checks={"min_clean_accuracy": 0.9, "max_fragile_fraction": float(limit)}
    )
    before = sha256_file(CHECKPOINT)
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "report:" in out
    result = read_results(tmp_path / "out" / "results.json")
    model = result.models[0]
    assert model.n_examples == 120
    assert model.clean_accuracy == pytest.approx(digits_accuracy_by_hand(120), abs=1e-12)
    # 4 layers local + global, 3 filters, 1 attack; 5 thresholds each
    assert len(model.sweeps) == 15
    assert all(len(s.clean_accuracy) == 5 for s in model.sweeps)
    assert {c.id: c.passed for c in model.checks} == {
        "min_clean_accuracy": True,
        "low_pass-fgsm_eps0.1-max_fragile_fraction": True,
        "high_pass-fgsm_eps0.1-max_fragile_fraction": True,
        "pulse-fgsm_eps0.1-max_fragile_fraction": True,
    }
    assert (tmp_path / "out" / "report.html").stat().st_size > 1000
    assert sha256_file(CHECKPOINT) == before
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_a_fragile_fraction_just_over_the_limit_exits_1_naming_the_filter(
    tmp_path, capsys, measured
):
    worst = max(measured["by_hand"].values())
    limit = worst - measured["margin"]
    spec = write_spec(tmp_path, checks={"max_fragile_fraction": float(limit)})
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    failing = sorted(n for n, f in measured["by_hand"].items() if f > limit)
    assert failing == sorted(n for n, f in measured["by_hand"].items() if f == worst)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    verdicts = {c["id"]: c["passed"] for c in data["models"][0]["checks"]}
    assert verdicts == {
        f"{n}-fgsm_eps0.1-max_fragile_fraction": n not in failing for n in measured["by_hand"]
    }
    for name in failing:
        assert f"FAIL {name}-fgsm_eps0.1-max_fragile_fraction: fragile fraction" in out


def test_failing_check_exits_1_and_names_the_measurement(tmp_path, capsys):
    spec = write_spec(
        tmp_path,
        attacks=[{"fgsm": {"eps": 0.3}}],
        filtering={"thresholds": 5, "filters": ["low_pass"], "scopes": ["global"]},
        checks={"min_adversarial_accuracy": 0.99},
    )
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "FAIL fgsm_eps0.3-min_adversarial_accuracy: adversarial accuracy" in out
    assert "< min 0.9900" in out
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    (check,) = data["models"][0]["checks"]
    # The measurement is the unfiltered network's accuracy on all 120 digits under FGSM.
    expected = digits_accuracy_by_hand(120, fgsm_eps=0.3)
    assert check["passed"] is False
    assert check["measured"] == pytest.approx(expected, abs=0.5 / 120)
    assert f"adversarial accuracy {expected:.4f} < min 0.9900" in out


def test_spec_error_exits_2_with_file_line_and_no_traceback(tmp_path, capsys):
    spec = write_spec(tmp_path, filtering={"thresholdz": 5})
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{spec}:" in err and "filtering.thresholdz: unknown key; did you mean 'thresholds'?" in err
    )
    assert "Traceback" not in err


def test_device_option_runs_a_spec_whose_device_is_missing_on_the_cpu(tmp_path, capsys):
    spec = write_spec(
        tmp_path,
        device="cuda:97",  # on no machine this suite runs on
        filtering={"thresholds": 3, "filters": ["pulse"], "scopes": ["global"]},
    )
    assert main(["run", str(spec), "--out", str(tmp_path / "alone"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"inferlink-audit: error: {spec}:") and "device 'cuda:97'" in err
    assert not (tmp_path / "alone").exists()
    out = tmp_path / "cpu"
    assert main(["run", str(spec), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert json.loads((out / "results.json").read_text())["meta"]["device"] == "cpu"


def test_missing_spec_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "no such audit spec" in capsys.readouterr().err


def test_compare_puts_both_models_in_one_report(tmp_path, capsys):
    small = {"thresholds": 3, "filters": ["pulse"], "scopes": ["local"]}
    write_spec(tmp_path, filename="other.yaml", name="other", filtering=small)
    spec = write_spec(tmp_path, filtering=small, compare=["other.yaml"])
    assert main(["run", str(spec), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    result = read_results(tmp_path / "o" / "results.json")
    assert [m.name for m in result.models] == ["digits-small", "other"]
    assert result.consistency["agreement"] == 1.0  # the same checkpoint twice
    html = (tmp_path / "o" / "report.html").read_text()
    assert "Transferability" in html and "Label agreement across models" in html


def test_init_writes_a_spec_that_loads_and_refuses_to_overwrite(tmp_path, capsys):
    from inferlink_audit.spec_loader import load_spec

    target = tmp_path / "audit.yaml"
    assert main(["init", str(target), "--name", "net"]) == 0
    assert load_spec(target).name == "net"
    assert main(["init", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert load_spec(target).name == "net"  # untouched
    assert main(["init", str(target), "--name", "other", "--force"]) == 0
    assert load_spec(target).name == "other"


@pytest.mark.parametrize(
    ("factory", "checkpoint"),
    [
        ("torchvision: resnet18", "weights dir/ünïcode — модель: v1.safetensors"),
        ("nets.py:Net", 'ckpt #1/it\'s "best" [v2].pt'),
        ("torchscript: my model.pt", "{weights}: 100%.ckpt"),
        ("my_pkg.sub.models:Net", "- dash: yes #not a comment.safetensors"),
    ],
    ids=["torchvision-unicode", "quotes-hash", "torchscript-braces", "module-dash"],
)
def test_init_writes_the_given_factory_and_checkpoint_so_they_load_back(
    tmp_path, capsys, monkeypatch, factory, checkpoint
):
    from inferlink_audit.spec_loader import load_spec

    target = tmp_path / "spéc dir" / "audit: ü.yaml"
    target.parent.mkdir()
    monkeypatch.chdir(target.parent)  # command-line paths start at the current folder
    argv = ["init", str(target), "--name", "net", "--factory", factory, "--checkpoint", checkpoint]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""
    assert yaml.safe_load(target.read_text(encoding="utf-8"))["model"] == {
        "factory": factory,
        "kwargs": {},
        "checkpoint": checkpoint,
    }
    spec = load_spec(target)
    assert (spec.name, spec.model.factory) == ("net", factory)
    assert spec.model.checkpoint == target.parent / checkpoint  # next to the spec


def test_init_refuses_a_factory_the_spec_would_refuse_and_writes_nothing(tmp_path, capsys):
    target = tmp_path / "audit.yaml"
    assert main(["init", str(target), "--factory", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"inferlink-audit: error: {target}:5: model.factory: factory 'resnet18'")
    assert "Traceback" not in err
    assert not target.exists()


def test_init_inspects_a_loadable_model_fills_the_layers_and_estimates_the_cost(tmp_path, capsys):
    from inferlink_audit.spec_loader import load_spec

    target = tmp_path / "audit.yaml"
    argv = ["init", str(target), "--factory", "example_audits.digits:DigitsCNN"]
    argv += ["--kwargs", "num_classes=10", "--checkpoint", str(CHECKPOINT)]
    argv += ["--data", "sklearn_digits", "--normalize", "0.5", "0.5", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    spec = load_spec(target)
    assert (spec.model.kwargs, spec.data.normalize.mean, spec.device) == (
        {"num_classes": 10},
        [0.5],
        "cpu",
    )
    assert spec.filtering.layers.include == ["*"]  # 4 layers: a small model is audited whole
    assert "all 4 Conv2d/Linear layers of the model" in out
    # (4 local sweeps of 25 thresholds, every layer has more than 25 weights, + global 25)
    # × 3 filters × 1 attack; 360 test digits.
    assert "= 375 variants × 3 passes × 360 examples" in out
    assert "one variant took " in out and "data.limit and filtering.thresholds" in out
    left = out.split("still to edit:\n", 1)[1].splitlines()
    # Everything was given and loaded: only the limits are left, with what the model measures.
    assert left[0].startswith("  - checks: the limits are placeholders")
    assert f"clean accuracy {digits_accuracy_by_hand(360):.3f}" in left[0]
    assert left[1] == f"then: inferlink-audit run {target}"


def test_init_chooses_the_first_last_and_largest_layer_of_each_stage_of_a_big_model():
    import torchvision

    from inferlink_audit.layers import select_layers
    from inferlink_audit.spec import LayerSelectionSpec
    from inferlink_audit.starter import choose_layers

    layers = select_layers(torchvision.models.resnet18(num_classes=10), LayerSelectionSpec())
    choice = choose_layers(layers)
    # conv1 and fc are stages of their own; in layer2-4 the first 3×3 conv at full width
    # (conv2 of the first block) is the first largest; layer1's convolutions are all equal.
    assert choice.include == [
        "conv1",
        "layer1.0.conv1",
        "layer2.0.conv2",
        "layer3.0.conv2",
        "layer4.0.conv2",
        "fc",
    ]
    assert choice.total == 21
    assert choice.reason.startswith("6 of the model's 21 Conv2d/Linear layers")


def test_init_refuses_a_checkpoint_that_does_not_fit_the_model_and_writes_nothing(tmp_path, capsys):
    target = tmp_path / "audit.yaml"
    argv = ["init", str(target), "--factory", "example_audits.digits:DigitsCNN"]
    argv += ["--kwargs", "{num_classes: 5}", "--checkpoint", str(CHECKPOINT)]
    argv += ["--data", "sklearn_digits"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"inferlink-audit: error: {target}:7: model.checkpoint: ")
    assert "does not fit the model" in err and "fc2.weight" in err
    assert err.rstrip().endswith(f"{target} was not written.")
    assert not target.exists()


def test_init_lists_only_what_is_left_to_edit(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "audit.yaml"
    argv = ["init", str(target), "--factory", "models.py:Net", "--checkpoint", "net.safetensors"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"wrote {target}"
    left = [line for line in out.splitlines() if line.startswith("  - ")]
    assert left == [
        f"  - model.factory: {tmp_path / 'models.py'} does not exist yet",
        f"  - model.checkpoint: {tmp_path / 'net.safetensors'} does not exist yet",
        "  - data: the starter audits scikit-learn's digits; point it at your test set "
        "(--data test.pt, a .npz, an image folder)",
        "  - then run init again with --force: it fills filtering.layers from the model and "
        "estimates the audit's cost",
    ]
    assert "placeholder" not in out  # factory and checkpoint were given


def test_init_writes_command_line_paths_relative_to_the_spec_folder(tmp_path, monkeypatch):
    import shutil

    from inferlink_audit.spec_loader import load_spec

    (tmp_path / "weights").mkdir()
    shutil.copy(CHECKPOINT, tmp_path / "weights" / "net.safetensors")
    monkeypatch.chdir(tmp_path)
    argv = ["init", "specs/audit.yaml", "--factory", "example_audits.digits:DigitsCNN"]
    argv += ["--checkpoint", "weights/net.safetensors", "--data", "data/test.pt"]
    (tmp_path / "specs").mkdir()
    assert main(argv) == 0
    written = yaml.safe_load((tmp_path / "specs" / "audit.yaml").read_text())
    assert written["model"]["checkpoint"] == "../weights/net.safetensors"
    assert written["data"] == {**written["data"], "source": "tensors", "path": "../data/test.pt"}
    spec = load_spec(tmp_path / "specs" / "audit.yaml")
    assert spec.model.checkpoint.resolve() == (tmp_path / "weights" / "net.safetensors")


def test_merge_combines_runs(tmp_path):
    spec = write_spec(
        tmp_path, filtering={"thresholds": 3, "filters": ["pulse"], "scopes": ["global"]}
    )
    assert main(["run", str(spec), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert (
        main(
            [
                "merge",
                str(tmp_path / "a" / "results.json"),
                str(tmp_path / "a" / "results.json"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    assert len(read_results(tmp_path / "m" / "results.json").models) == 2


@pytest.mark.slow
def test_console_script_runs_as_a_subprocess(tmp_path):
    spec = write_spec(
        tmp_path, filtering={"thresholds": 3, "filters": ["pulse"], "scopes": ["global"]}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "inferlink_audit", "run", str(spec), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(tmp_path / "o" / "results.json").exists()


@pytest.mark.parametrize(
    "content", ["[]", '{"schema": "inferlink-audit/results/v1"}', '{"schema": "x/v0"}']
)
def test_malformed_results_files_are_named(tmp_path, content):
    from inferlink_audit.errors import AuditError

    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(AuditError, match=str(path)):
        read_results(path)


def test_remediated_checkpoint_goes_under_out(tmp_path):
    spec = write_spec(
        tmp_path,
        data={
            "source": "sklearn_digits",
            "limit": 60,
            "batch_size": 60,
            "normalize": {"mean": [0.5], "std": [0.5]},
            "train": {"source": "sklearn_digits", "split": "train", "limit": 120},
        },
        filtering={"thresholds": 3, "filters": ["pulse"], "scopes": ["local"]},
        remediation={"selective_retrain": {"epochs": 1}},
    )
    assert main(["run", str(spec), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    result = read_results(tmp_path / "o" / "results.json")
    checkpoint = result.models[0].remediation["checkpoint"]
    assert checkpoint == "remediated/digits-small.safetensors"
    assert (tmp_path / "o" / checkpoint).is_file()
    assert not (tmp_path / "inferlink-report").exists()  # not the spec's default report.dir
