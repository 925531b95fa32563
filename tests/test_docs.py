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
import torch
import yaml

from inferlink_audit.audit import AuditSession, run_audit
from inferlink_audit.devices import bf16_unsupported_reason
from inferlink_audit.spec import AuditSpec
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


def test_the_tutorials_python_snippet_writes_files_an_audit_reads(tmp_path):
    """The snippet saves a model and a test set; a spec pointing at them measures the model's
    own accuracy on that test set."""
    snippet = code_blocks(TUTORIAL, "python")[0]
    (tmp_path / "models.py").write_text(
        "from torch import nn\n\n\n"
        "def Net():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))\n"
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x_test = torch.rand(20, 3, 2, 2)
    y_test = torch.randint(0, 3, (20,))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(snippet, {"model": model, "x_test": x_test, "y_test": y_test})
    finally:
        os.chdir(cwd)
    spec = {
        "version": 1,
        "name": "mine",
        "model": {"factory": "models.py:Net", "checkpoint": "my_model.safetensors"},
        "data": {"source": "tensors", "path": "my_test.pt"},
        "device": "cpu",
    }
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(spec))
    with torch.no_grad():
        expected = float((model(x_test).argmax(1) == y_test).float().mean())
    assert AuditSession(load_spec(path)).clean_accuracy() == pytest.approx(expected)


def test_the_tutorials_fixes_are_edits_that_make_a_valid_spec(tmp_path):
    """Section 6's inline edits (a training split, remediation, an excluded layer with its
    reason) applied to the ShuffleNet spec validate, and digits32.py has the flag that writes
    the training split (read from its source: importing it would pin torch's CPU kernels)."""
    fixes = TUTORIAL.read_text(encoding="utf-8").split("## 6. Fix it", 1)[1]
    found = re.findall(r"`((train|remediation|exclude): [^`]+)`", fixes)
    snippets = {key: snippet for snippet, key in found}
    assert set(snippets) == {"train", "remediation", "exclude"}, found
    text = (EXAMPLES / "digits32.yaml").read_text(encoding="utf-8")
    text = text.replace("\ndata:\n", f"\ndata:\n  {snippets['train']}\n", 1)
    text = text.replace("\n  layers:\n", f"\n  layers:\n    {snippets['exclude']}\n", 1)
    text += f"{snippets['remediation']}\n"
    loaded = parse_spec(text, path=tmp_path / "audit.yaml")
    assert loaded.remediation is not None
    assert loaded.data.train is not None and loaded.data.train.path == tmp_path / "my_train.pt"
    assert loaded.filtering.layers.exclude == ["conv1.0"]
    flag = re.search(r"`digits32\.py (--[a-z-]+) my_train\.pt`", " ".join(fixes.split()))
    assert flag is not None
    source = (EXAMPLES / "digits32.py").read_text(encoding="utf-8")
    assert f'add_argument("{flag.group(1)}"' in source


# --------------------------------------------------------------------------- numbers, links, names
def readme_prose() -> str:
    """The README's text with line breaks as spaces (numbers quoted across lines)."""
    return " ".join(README.read_text(encoding="utf-8").split())


def digits_spec(replace: str = "", by: str = "") -> AuditSpec:
    """example_audits/digits.yaml (what ``make demo`` audits), with one piece of its text
    replaced, loaded from its own folder."""
    text = (EXAMPLES / "digits.yaml").read_text(encoding="utf-8")
    assert text.count(replace) == 1 or not replace, replace
    return parse_spec(text.replace(replace, by, 1), path=EXAMPLES / "digits.yaml")


# The README's names for the attacks it quotes on digits, as spec entries.
README_ATTACKS = {
    "FGSM": {"fgsm": {"eps": 0.1}},
    "PGD-100": {"pgd": {"eps": 0.1, "steps": 100}},
    "APGD-CE": {"apgd": {"eps": 0.1}},
    "APGD-T": {"apgd": {"eps": 0.1, "loss": "dlr", "targeted": True}},
    "Square": {"square": {"eps": 0.1}},
    "AutoAttack fast": {"autoattack": {"eps": 0.1, "version": "fast"}},
    "standard": {"autoattack": {"eps": 0.1}},
}


