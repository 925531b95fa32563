"""The pytest plugin, end to end: real pytest sessions (pytester) on the bundled digits model.

Every spec here is small (64 examples, 5 thresholds, two layers) so a session takes seconds;
most sessions run in-process, where torch is already imported, and only what needs its own
interpreter (``--help`` without torch, ``-n 2``) runs in a subprocess.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pytest_inferlink.plugin import (
    INI_AUDIT,
    INI_DEVICE,
    INI_REPORT,
    OPTION_AUDIT,
    OPTION_DEVICE,
    OPTION_REPORT,
)
from pytest_inferlink.runner import STEP_SUMMARY_ENV
from scipy.integrate import simpson

from .specs import RUN_DEPENDENT_META

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
FACTORY = f"{ROOT / 'example_audits' / 'digits.py'}:DigitsCNN"
CHECKPOINT = ROOT / "example_audits" / "digits_cnn.safetensors"

# Measured on the digits model: FGSM at eps 0.3 leaves ~3% accuracy (so 0.99 fails); both
# filters label fc1 (8192 of the 9344 analysed weights) fragile on clean data (so a clean
# fragile fraction of at most 0.5 fails) and find no layer targeted (so max 0 passes).
CHECKS = {
    "min_clean_accuracy": "0.5",
    "min_adversarial_accuracy": "0.99",
    "max_fragile_fraction": "{value: 0.5, on: clean}",
    "max_targeted_layers": "0",
}
IDS = [
    "min_clean_accuracy",
    "fgsm_eps0.3-min_adversarial_accuracy",
    "low_pass-fgsm_eps0.3-max_fragile_fraction",
    "low_pass-fgsm_eps0.3-max_targeted_layers",
    "pulse-fgsm_eps0.3-max_fragile_fraction",
    "pulse-fgsm_eps0.3-max_targeted_layers",
]


def spec_text(
    name: str = "tiny",
    *,
    checks: dict[str, str] | None = None,
    filters: str = "[low_pass, pulse]",
    extra: str = "",
) -> str:
    checks = CHECKS if checks is None else checks
    check_lines = "".join(f"  {key}: {value}\n" for key, value in checks.items())
    return (
        textwrap.dedent(
            f"""\
            version: 1
            name: {name}
            model:
              factory: {FACTORY}
              kwargs: {{num_classes: 10}}
              checkpoint: {CHECKPOINT}
            data: {{source: sklearn_digits, limit: 64, batch_size: 64,
                   normalize: {{mean: [0.5], std: [0.5]}}}}
            filtering:
              thresholds: 5
              scopes: [local]
              filters: {filters}
              layers: {{include: [conv2, fc1]}}
              adversarial_source: original
            attacks:
              - fgsm: {{eps: 0.3}}
            """
        )
        + extra
        + ("checks:\n" + check_lines if checks else "")
    )


def line_of(text: str, key: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.strip().startswith(key))


def comparable(path: Path) -> dict[str, Any]:
    """results.json without its timing fields, which are all a re-run may change."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in RUN_DEPENDENT_META:
        data["meta"].pop(key, None)
    return data


def section(output: str) -> list[str]:
    """The plugin's terminal section, from its header to the next one."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^=+ inferlink-audit =+$", line))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("=")), len(lines))
    return lines[start + 1 : end]


@pytest.fixture(scope="module", autouse=True)
def _import_everything_once(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Take a tiny audit through the plugin's path once, so its every import is loaded here.

    pytester's in-process runs undo the imports they made, and the C extensions of numpy,
    torch and matplotlib cannot be loaded twice in one process; imported before the first
    run, they stay. It is also what makes in-process runs fast: torch is imported once.
    """
    from inferlink_audit.audit import AuditSession
    from inferlink_audit.report import render_report
    from inferlink_audit.spec_loader import load_spec

    from .plugin_items import assembled_from_items

    folder = tmp_path_factory.mktemp("warm")
    path = folder / "warm.yaml"
    path.write_text(
        spec_text(checks={}, filters="[pulse]").replace("thresholds: 5", "thresholds: 3")
    )
    spec = load_spec(path)
    session = AuditSession(spec)
    result = assembled_from_items(session, session_id="warm")
    render_report(result, folder)


