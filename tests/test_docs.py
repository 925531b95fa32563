"""The docs are executed: the README's commands and spec reference, every spec under
``example_audits/`` and ``docs/``, and the tutorial's commands with the outputs it shows.

Commands run as the page writes them, in a scratch folder, through a shell whose ``PATH``
starts with this interpreter's folder (``pytest``, ``python`` and ``inferlink-audit`` are
the installed ones). A command the README adds is a test failure until it is either run
here or listed in ``NOT_RUN`` with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from inferlink_audit.spec_loader import load_spec, parse_spec

from .specs import EXAMPLES, write_spec

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TUTORIAL = ROOT / "docs" / "tutorial.md"

# README commands the suite does not run, and why.
NOT_RUN = {
    "make demo": "sets up a virtual environment and installs: what the whole suite runs inside",
    "make test": "runs this suite",
    "make test-oldest": "runs this suite in a second environment (downloads torch 2.13.0)",
    "make test-xla": "builds .venv-xla (downloads torch 2.9.0 and torch_xla) and runs test_xla.py",
    "pip install torch==2.9.0 torch_xla==2.9.0": "make test-xla installs these into .venv-xla",
    "pip install numpy scipy pyyaml pydantic jinja2 tqdm safetensors scikit-learn matplotlib "
    "pillow": "make test-xla installs the package's dependencies into .venv-xla",
    "pip install --no-deps inferlink-audit": "make test-xla installs the checkout with --no-deps",
    "torchrun --nproc-per-node 2 -m inferlink_audit run audit.yaml --out inferlink-report": (
        "tests/test_torchrun.py runs it with two gloo ranks on small specs"
    ),
}


def code_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(encoding="utf-8"), re.S)


def commands(block: str) -> list[str]:
    """The block's command lines, without trailing ``# comments``."""
    lines = []
    for line in block.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command and not command.startswith("#"):
            lines.append(command)
    return lines