@pytest.mark.slow
def test_the_readme_attack_accuracies_on_digits_are_what_the_audit_measures():
    quoted = re.search(
        r"On the bundled digits model at L∞ ε = 0\.1 \(360 images, clean ([\d.]+) %\): (.*?);",
        readme_prose(),
    )
    assert quoted is not None
    numbers = dict(re.findall(r"([\w -]+?) ([\d.]+) %", quoted.group(2)))
    numbers = {name.strip(", "): float(value) for name, value in numbers.items()}
    assert set(numbers) == set(README_ATTACKS)
    attacks = yaml.safe_dump(list(README_ATTACKS.values()), default_flow_style=None)
    spec = digits_spec("attacks:\n  - fgsm: {eps: 0.1}\n", f"attacks:\n{attacks}")
    session = AuditSession(spec, device="cpu")
    assert float(quoted.group(1)) == round(100 * session.clean_accuracy(), 1)
    measured = {
        name: round(100 * session.attack_result(attack.id).accuracy, 1)
        for name, attack in zip(README_ATTACKS, spec.attack_specs, strict=True)
    }
    assert measured == numbers


@pytest.mark.slow
def test_the_readme_sequential_example_stops_where_it_says():
    quoted = re.search(
        r"on the bundled digits example \(360 images, rounds of (\d+)\) (\d+) of its (\d+) "
        r"sweeps stop early \(on (\d+) to (\d+) images\) and the FGSM accuracy is decided on "
        r"(\d+), but the ([\w -]+) fragile-fraction checks stay uncertain",
        readme_prose(),
    )
    assert quoted is not None
    rounds, early, total, fewest, most, fgsm = (int(n) for n in quoted.groups()[:6])
    uncertain = {name.replace("-", "_") for name in quoted.group(7).split(" and ")}
    spec = digits_spec(
        "  resamples: 1000\n", f"  resamples: 1000\n  sequential: {{round: {rounds}}}\n"
    )
    result, _, _ = run_audit(spec, device="cpu")
    model = result.models[0]
    stopped = [
        s.sequential.examples for s in model.sweeps if s.sequential and s.sequential.stopped_early
    ]
    assert (len(stopped), len(model.sweeps)) == (early, total)
    assert (min(stopped), max(stopped)) == (fewest, most)
    assert all(
        s.sequential.decided for s in model.sweeps if s.sequential and s.sequential.stopped_early
    )
    assert model.statistics is not None
    assert model.statistics["sequential"]["examples"]["fgsm_eps0.1"] == fgsm
    assert {
        c.id.split("-")[0]
        for c in model.checks
        if c.check == "max_fragile_fraction" and c.certain is False
    } == uncertain


def test_the_readme_unit_semantics_shares_are_the_digits_models():
    quoted = re.search(
        r"\(360 test images, (\d+) units, (\d+) directions, k = (\d+)\), the share of a row in its "
        r"most common class is (.*?)\. ",
        readme_prose(),
    )
    assert quoted is not None
    units, directions, k = (int(n) for n in quoted.groups()[:3])
    shares = re.findall(
        r"([\d.]+) %(?: for units)? and ([\d.]+) %(?: for directions)? at `(\w+)`", quoted.group(4)
    )
    assert len(shares) == 3, quoted.group(4)
    for unit_share, direction_share, layer in shares:
        options = f"layer: {layer}, units: {units}, directions: {directions}, k: {k}"
        analysis = f"analysis:\n  units: {{{options}}}\n"
        spec = digits_spec("statistics:", f"{analysis}statistics:")
        result = AuditSession(spec, device="cpu").unit_semantics()
        assert result is not None
        mean = {
            kind: round(100 * sum(r.majority_share or 0.0 for r in rows) / len(rows), 1)
            for kind, rows in (("units", result.units), ("directions", result.directions))
        }
        assert mean == {"units": float(unit_share), "directions": float(direction_share)}, layer


