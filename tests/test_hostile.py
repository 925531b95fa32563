"""Hostile inputs: names that carry markup or paths, files that are not what they claim.

An audit reads files a spec names and writes a report others open in a browser. Whatever
those files and names hold, markup must reach the report escaped, nothing may be written
outside the report folder, and nothing the audit only reads may change.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from inferlink_audit.cli import main
from inferlink_audit.spec_loader import MAX_SPEC_BYTES

from .specs import EXAMPLES
from .test_bad_inputs import one_torch_thread, snapshot  # noqa: F401 (autouse fixture)

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
BOLD = "<b>Evil</b>"
SVG = "<svg onload=alert(3)>"  # a file name: no "/" allowed, so no closing tag

# A model whose only layer is named with markup and whose layer class is named with markup.
EVIL_FACTORY = f"""
from torch import nn

EvilLinear = type({BOLD!r}, (nn.Linear,), {{}})


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module({IMG!r}, EvilLinear(64, 10))

    def forward(self, x):
        return self._modules[{IMG!r}](x.flatten(1))
"""


def _quick(**overrides: object) -> dict[str, object]:
    spec: dict[str, object] = {
        "version": 1,
        "name": "digits",
        "model": {"factory": "digits.py:DigitsCNN", "checkpoint": "digits_cnn.safetensors"},
        "data": {"source": "sklearn_digits", "limit": 32, "batch_size": 32},
        "device": "cpu",
        "filtering": {"thresholds": 3, "filters": ["pulse"], "scopes": ["local"]},
        "attacks": [{"fgsm": {"eps": 0.1}}],
    }
    spec.update(overrides)
    return spec


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "audit"
    folder.mkdir()
    for name in ("digits.py", "digits_cnn.safetensors"):
        shutil.copy(EXAMPLES / name, folder / name)
    return folder


def _write(folder: Path, spec: dict[str, object], name: str = "audit.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return path


def test_markup_and_path_names_are_escaped_and_stay_in_the_report_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from inferlink_audit.data import load_dataset
    from inferlink_audit.spec import DataSourceSpec

    folder = _folder(tmp_path)
    (folder / "evil_net.py").write_text(EVIL_FACTORY)
    digits = load_dataset(DataSourceSpec(source="sklearn_digits", limit=32))
    np.savez(folder / f"{SVG}.npz", x=digits.x.numpy(), y=digits.y.numpy())
    spec = _write(
        folder,
        _quick(
            name=f"{SCRIPT}/../../etc/{IMG}",
            model={"factory": "evil_net.py:Net", "checkpoint": None},
            data={"source": "tensors", "path": f"{SVG}.npz", "batch_size": 32},
            filtering={
                "thresholds": 3,
                "filters": ["pulse"],
                "scopes": ["local", "global"],
                "layers": {"types": [BOLD]},
            },
        ),
        name=f"{IMG}.yaml",
    )
    monkeypatch.chdir(folder)
    outside = snapshot(tmp_path)
    out = folder / "report"
    code = main(["run", str(spec), "--out", str(out), "--quiet"])
    assert code in (0, 1)
    # Only the report folder is new; nothing beside it (or above it) was created or changed.
    after = snapshot(tmp_path)
    new = {k for k in after if k not in outside}
    assert new and all(k.startswith("audit/report/") for k in new), sorted(new)
    assert {k: v for k, v in after.items() if k in outside} == outside
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "results.json"]
    html = (out / "report.html").read_text(encoding="utf-8")
    for markup in (SCRIPT, IMG, BOLD, SVG, "<script>alert", "onerror=alert(1)>", "<svg onload"):
        assert markup not in html, f"raw {markup!r} in report.html"
    assert "&lt;script&gt;" in html or "&#60;script&#62;" in html
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    model = results["models"][0]
    assert model["name"] == f"{SCRIPT}/../../etc/{IMG}"  # kept exactly, only escaped in HTML
    assert {s["layer"] for s in model["sweeps"]} == {IMG, None}


def test_report_dir_from_the_spec_is_the_only_place_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path)
    spec = _write(folder, _quick(report={"dir": "../reports/run 1"}))
    monkeypatch.chdir(folder)
    before = snapshot(tmp_path)
    assert main(["run", str(spec), "--quiet"]) in (0, 1)
    new = {k for k in snapshot(tmp_path) if k not in before}
    assert new == {
        "reports/",
        "reports/run 1/",
        "reports/run 1/results.json",
        "reports/run 1/report.html",
    }


def test_an_output_folder_holding_the_spec_never_overwrites_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A spec saved as ``results.json`` (YAML is a superset of JSON) stays the user's file."""
    folder = _folder(tmp_path)
    spec = _write(folder, _quick(), name="results.json")
    before = snapshot(folder)
    assert main(["run", str(spec), "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "would replace" in err and "an input of this audit" in err and "Traceback" not in err
    assert snapshot(folder) == before


def test_an_output_path_that_is_a_file_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _folder(tmp_path)
    spec = _write(folder, _quick())
    (folder / "out").write_text("keep me\n")
    before = snapshot(folder)
    assert main(["run", str(spec), "--out", str(folder / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{spec}: --out {folder / 'out'} is a file, not a folder" in err
    assert snapshot(folder) == before
    assert main(["run", str(spec), "--out", str(folder / "out" / "sub")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert snapshot(folder) == before


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
@pytest.mark.parametrize("role", ["checkpoint", "data", "spec"])
def test_a_device_file_is_refused_without_being_read(
    role: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``/dev/zero`` behind an innocent name would be read forever; it is refused unread."""
    folder = _folder(tmp_path)
    if role == "checkpoint":
        os.symlink("/dev/zero", folder / "weights.safetensors")
        spec = _write(
            folder, _quick(model={"factory": "digits.py:DigitsCNN", "checkpoint": "weights.pt"})
        )
        os.symlink("/dev/zero", folder / "weights.pt")
    elif role == "data":
        os.symlink("/dev/zero", folder / "test.npz")
        spec = _write(folder, _quick(data={"source": "tensors", "path": "test.npz"}))
    else:
        spec = folder / "audit.yaml"
        os.symlink("/dev/zero", spec)
    before = snapshot(folder) if role != "spec" else None
    assert main(["run", str(spec), "--out", str(folder / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a regular file" in err and "Traceback" not in err
    assert not (folder / "out").exists()
    if before is not None:
        assert snapshot(folder) == before


def test_an_oversized_spec_is_refused_unparsed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "audit.yaml"
    spec.write_text("version: 1\n" + "# padding\n" * (MAX_SPEC_BYTES // 10 + 1))
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "too large for an audit spec" in err and str(spec) in err
    assert not (tmp_path / "out").exists()


def test_trusting_a_pickle_is_loud(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], recwarn: pytest.WarningsRecorder
) -> None:
    """The opt-in works, and says at every load that the file can run code."""
    import torch

    from example_audits.digits import DigitsCNN

    folder = _folder(tmp_path)
    torch.save(DigitsCNN(num_classes=3), folder / "whole_model.pt")  # pickles the class
    spec = _write(
        folder,
        _quick(
            model={
                "factory": "example_audits.digits:DigitsCNN",
                "kwargs": {"num_classes": 3},
                "checkpoint": "whole_model.pt",
                "trust_pickle": True,
            }
        ),
    )
    before = snapshot(folder)
    # Digits has 10 classes, this model 3: the run stops right after the trusted load.
    assert main(["run", str(spec), "--out", str(folder / "out")]) == 2
    assert "labels [3, 4, 5, 6, 7, 8, 9] are outside 0..2" in capsys.readouterr().err
    warned = [str(w.message) for w in recwarn if "INFERLINK-AUDIT" in str(w.message)]
    assert warned and "trust_pickle is true" in warned[0] and "arbitrary code" in warned[0]
    assert snapshot(folder) == before
