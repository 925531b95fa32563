"""The built wheel, not the source tree, renders a report and declares the pytest plugin.

The wheel is built from the checkout and installed, without dependencies, into a fresh virtual
environment. torch and the other third-party packages are not reinstalled: a ``.pth`` file
appends this environment's site-packages *after* the new one's, so the wheel's
``inferlink_audit`` is found first, and a ``.pth`` line only adds a folder: the editable install's
own ``.pth`` pointing at the source tree is not followed. Every command runs from a folder
outside the checkout.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO_ROOT
from .specs import write_spec

pytestmark = pytest.mark.slow

WHEEL_FILES = (
    "inferlink_audit/__init__.py",
    "inferlink_audit/templates/report.html.j2",
    "inferlink_audit/py.typed",
    "pytest_inferlink/__init__.py",
    "pytest_inferlink/plugin.py",
)


def _run(
    args: list[str | Path], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _check(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    _check(
        _run(
            [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, "."],
            cwd=REPO_ROOT,
        )
    )
    (built,) = dist.glob("inferlink_audit-*.whl")
    return built


@pytest.fixture(scope="module")
def venv_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("wheel-venv") / "venv"
    outside = venv.parent
    _check(_run([sys.executable, "-m", "venv", venv], cwd=outside))
    python = venv / "bin" / "python"
    _check(_run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], outside))
    site = Path(
        _check(
            _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], outside)
        ).strip()
    )
    # This environment's package folders, not the checkout: only third-party packages come from
    # here. The name sorts last, though order within one .pth-processing pass does not matter.
    deps = dict.fromkeys(sysconfig.get_path(kind) for kind in ("purelib", "platlib"))
    (site / "zz_inferlink_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return python


def test_wheel_ships_templates_typing_marker_plugin_and_entry_point(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_text = archive.read(entry_points).decode()
    missing = [name for name in WHEEL_FILES if name not in names]
    assert not missing, f"not in {wheel.name}: {missing}"
    assert not [n for n in names if n.startswith(("tests/", "example_audits/", "pytest_plugin/"))]
    sections = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    sections.optionxform = str  # type: ignore[method-assign, assignment]
    sections.read_string(entry_text)
    assert dict(sections["pytest11"]) == {"inferlink": "pytest_inferlink.plugin"}
    assert sections["console_scripts"]["inferlink-audit"] == "inferlink_audit.cli:main"


# One test, not two: under ``pytest -n 2`` each worker would build its own environment.
def test_installed_wheel_is_what_gets_imported_and_renders_a_report(
    venv_python: Path, wheel: Path, tmp_path: Path
) -> None:
    venv = venv_python.parents[1].resolve()
    script = (
        "import json, inferlink_audit, pytest_inferlink.plugin\n"
        "from inferlink_audit.report import templates_root\n"
        "print(json.dumps({'version': inferlink_audit.__version__, 'paths': ["
        "inferlink_audit.__file__, pytest_inferlink.plugin.__file__, str(templates_root())]}))\n"
    )
    found = json.loads(_check(_run([venv_python, "-c", script], cwd=tmp_path)))
    for path in found["paths"]:
        assert Path(path).resolve().is_relative_to(venv), f"{path} is not from the wheel"
    assert wheel.name.startswith(f"inferlink_audit-{found['version']}-")
    version = _check(_run([venv / "bin" / "inferlink-audit", "--version"], cwd=tmp_path))
    assert version.split() == ["inferlink-audit", found["version"]]

    spec = write_spec(
        tmp_path,
        filtering={"thresholds": 3, "filters": ["pulse"], "scopes": ["global"]},
        checks={"min_clean_accuracy": 0.5},
    )
    out = tmp_path / "out"
    _check(
        _run([venv_python, "-m", "inferlink_audit", "run", spec, "--out", out, "--quiet"], tmp_path)
    )
    html = (out / "report.html").read_text(encoding="utf-8")
    assert re.search(r"<title>PASS\b", html), "the title leads with the verdict"
    assert "<svg" in html
    assert json.loads((out / "results.json").read_text())["models"][0]["checks"][0]["passed"]