# Top-level folders and files of this repository that the docs name as paths.
REPOSITORY_PATHS = re.compile(
    r"(?:benchmarks|docs|example_audits|inferlink_audit|pytest_plugin|templates|tests)/[\w./-]*"
    r"|constraints[\w-]*\.txt|Makefile|CHANGELOG\.md|pyproject\.toml"
)


def user_pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", user_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_repository_path_a_page_names_exists(page):
    text = page.read_text(encoding="utf-8")
    missing = [
        target
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text)
        if "://" not in target and not (page.parent / target).exists()
    ]
    for quoted in re.findall(r"`([^`\n]+)`", text):
        for path in REPOSITORY_PATHS.findall(quoted):
            if not any(c in path for c in "<*…") and not (ROOT / path.rstrip(".")).exists():
                missing.append(path)
    assert missing == []


def test_the_readme_layout_names_every_library_module():
    layout = README.read_text(encoding="utf-8").split("## Layout", 1)[1]
    library = layout.split("inferlink_audit/", 1)[1].split("pytest_plugin/", 1)[0]
    named = set(re.findall(r"[a-z_]+", library.split(":", 1)[1]))
    modules = {p.stem for p in (ROOT / "inferlink_audit").glob("*.py")} - {"__init__", "__main__"}
    assert modules - named == set(), "modules the README's layout does not name"
    assert named - modules == set(), "names in the README's layout that are not modules"


# Options the docs give to other tools.
OTHER_TOOLS_OPTIONS = {
    "--junitxml",  # pytest's other spelling of --junit-xml (its --help shows one)
    "--no-deps",  # pip
    "--nproc-per-node",  # torchrun
    "--schemafile",  # check-jsonschema
}


