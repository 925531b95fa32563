"""``inferlink-audit`` end to end: exit codes 0 / 1 / 2, outputs, and the model left untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inferlink_audit.cli import main
from inferlink_audit.fileio import sha256_file
from inferlink_audit.results import read_results

from .specs import EXAMPLES, write_spec


def test_passing_audit_exits_0_and_writes_results_and_report(tmp_path, capsys):
    spec = write_spec(tmp_path, checks={"min_clean_accuracy": 0.9, "max_fragile_fraction": 1.0})
    before = sha256_file(EXAMPLES / "digits_cnn.safetensors")
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "report:" in out
    result = read_results(tmp_path / "out" / "results.json")
    model = result.models[0]
    assert 0.9 <= model.clean_accuracy <= 1.0 and model.n_examples == 120
    # 4 layers local + global, 3 filters, 1 attack; 5 thresholds each
    assert len(model.sweeps) == 15
    assert all(len(s.clean_accuracy) == 5 for s in model.sweeps)
    assert {c.id for c in model.checks} == {
        "min_clean_accuracy",
        "low_pass-fgsm_eps0.1-max_fragile_fraction",
        "high_pass-fgsm_eps0.1-max_fragile_fraction",
        "pulse-fgsm_eps0.1-max_fragile_fraction",
    }
    assert (tmp_path / "out" / "report.html").stat().st_size > 1000
    assert sha256_file(EXAMPLES / "digits_cnn.safetensors") == before
    assert not list((tmp_path / "out").glob("*.tmp"))


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
    assert check["passed"] is False and check["measured"] < 0.99


def test_spec_error_exits_2_with_file_line_and_no_traceback(tmp_path, capsys):
    spec = write_spec(tmp_path, filtering={"thresholdz": 5})
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{spec}:" in err and "filtering.thresholdz: unknown key; did you mean 'thresholds'?" in err
    )
    assert "Traceback" not in err


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