def shell(command: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("GITHUB_STEP_SUMMARY", None)
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def readme_commands() -> list[str]:
    return [c for block in code_blocks(README, "bash") for c in commands(block)]


# --------------------------------------------------------------------------- README
def test_every_readme_command_is_run_here_or_listed_with_a_reason():
    run_here = set(README_RUNS)
    unknown = [c for c in readme_commands() if c not in run_here and c not in NOT_RUN]
    assert unknown == [], f"README commands neither run by test_docs.py nor in NOT_RUN: {unknown}"


def small_release_spec(folder: Path) -> Path:
    """``audits/release.yaml`` of the README's pytest lines: the digits CNN, quickly."""
    (folder / "audits").mkdir()
    filtering = {"thresholds": 3, "filters": ["pulse"], "scopes": ["local", "global"]}
    return write_spec(folder / "audits", "release.yaml", filtering=filtering)


# The README's commands, each with the scratch folder it needs and what must come out.
README_RUNS: dict[str, int] = {
    "pytest --inferlink-audit audits/release.yaml": 0,
    "pytest tests --inferlink-audit audits/": 0,
    "pytest --inferlink-audit audits/release.yaml -n 2": 0,
    "inferlink-audit run example_audits/digits.yaml --out inferlink-report": 0,
    "inferlink-audit init audit.yaml --factory models.py:Net --checkpoint net.safetensors": 0,
    "inferlink-audit merge a/results.json b/results.json --out merged": 0,
    "inferlink-audit run audit.yaml --shard 1/2 --out shard-1 --cache .inferlink-cache": 0,
    "inferlink-audit run audit.yaml --shard 2/2 --out shard-2 --cache .inferlink-cache": 0,
    "inferlink-audit merge shard-1/results.json shard-2/results.json --out inferlink-report": 0,
    "pytest --inferlink-audit audit.yaml --inferlink-shard 1/2 --inferlink-report shard-1": 0,
    "pytest --inferlink-audit audit.yaml --inferlink-shard 2/2 --inferlink-report shard-2": 0,
    "inferlink-audit schema --out inferlink-audit.schema.json": 0,
}


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    small_release_spec(tmp_path)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_own.py").write_text("def test_own():\n    assert True\n")
    shutil.copytree(
        EXAMPLES, tmp_path / "example_audits", ignore=shutil.ignore_patterns("digits32*", "shuff*")
    )
    for command in readme_commands():
        if command in NOT_RUN:
            continue
        if command.startswith("inferlink-audit merge a/"):
            for run in ("a", "b"):
                (tmp_path / run).mkdir()
                shutil.copy(tmp_path / "inferlink-report" / "results.json", tmp_path / run)
        if "--shard 1/2" in command:  # the shards' audit.yaml replaces the one init wrote
            filtering = {"thresholds": 3, "filters": ["pulse", "low_pass"], "scopes": ["global"]}
            write_spec(tmp_path, "audit.yaml", filtering=filtering)
        done = shell(command, tmp_path)
        output = done.stdout + done.stderr
        assert done.returncode == README_RUNS[command], f"{command}\n{output}"
        assert "Traceback" not in output, f"{command}\n{output}"
        if command.startswith("pytest tests"):
            # The folder's own test and the spec's one item (pulse × fgsm, no checks).
            assert "= 2 passed in " in output
        if command.startswith("inferlink-audit run example_audits"):
            assert "verdict: PASS" in output
            assert (tmp_path / "inferlink-report" / "report.html").is_file()
        if command.startswith("inferlink-audit init"):
            spec = load_spec(tmp_path / "audit.yaml")
            assert (spec.model.factory, spec.model.checkpoint) == (
                "models.py:Net",
                tmp_path / "net.safetensors",
            )
            assert "still to edit:" in output
        if command.startswith("inferlink-audit merge"):
            out = command.split("--out ")[1]
            assert (tmp_path / out / "report.html").is_file()
        if "--shard" in command:
            assert (tmp_path / command.split("--out ")[1].split()[0] / "results.json").is_file()
        if command.startswith("inferlink-audit schema"):
            schema = json.loads((tmp_path / "inferlink-audit.schema.json").read_text())
            assert schema["title"] == "inferlink-audit spec"


def test_readme_spec_reference_is_a_valid_spec_with_every_key_known(tmp_path):
    """The loader forbids unknown keys, so a block that validates names only real keys."""
    section = README.read_text(encoding="utf-8").split("## Spec reference", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    text = block.group(1)
    data = yaml.safe_load(text)
    if data.get("baseline"):  # the only input file the loader checks before a run
        (tmp_path / data["baseline"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / data["baseline"]).write_text("{}")
    for other in data.get("compare", []):
        (tmp_path / other).write_text("")
    spec = parse_spec(text, path=tmp_path / "reference.yaml")
    assert spec.name == data["name"]
    # Every section of the schema is shown, set to what the block says.
    assert set(data) >= {"version", "name", "model", "data", "filtering", "attacks", "checks"}


def doc_specs() -> list[pytest.param]:
    found = [
        pytest.param(path, id=str(path.relative_to(ROOT)))
        for path in sorted([*EXAMPLES.glob("*.yaml"), *(ROOT / "docs").rglob("*.yaml")])
    ]
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for index, block in enumerate(code_blocks(page, "yaml")):
            if re.search(r"^version:", block, re.M):
                found.append(pytest.param((page, block), id=f"{page.name}-block{index}"))
    return found


@pytest.mark.parametrize("where", doc_specs())
def test_every_spec_under_example_audits_and_docs_loads(where, tmp_path):
    if isinstance(where, Path):
        spec = load_spec(where)
        assert spec.model.checkpoint is None or spec.model.checkpoint.is_file()
        if spec.data.path is not None:
            assert spec.data.path.is_file()
    else:
        page, block = where
        parse_spec(block, path=tmp_path / f"{page.stem}.yaml")


@pytest.mark.slow
def test_the_digits32_example_passes_its_own_gate(tmp_path):
    done = shell(
        f"inferlink-audit run {EXAMPLES / 'digits32.yaml'} --out {tmp_path / 'out'}", tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict: PASS" in done.stdout


# --------------------------------------------------------------------------- tutorial
# The tutorial's commands that fail the gate on purpose (exit status 1).
FAILING_STEPS = {
    "inferlink-audit run audit.yaml --out report": 1,
    "pytest --inferlink-audit audit.yaml -k min_clean_accuracy": 1,
}


# Output lines that depend on the sweeps, which this test shortens: the label table and the
# count of per-filter checks.
SWEEP_DEPENDENT = re.compile(r"^(layer\s|\S+\s+[FrA]/[FrA]|labels clean/|checks: \d+ passed)")


def tutorial_steps() -> list[str]:
    return code_blocks(TUTORIAL, "bash")


def shown_output(step: int) -> list[str]:
    """The lines the page shows after command block ``step`` (its ```text block)."""
    text = TUTORIAL.read_text(encoding="utf-8")
    blocks = re.findall(r"```(bash|text)\n(.*?)```", text, re.S)
    outputs: list[list[str]] = []
    for kind, body in blocks:
        if kind == "bash":
            outputs.append([])
        elif outputs:
            outputs[-1] += [line.strip() for line in body.splitlines() if line.strip()]
    return outputs[step]


@pytest.mark.slow
def test_the_tutorial_runs_as_written_and_prints_what_it_shows(tmp_path):
    """Each bash block runs in order, in one folder; between them the test makes the edits the
    page asks for (the limits, then the better checkpoint). To keep the suite fast the
    spec's sweeps are cut to low-pass at 5 thresholds after init, so the label table the page
    shows (``SWEEP_DEPENDENT`` lines) is not compared; every other line it shows is."""
    (tmp_path / "example_audits").symlink_to(EXAMPLES)
    cwd = tmp_path
    limits = next(b for b in code_blocks(TUTORIAL, "yaml") if b.startswith("checks:"))
    for step, block in enumerate(tutorial_steps()):
        spec_file = cwd / "audit.yaml"
        if "inferlink-audit run" in block and "report_v2" in block:
            text = spec_file.read_text()
            spec_file.write_text(text.replace("my_model.safetensors", "my_model_v2.safetensors"))
        # The block's exit status is its last command's; the folder it ends in is kept.
        done = shell(f"{block}\nstatus=$?; pwd > {tmp_path / '.cwd'}; exit $status", cwd)
        output = done.stdout + done.stderr
        cwd = Path((tmp_path / ".cwd").read_text().strip())
        expected_rc = FAILING_STEPS.get(commands(block)[-1], 0)
        assert done.returncode == expected_rc, f"{block}\n{output}"
        for line in shown_output(step):
            if "…" in line or SWEEP_DEPENDENT.match(line):  # … marks what varies
                continue
            assert line in output, f"the page shows {line!r} after\n{block}\nbut got\n{output}"
        if "inferlink-audit init" in block:
            text = spec_file.read_text()
            text = text[: text.index("checks:")] + limits
            text = text.replace("thresholds: 25", "thresholds: 5")
            text = text.replace("filters: [low_pass, high_pass, pulse]", "filters: [low_pass]")
            spec_file.write_text(text)