def test_every_option_the_docs_name_exists():
    """Each ``--option`` on a user page is one of the command line's, pytest's (the plugin's
    included), digits32.py's (the tutorial's), a benchmark's or another tool's listed above."""
    from inferlink_audit.cli import _parser

    parser = _parser()
    known = set(OTHER_TOOLS_OPTIONS)
    for action in parser._actions:
        known.update(action.option_strings)
        for sub in getattr(action, "choices", None) or {}:
            known.update(o for a in action.choices[sub]._actions for o in a.option_strings)
    pytest_help = shell("pytest --help", ROOT)  # pytest's own options and the plugin's
    known.update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", pytest_help.stdout))
    for script in [EXAMPLES / "digits32.py", *(ROOT / "benchmarks").glob("*.py")]:
        known.update(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', script.read_text()))
    named = {
        option
        for page in user_pages()
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", page.read_text(encoding="utf-8"))
    }
    assert named - known == set()


def test_the_readme_names_every_attack_failure_indicator_with_its_limit():
    from inferlink_audit.checks import SANITY_LIMITS

    section = readme_prose().split("**Attack-failure indicators**", 1)[1].split("The report's")[0]
    quoted = re.findall(r"`(\w+)` \([^`]*?(?:limit |≤ )([\d.]+)[):;]", section)
    assert {name: float(limit) for name, limit in quoted} == SANITY_LIMITS


def test_every_command_line_argument_says_what_it_is_in_help():
    """``inferlink-audit <command> --help`` is documentation too: no bare argument names."""
    from inferlink_audit.cli import _parser

    commands = next(a for a in _parser()._actions if a.choices).choices
    bare = [
        f"{name} {action.dest}"
        for name, command in commands.items()
        for action in command._actions
        if not action.help
    ]
    assert bare == []


def test_the_versions_the_readme_quotes_are_the_pinned_and_declared_ones():
    import tomllib

    prose = readme_prose()

    def pins(name: str) -> dict[str, str]:
        text = (ROOT / name).read_text(encoding="utf-8")
        return dict(re.findall(r"^([\w-]+)=+([\w.+]+)", text, re.M))

    tested = re.search(r"`constraints\.txt` \(torch ([\d.]+), torchvision ([\d.]+)", prose)
    oldest = re.search(r"oldest torch declared: ([\d.]+), torchvision ([\d.]+)", prose)
    xla = re.search(r"torch_xla ([\d.]+) needs torch ([\d.]+)", prose)
    assert tested and oldest and xla
    assert tested.groups() == (
        pins("constraints.txt")["torch"],
        pins("constraints.txt")["torchvision"],
    )
    old = pins("constraints-oldest.txt")
    assert oldest.groups() == (old["torch"], old["torchvision"])
    assert xla.groups() == (
        pins("constraints-xla.txt")["torch_xla"],
        pins("constraints-xla.txt")["torch"],
    )
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("torch", "torchvision"):
        requirement = f"{name}>={'.'.join(old[name].split('.')[:2])}"  # 2.13.0: torch>=2.13
        assert requirement in declared and f"`{requirement}`" in prose


def test_a_make_user_is_told_to_activate_the_environment_the_commands_run_in():
    """After ``make demo``, ``inferlink-audit``, ``pytest`` and ``python`` are the installed
    ones only inside the Makefile's virtual environment: both pages say how to enter it."""
    venv = re.search(r"^VENV\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert venv is not None
    for page in (README, TUTORIAL):
        assert f"`. {venv.group(1)}/bin/activate`" in page.read_text(encoding="utf-8"), page


def test_every_report_section_a_page_names_is_a_heading_of_the_report():
    headings = set()
    for template in (ROOT / "templates").glob("*.j2"):
        found = re.findall(r"<h[23][^>]*>([^<{]+)", template.read_text(encoding="utf-8"))
        headings.update(h.strip() for h in found)
    named = {
        name
        for page in user_pages()
        for name in re.findall(r"\*([^*]+)\* (?:section|table)", " ".join(page.read_text().split()))
    }
    assert named, "no report section named: the pattern no longer matches the pages"
    assert named - headings == set()


def test_every_snake_case_name_a_page_quotes_exists_in_the_code():
    """A key, field, check or function name quoted on a user page (``examples_count``,
    ``prefix_cache_mb``, ``stopped_early``) is a name in the package, the plugin or the
    report's templates: renaming one there without the docs fails here."""
    import torchvision

    source = " ".join(
        path.read_text(encoding="utf-8")
        for folder in ("inferlink_audit", "pytest_plugin", "templates")
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".j2")
    )
    known = set(re.findall(r"\w+", source)) | set(dir(torchvision.models))
    unknown = [
        f"{page.name}: {name}"
        for page in user_pages()
        for quoted in re.findall(r"`([^`\n]+)`", page.read_text(encoding="utf-8"))
        for name in re.findall(r"(?<![\w./-])([a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?![\w/.-])", quoted)
        if name not in known
    ]
    assert unknown == []


@pytest.mark.slow
@pytest.mark.skipif(
    bf16_unsupported_reason(torch.device("cpu")) is not None,
    reason="this CPU has no native bf16 (AMX or AVX-512 BF16)",
)
def test_the_bf16_calibration_method_md_quotes_is_the_digits_examples():
    """§10's numbers on digits: the sampled variants, their largest difference, the margin d
    and the sweeps confirmed (the labels against exact fp32 are tests/test_precision.py's)."""
    quoted = re.search(
        r"On the digits example \(360 images, all three filters, 25 thresholds\) the (\d+) "
        r"sampled variants differed by at most (\d+)/360, so d = (\d+)/360;.*? (\d+) of (\d+) "
        r"sweeps were confirmed",
        " ".join((ROOT / "docs" / "method.md").read_text(encoding="utf-8").split()),
    )
    assert quoted is not None
    variants, largest, margin, confirmed, sweeps = (int(n) for n in quoted.groups())
    spec = digits_spec("statistics:", "compute: {precision: bf16}\nstatistics:")
    result, _, _ = run_audit(spec, device="cpu")
    compute = result.models[0].compute
    assert compute is not None
    calibration = compute["calibration"]
    assert calibration["variants"] == variants
    assert round(360 * calibration["max_abs_accuracy_difference"]) == largest
    assert round(360 * calibration["accuracy_margin"]) == margin
    assert (compute["confirmed"], len(compute["sweeps"])) == (confirmed, sweeps)