@pytest.fixture(autouse=True)
def _quiet_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs inside CI must not write to the real step summary or change the output format."""
    for name in (STEP_SUMMARY_ENV, "CI", "BUILD_NUMBER", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def spec(pytester: pytest.Pytester) -> Path:
    return pytester.makefile(".yaml", spec=spec_text())


# --------------------------------------------------------------------------- options, collection
def test_help_lists_the_options_and_imports_no_torch(pytester: pytest.Pytester) -> None:
    code = (
        "import sys\n"
        "import pytest_inferlink.plugin\n"
        "print('after import:', 'torch' in sys.modules, 'inferlink_audit.audit' in sys.modules)\n"
        "import pytest\n"
        "pytest.main(['--help'])\n"
        "print('after --help:', 'torch' in sys.modules)\n"
    )
    result = pytester.run(sys.executable, "-c", code)
    assert result.ret == 0
    out = result.stdout.str()
    assert "after import: False False" in out
    assert "after --help: False" in out
    for name in (OPTION_AUDIT, OPTION_REPORT, OPTION_DEVICE, INI_AUDIT):
        assert name in out


def test_collects_one_item_per_check_with_readable_ids(
    pytester: pytest.Pytester, spec: Path
) -> None:
    pytester.makepyfile(test_other="def test_other(): pass")
    result = pytester.runpytest(OPTION_AUDIT, str(spec), "--collect-only", "-q")
    # The audit is the whole run: test_other.py is not collected without a positional path.
    result.stdout.fnmatch_lines([f"spec.yaml::tiny[{id_}]" for id_ in IDS] + ["6 tests collected*"])
    assert "test_other" not in result.stdout.str()

    result = pytester.runpytest("test_other.py", OPTION_AUDIT, "spec.yaml", "--collect-only", "-q")
    result.stdout.fnmatch_lines(
        ["test_other.py::test_other", "spec.yaml::tiny[*", "7 tests collected*"]
    )

    result = pytester.runpytest(OPTION_AUDIT, "spec.yaml", "--collect-only", "-q", "-k", "pulse")
    result.stdout.fnmatch_lines(
        [f"spec.yaml::tiny[{id_}]" for id_ in IDS if id_.startswith("pulse")]
        + ["2/6 tests collected (4 deselected)*"]
    )


def test_ini_specs_join_the_normal_run_and_folders_expand(pytester: pytest.Pytester) -> None:
    audits = pytester.mkdir("audits")
    (audits / "b.yaml").write_text(spec_text("second", checks={}, filters="[pulse]"))
    (audits / "a.yml").write_text(spec_text("first", checks={"min_clean_accuracy": "0.5"}))
    (audits / "notes.txt").write_text("not a spec")
    pytester.makeini(f"[pytest]\n{INI_AUDIT} = audits\n")
    pytester.makepyfile(test_other="def test_other(): pass")
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(
        [
            "audits/a.yml::first[min_clean_accuracy]",
            # A spec without checks still audits: one item per filter and attack.
            "audits/b.yaml::second[pulse-fgsm_eps0.3]",
            "test_other.py::test_other",
        ]
    )


def test_a_missing_spec_path_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(OPTION_AUDIT, "nowhere.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{OPTION_AUDIT} nowhere.yaml: no such file or folder*"])


# --------------------------------------------------------------------------- running checks
def test_a_failing_check_says_what_was_measured_and_where(
    pytester: pytest.Pytester, spec: Path
) -> None:
    result = pytester.runpytest(OPTION_AUDIT, str(spec), "-vv")
    result.assert_outcomes(passed=3, failed=3)
    adversarial = line_of(spec.read_text(), "min_adversarial_accuracy")
    fragile = line_of(spec.read_text(), "max_fragile_fraction")
    result.stdout.re_match_lines(
        [
            r"_+ tiny\[fgsm_eps0\.3-min_adversarial_accuracy\] _+",
            rf"spec\.yaml:{adversarial}: fgsm\(eps=0\.3\): "
            r"adversarial accuracy 0\.0\d+ < min 0\.9900",
            r"  check:    min_adversarial_accuracy \(fgsm_eps0\.3-min_adversarial_accuracy\)",
            r"  measured: 0\.0\d+",
            r"  limit:    0\.99",
        ]
    )
    result.stdout.re_match_lines(
        [
            r"_+ tiny\[pulse-fgsm_eps0\.3-max_fragile_fraction\] _+",
            rf"spec\.yaml:{fragile}: pulse fgsm\(eps=0\.3\): "
            r"clean fragile fraction 0\.88 > max 0\.50 \(fc1\)",
            r"  check:    max_fragile_fraction \(pulse-fgsm_eps0\.3-max_fragile_fraction\)",
            r"  measured: 0\.8767",
            r"  limit:    0\.5",
            r"  layers \(scores clean / adversarial / difference.*",
            r"    fc1  -\d\.\d{3} / [+-]\d\.\d{3} / [+-]\d\.\d{3}  fragile / \w+  \(8192 weights\)",
        ]
    )
    # The short summary carries the same first line (the verdict CI logs show).
    result.stdout.re_match_lines(
        [
            r"FAILED spec\.yaml::tiny\[fgsm_eps0\.3-min_adversarial_accuracy\] - "
            rf"spec\.yaml:{adversarial}: fgsm\(eps=0\.3\): adversarial accuracy .*"
        ]
    )
    assert "Traceback" not in result.stdout.str()
    assert "items.py" not in result.stdout.str()

    # pytest's cache knows the failed items again: --lf re-runs just those.
    rerun = pytester.runpytest(OPTION_AUDIT, str(spec), "--lf")
    rerun.assert_outcomes(failed=3, deselected=3)


def test_k_selects_items_and_the_report_holds_what_they_measured(
    pytester: pytest.Pytester, spec: Path
) -> None:
    result = pytester.runpytest(OPTION_AUDIT, str(spec), "-k", "low_pass and targeted")
    result.assert_outcomes(passed=1, deselected=5)
    data = json.loads((pytester.path / "inferlink-report" / "results.json").read_text())
    (model,) = data["models"]
    assert [c["id"] for c in model["checks"]] == ["low_pass-fgsm_eps0.3-max_targeted_layers"]
    assert {s["filter"] for s in model["sweeps"]} == {"low_pass"}
    assert [s["layer"] for s in model["sweeps"]] == ["conv2", "fc1"]  # model order
    assert data["meta"]["device"].startswith("cpu")


def test_junit_xml_carries_the_numbers_as_properties(pytester: pytest.Pytester, spec: Path) -> None:
    args = ("--junitxml=junit.xml", "-k", "low_pass and (fragile or targeted)")
    pytester.runpytest(OPTION_AUDIT, str(spec), *args)
    root = ET.parse(pytester.path / "junit.xml").getroot()
    cases = {case.get("name"): case for case in root.iter("testcase")}
    failing = cases["tiny[low_pass-fgsm_eps0.3-max_fragile_fraction]"]
    props = {p.get("name"): p.get("value") for p in failing.iter("property")}
    assert props["check"] == "low_pass-fgsm_eps0.3-max_fragile_fraction"
    assert (props["limit"], props["passed"]) == ("0.5", "False")
    assert float(props["measured"]) == pytest.approx(8192 / (8192 + 1152))
    # fc1's three scores, by scipy's Simpson rule on the curves the run's results.json holds:
    # r = ψ/ψ⁰ against b = 1 − ρ, φΔ = ∫(ra − rc).
    data = json.loads((pytester.path / "inferlink-report" / "results.json").read_text())
    (model,) = data["models"]
    (fc1,) = [s for s in model["sweeps"] if s["layer"] == "fc1" and s["filter"] == "low_pass"]
    rc = np.array(fc1["clean_accuracy"]) / model["clean_accuracy"]
    ra = np.array(fc1["adversarial_accuracy"]) / model["attacks"][0]["accuracy"]
    alpha = np.linspace(0.0, 1.0, len(rc))
    base = 1.0 - np.array(fc1["removed_fraction"])
    by_hand = {
        "clean": simpson(rc - base, x=alpha),
        "adversarial": simpson(ra - base, x=alpha),
        "difference": simpson(ra - rc, x=alpha),
    }
    assert by_hand["clean"] < -0.05  # fragile: φc < -τ
    for response, value in by_hand.items():
        assert float(props[f"score:fc1:{response}"]) == pytest.approx(value, abs=1e-6), response
    assert not any(name.startswith("score:conv2") for name in props)  # conv2 is not fragile
    failure = failing.find("failure")
    assert failure is not None
    assert failure.get("message", "").startswith("spec.yaml:")
    assert "clean fragile fraction 0.88 > max 0.50 (fc1)" in failure.get("message", "")
    passing = cases["tiny[low_pass-fgsm_eps0.3-max_targeted_layers]"]
    props = {p.get("name"): p.get("value") for p in passing.iter("property")}
    assert (props["measured"], props["passed"]) == ("0.0", "True")
    assert not any(name.startswith("score:") for name in props)


def test_step_summary_is_appended_with_a_verdict_per_check(
    pytester: pytest.Pytester, spec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = pytester.path / "step_summary.md"
    summary.write_text("output of an earlier step\n")
    monkeypatch.setenv(STEP_SUMMARY_ENV, str(summary))
    pytester.runpytest(OPTION_AUDIT, str(spec), "-k", "adversarial_accuracy or targeted")
    text = summary.read_text()
    assert text.startswith("output of an earlier step\n")
    assert "## inferlink-audit: FAIL" in text
    assert "| check | verdict | measured | limit | detail |" in text
    assert re.search(
        r"\| `fgsm_eps0\.3-min_adversarial_accuracy` \| ❌ fail \| 0\.0\d+ \| 0\.99 \|", text
    )
    assert "| `low_pass-fgsm_eps0.3-max_targeted_layers` | ✅ pass | 0 | 0 |" in text
    assert "Worst layers" in text
    report = pytester.path / "inferlink-report" / "report.html"
    assert f"Report: `{report}`" in text


def test_report_files_are_written_and_a_rerun_takes_sweeps_from_the_cache(
    pytester: pytest.Pytester, spec: Path
) -> None:
    first = pytester.runpytest(OPTION_AUDIT, str(spec), OPTION_REPORT, "out", "-k", "targeted")
    first.assert_outcomes(passed=2)
    lines = section(first.stdout.str())
    assert lines[0] == "tiny (spec.yaml): PASS: 2 passed, 0 failed; 2 sweeps computed, 0 from cache"
    report = pytester.path / "out" / "report.html"
    assert lines[-1] == f"report: {report}"
    assert report.read_text().lstrip().lower().startswith("<!doctype html")
    before = comparable(pytester.path / "out" / "results.json")
    assert before["models"][0]["checks"][0]["id"] == "low_pass-fgsm_eps0.3-max_targeted_layers"

    second = pytester.runpytest(OPTION_AUDIT, str(spec), OPTION_REPORT, "out", "-k", "targeted")
    second.assert_outcomes(passed=2)
    assert "0 sweeps computed, 2 from cache" in section(second.stdout.str())[0]
    assert comparable(pytester.path / "out" / "results.json") == before


def test_a_corrupt_cache_entry_is_recomputed_not_trusted(
    pytester: pytest.Pytester, spec: Path
) -> None:
    args = (OPTION_AUDIT, str(spec), "-k", "targeted")
    pytester.runpytest(*args).assert_outcomes(passed=2)
    before = comparable(pytester.path / "inferlink-report" / "results.json")
    entries = sorted((pytester.path / ".pytest_cache" / "d" / "inferlink-audit").glob("*.json"))
    assert len(entries) == 2
    entry = json.loads(entries[0].read_text())
    entry["payload"] = entry["payload"].replace('"numel":', '"numel":1', 1)  # checksum now wrong
    entries[0].write_text(json.dumps(entry))

    again = pytester.runpytest(*args)
    again.assert_outcomes(passed=2)
    assert "1 sweeps computed, 1 from cache" in section(again.stdout.str())[0]
    assert comparable(pytester.path / "inferlink-report" / "results.json") == before
    assert json.loads(entries[0].read_text())["payload"] != entry["payload"]  # rewritten


# --------------------------------------------------------------------------- errors
def test_spec_and_model_errors_name_the_problem_without_a_traceback(
    pytester: pytest.Pytester,
) -> None:
    audits = pytester.mkdir("audits")
    typo = spec_text("typo").replace("thresholds: 5", "threshold: 5")
    (audits / "a_typo.yaml").write_text(typo)
    wrong = spec_text("wrong", checks={"min_clean_accuracy": "0.5"})
    (audits / "b_wrong.yaml").write_text(wrong.replace("num_classes: 10", "num_classes: 7"))
    (audits / "c_good.yaml").write_text(spec_text("good", checks={"min_clean_accuracy": "0.5"}))

    result = pytester.runpytest(OPTION_AUDIT, "audits", "--continue-on-collection-errors")
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting audits/a_typo.yaml*",
            f"*a_typo.yaml:{line_of(typo, 'threshold')}: "
            "filtering.threshold: unknown key*thresholds*",
        ]
    )
    result.stdout.fnmatch_lines(["*_ wrong[[]min_clean_accuracy[]] _*", "*does not fit the model*"])
    assert "Traceback" not in result.stdout.str()
    lines = section(result.stdout.str())
    assert "wrong (b_wrong.yaml): FAIL: 0 passed, 0 failed, 1 errors" in lines[0]
    assert lines[1].startswith("good (c_good.yaml): PASS")
    assert lines[2].startswith("audits/a_typo.yaml: not collected:")
    # The report still gets written, with what could be measured.
    data = json.loads((pytester.path / "inferlink-report" / "results.json").read_text())
    assert [m["name"] for m in data["models"]] == ["good"]

    # By pytest's rules a collection error stops the run before any item does.
    result = pytester.runpytest(OPTION_AUDIT, "audits")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*Interrupted: 1 error during collection*"])


# --------------------------------------------------------------------------- xdist
def test_xdist_gives_the_same_results_and_computes_each_sweep_once(
    pytester: pytest.Pytester, spec: Path
) -> None:
    pytest.importorskip("xdist")
    common = (OPTION_AUDIT, str(spec), "-p", "no:cacheprovider")
    serial = pytester.runpytest(*common, OPTION_REPORT, "serial")
    serial.assert_outcomes(passed=3, failed=3)
    # Without pytest's cache there is no disk cache either, and nothing breaks.
    assert "2 sweeps computed, 0 from cache" in section(serial.stdout.str())[0]
    assert not (pytester.path / ".pytest_cache").exists()
    parallel = pytester.runpytest_subprocess(*common, OPTION_REPORT, "parallel", "-n", "2")
    parallel.assert_outcomes(passed=3, failed=3)
    # Two sweeps (low_pass, pulse) of two items each: a split group would compute one twice.
    assert "2 sweeps computed, 0 from cache" in section(parallel.stdout.str())[0]
    assert comparable(pytester.path / "parallel" / "results.json") == comparable(
        pytester.path / "serial" / "results.json"
    )
    assert (pytester.path / "parallel" / "report.html").is_file()


def test_xdist_worker_n_runs_on_gpu_n_mod_count(pytester: pytest.Pytester, spec: Path) -> None:
    """Two simulated GPUs (the device-count seam, set in every worker by a conftest): the items
    worker gwN ran asked for cuda:(N mod 2). On this CPU-only machine they fail to open it, and
    the error names the worker and the GPU it was given."""
    pytest.importorskip("xdist")
    import torch

    if torch.cuda.is_available():
        pytest.skip("simulates GPUs on a machine without CUDA")
    pytester.makeconftest(
        "import inferlink_audit.devices as devices\ndevices.cuda_device_count = lambda: 2\n"
    )
    result = pytester.runpytest_subprocess(
        OPTION_AUDIT, str(spec), "-p", "no:cacheprovider", "-n", "2", "-vv", "-rf"
    )
    result.assert_outcomes(failed=6)
    output = result.stdout.str()
    ran_on = dict(
        (nodeid, int(worker))
        for worker, nodeid in re.findall(r"^\[gw(\d+)\] \[\s*\d+%\] FAILED (\S+)", output, re.M)
    )
    asked = dict(
        (nodeid, (int(worker), int(gpu)))
        for nodeid, worker, gpu in re.findall(
            r"^FAILED (\S+) - .*device 'auto' on parallel worker (\d+) is cuda:(\d+): ",
            output,
            re.M,
        )
    )
    assert len(ran_on) == 6 and set(ran_on.values()) == {0, 1}  # both workers ran sweeps
    assert asked == {nodeid: (worker, worker % 2) for nodeid, worker in ran_on.items()}


# --------------------------------------------------------------------------- compare, remediation
def test_compare_and_remediation_reach_the_report(pytester: pytest.Pytester) -> None:
    """compare: the compared spec is audited as a spec of its own and the controller adds label
    consistency and the transfer matrix; remediation writes its checkpoint in the report dir."""
    other = pytester.makefile(".yaml", other=spec_text("other", checks={}, filters="[pulse]"))
    remediation = textwrap.dedent(
        """\
        remediation:
          selective_retrain: {epochs: 1, response: clean}
        compare: [other.yaml]
        """
    )
    main = spec_text(
        "main", checks={"min_clean_accuracy": "0.5"}, filters="[pulse]", extra=remediation
    )
    main = main.replace(
        "normalize: {mean: [0.5], std: [0.5]}}",
        "normalize: {mean: [0.5], std: [0.5]}, "
        "train: {source: sklearn_digits, split: train, limit: 128}}",
    )
    spec = pytester.makefile(".yaml", main=main)
    result = pytester.runpytest(OPTION_AUDIT, str(spec), OPTION_REPORT, "out", "-q")
    # main: min_clean_accuracy, remediation, transfer; other (no checks): its pulse sweep
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([f"other ({other.name}): PASS*"])
    data = json.loads((pytester.path / "out" / "results.json").read_text())
    assert [m["name"] for m in data["models"]] == ["main", "other"]
    main_model = data["models"][0]
    assert main_model["remediation"]["checkpoint"] == "remediated/main.safetensors"
    assert (pytester.path / "out" / "remediated" / "main.safetensors").is_file()
    assert main_model["lipschitz"]["network_upper_bound"] > 0
    consistency = data["consistency"]
    assert consistency["models"] == ["main", "other"]
    assert consistency["agreement"] == 1.0  # the same checkpoint twice: every label agrees
    assert {(t["source"], t["target"]) for t in consistency["transfer"]} == {
        ("main", "main"),
        ("main", "other"),
        ("other", "other"),
        ("other", "main"),
    }


# --------------------------------------------------------------------------- device and report
# A device that no machine this suite runs on has, so a spec naming it cannot run as written.
MISSING_DEVICE = "cuda:97"


def device_spec(pytester: pytest.Pytester) -> Path:
    return pytester.makefile(".yaml", spec=spec_text(extra=f"device: {MISSING_DEVICE}\n"))


def assert_ran_on_cpu(result: pytest.RunResult, report: Path) -> None:
    result.assert_outcomes(passed=1, deselected=5)
    data = json.loads((report / "results.json").read_text(encoding="utf-8"))
    assert data["meta"]["device"] == "cpu"
    assert data["meta"]["devices"] == ["cpu"]  # every session that ran
    (model,) = data["models"]
    assert [c["id"] for c in model["checks"]] == ["min_clean_accuracy"]


def test_a_spec_whose_device_is_missing_fails_with_the_device_error(
    pytester: pytest.Pytester,
) -> None:
    spec = device_spec(pytester)
    result = pytester.runpytest(OPTION_AUDIT, str(spec), "-k", "min_clean_accuracy")
    result.assert_outcomes(failed=1, deselected=5)
    text = spec.read_text(encoding="utf-8")
    result.stdout.fnmatch_lines(
        [f"{spec}:{line_of(text, 'device:')}: device '{MISSING_DEVICE}': *Use device: cpu*"]
    )


def test_device_option_runs_the_spec_on_that_device_instead_of_the_specs(
    pytester: pytest.Pytester,
) -> None:
    spec = device_spec(pytester)
    result = pytester.runpytest(
        OPTION_AUDIT, str(spec), "-k", "min_clean_accuracy", OPTION_DEVICE, "cpu"
    )
    assert_ran_on_cpu(result, pytester.path / "inferlink-report")


def test_ini_keys_set_the_device_and_the_report_folder(pytester: pytest.Pytester) -> None:
    spec = device_spec(pytester)
    pytester.makeini(
        f"""
        [pytest]
        {INI_DEVICE} = cpu
        {INI_REPORT} = reports/from-ini
        """
    )
    # Run from a subfolder: the ini's report path is relative to the rootdir, not to it.
    (pytester.path / "sub").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(pytester.path / "sub")
        result = pytester.runpytest(OPTION_AUDIT, str(spec), "-k", "min_clean_accuracy")
    assert_ran_on_cpu(result, pytester.path / "reports" / "from-ini")
    assert (pytester.path / "reports" / "from-ini" / "report.html").is_file()
    assert not (pytester.path / "inferlink-report").exists()
    assert not (pytester.path / "sub" / "inferlink-report").exists()


def test_the_device_option_wins_over_the_ini_key(pytester: pytest.Pytester) -> None:
    spec = pytester.makefile(".yaml", spec=spec_text())
    pytester.makeini(f"[pytest]\n{INI_DEVICE} = {MISSING_DEVICE}\n")
    failing = pytester.runpytest(OPTION_AUDIT, str(spec), "-k", "min_clean_accuracy")
    failing.assert_outcomes(failed=1, deselected=5)
    failing.stdout.fnmatch_lines([f"*device '{MISSING_DEVICE}'*"])
    result = pytester.runpytest(
        OPTION_AUDIT, str(spec), "-k", "min_clean_accuracy", OPTION_DEVICE, "cpu"
    )
    assert_ran_on_cpu(result, pytester.path / "inferlink-report")
