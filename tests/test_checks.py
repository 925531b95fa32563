"""Checks on real sweeps of the bundled digits CNN: the regression checks against a released
results.json, the Lipschitz check (measured, failing, unavailable), and the baseline errors.

Every measured value is compared with a computation made here from the results.json files
themselves, so a check that reads the wrong model, sweep or score cannot pass.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pytest_inferlink.plugin import OPTION_AUDIT
from safetensors.torch import load_file, save_file

from inferlink_audit.audit import run_audit
from inferlink_audit.checks import (
    ATTACK_CHECKS,
    EVALUATORS,
    MEASUREMENTS,
    MODEL_CHECKS,
    SANITY_LIMITS,
    SWEEP_CHECKS,
    BaselineError,
)
from inferlink_audit.errors import AuditError
from inferlink_audit.results import AuditResult, CheckResult, SweepResult, write_results
from inferlink_audit.spec import ChecksSpec
from inferlink_audit.spec_loader import load_spec

from .specs import EXAMPLES, digits_spec, write_spec

pytest_plugins = ["pytester"]

FILTER, ATTACK = "low_pass", "fgsm_eps0.1"
FILTERING = {"thresholds": 5, "filters": [FILTER], "scopes": ["local", "global"]}
REGRESSION = {"no_new_fragile_layers": True, "max_score_drop": 0.05}
RELEASED = "released/results.json"


class MemoryCache:
    """Sweeps kept between the audits of one module: the same model is swept once."""

    def __init__(self) -> None:
        self.store: dict[str, list[SweepResult]] = {}

    def get(self, key: str) -> list[SweepResult] | None:
        return self.store.get(key)

    def put(self, key: str, sweeps: list[SweepResult]) -> None:
        self.store[key] = sweeps


@pytest.fixture(scope="module")
def cache() -> MemoryCache:
    return MemoryCache()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checks")


@pytest.fixture(scope="module")
def released(folder: Path, cache: MemoryCache) -> AuditResult:
    """The digits CNN audited once; its results.json is the release the others compare with."""
    spec = load_spec(write_spec(folder, "release.yaml", filtering=FILTERING))
    result, _, _ = run_audit(spec, cache=cache)
    write_results(result, folder / RELEASED)
    return result


def audit(
    folder: Path, cache: MemoryCache, name: str, **overrides: Any
) -> tuple[AuditResult, Path]:
    """Run ``overrides``' spec and write its results.json; returns the result and that file."""
    spec_path = write_spec(folder, f"{name}.yaml", filtering=FILTERING, **overrides)
    result, _, _ = run_audit(load_spec(spec_path), cache=cache)
    return result, write_results(result, folder / f"{name}.json")


def check(result: AuditResult, key: str) -> CheckResult:
    (found,) = [c for c in result.models[0].checks if c.check == key]
    return found


def raw_sweeps(path: Path, name: str = "digits-small") -> dict[tuple[str, str | None], Any]:
    """A model's sweeps of FILTER under ATTACK in a results.json, read as plain JSON."""
    data = json.loads(path.read_text())
    (model,) = [m for m in data["models"] if m["name"] == name]
    return {
        (s["scope"], s["layer"]): s
        for s in model["sweeps"]
        if s["filter"] == FILTER and s["attack"] == ATTACK
    }


def newly_fragile(now: Path, before: Path) -> list[str]:
    old = raw_sweeps(before)
    return [
        f"{s['layer'] or 'global'} ({response})"
        for key, s in raw_sweeps(now).items()
        for response in ("clean", "adversarial")
        if s["labels"][response] == "fragile"
        and (key not in old or old[key]["labels"][response] != "fragile")
    ]


def largest_drop(now: Path, before: Path) -> float:
    old = raw_sweeps(before)
    return max(
        old[key]["scores"][score] - s["scores"][score]
        for key, s in raw_sweeps(now).items()
        if key in old
        for score in ("clean", "adversarial", "difference")
    )


def edited_release(folder: Path, filename: str, edit: Any) -> str:
    """A copy of the release's results.json with ``edit`` applied to its JSON."""
    data = json.loads((folder / RELEASED).read_text())
    edit(data)
    path = folder / "edited" / filename
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


# --------------------------------------------------------------------------- regression checks
def test_the_same_model_against_its_own_release_passes(
    folder: Path, cache: MemoryCache, released: AuditResult
) -> None:
    result, current = audit(folder, cache, "same", checks=REGRESSION, baseline=RELEASED)
    assert newly_fragile(current, folder / RELEASED) == []
    assert largest_drop(current, folder / RELEASED) == 0.0
    fragile, drop = check(result, "no_new_fragile_layers"), check(result, "max_score_drop")
    assert (fragile.passed, fragile.measured, fragile.layers) == (True, 0.0, [])
    assert (drop.passed, drop.measured, drop.layers) == (True, 0.0, [])


def test_a_release_with_better_labels_and_scores_fails_both_checks(
    folder: Path, cache: MemoryCache, released: AuditResult
) -> None:
    def better(data: dict[str, Any]) -> None:
        for index, sweep in enumerate(data["models"][0]["sweeps"]):
            sweep["labels"] = {"clean": "robust", "adversarial": "robust"}
            sweep["scores"]["clean"] += 0.02 * index
            sweep["scores"]["adversarial"] += 0.1 + 0.03 * index
            sweep["scores"]["difference"] -= 0.01

    baseline = edited_release(folder, "better.json", better)
    result, current = audit(folder, cache, "worse", checks=REGRESSION, baseline=baseline)

    expected_layers = newly_fragile(current, Path(baseline))
    assert expected_layers, "the digits CNN has fragile layers under low_pass: the test needs one"
    fragile = check(result, "no_new_fragile_layers")
    assert not fragile.passed
    assert fragile.measured == len(expected_layers)
    assert fragile.layers == expected_layers

    drop = check(result, "max_score_drop")
    expected_drop = largest_drop(current, Path(baseline))
    assert expected_drop > 0.05
    assert not drop.passed
    assert drop.measured == pytest.approx(expected_drop, abs=1e-12)
    assert drop.detail.startswith(f"largest score drop {expected_drop:.3f} > max 0.050")


def test_another_checkpoint_is_measured_against_the_release(
    folder: Path, cache: MemoryCache, released: AuditResult
) -> None:
    torch.manual_seed(2)
    state = {
        k: v + 0.1 * torch.randn_like(v)
        for k, v in load_file(EXAMPLES / "digits_cnn.safetensors").items()
    }
    save_file(state, folder / "retrained.safetensors")
    model = {**digits_spec()["model"], "checkpoint": str(folder / "retrained.safetensors")}  # type: ignore[dict-item]
    result, current = audit(
        folder, cache, "retrained", model=model, checks=REGRESSION, baseline=RELEASED
    )
    assert json.loads(current.read_text())["models"][0]["checkpoint_sha256"] != (
        released.models[0].checkpoint_sha256
    )
    expected_layers = newly_fragile(current, folder / RELEASED)
    fragile = check(result, "no_new_fragile_layers")
    assert (fragile.measured, fragile.layers) == (len(expected_layers), expected_layers)
    assert fragile.passed == (not expected_layers)
    expected_drop = largest_drop(current, folder / RELEASED)
    drop = check(result, "max_score_drop")
    assert expected_drop != 0.0
    assert drop.measured == pytest.approx(expected_drop, abs=1e-12)
    assert drop.passed == (expected_drop <= 0.05)


def test_a_release_of_other_models_only_is_an_error_naming_both_files_and_the_models(
    folder: Path, cache: MemoryCache, released: AuditResult
) -> None:
    def renamed(data: dict[str, Any]) -> None:
        other = json.loads(json.dumps(data["models"][0]))
        data["models"][0]["name"] = "digits-large"
        other["name"] = "digits-tiny"
        data["models"].append(other)

    baseline = edited_release(folder, "others.json", renamed)
    spec_path = write_spec(
        folder, "orphan.yaml", filtering=FILTERING, checks=REGRESSION, baseline=baseline
    )
    with pytest.raises(BaselineError) as caught:
        run_audit(load_spec(spec_path), cache=cache)
    message = str(caught.value)
    assert isinstance(caught.value, AuditError)
    assert str(spec_path) in message and baseline in message
    assert "no model named 'digits-small'" in message
    assert "'digits-large', 'digits-tiny'" in message
    assert "\n" not in message


def test_the_missing_model_error_is_the_failing_items_whole_message(
    pytester: pytest.Pytester, folder: Path, released: AuditResult
) -> None:
    def renamed(data: dict[str, Any]) -> None:
        data["models"][0]["name"] = "digits-large"

    baseline = edited_release(folder, "renamed.json", renamed)
    spec_path = write_spec(pytester.path, filtering=FILTERING, checks=REGRESSION, baseline=baseline)
    line = next(
        n
        for n, text in enumerate(spec_path.read_text().splitlines(), 1)
        if text.startswith("baseline:")
    )
    result = pytester.runpytest_inprocess(OPTION_AUDIT, str(spec_path), "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    message = (
        f"{spec_path}:{line}: baseline: {baseline} holds no model named 'digits-small' "
        "(it holds 'digits-large');"
    )
    failures = [text for text in result.outlines if text.startswith(message)]
    assert len(failures) == 2  # one per regression item, each the whole failure text
    assert "Traceback" not in result.stdout.str()


def test_the_spec_model_is_found_among_several_in_the_release(
    folder: Path, cache: MemoryCache, released: AuditResult
) -> None:
    def other_first(data: dict[str, Any]) -> None:
        other = json.loads(json.dumps(data["models"][0]))
        other["name"] = "digits-other"
        for sweep in other["sweeps"]:
            sweep["labels"] = {"clean": "robust", "adversarial": "robust"}
            sweep["scores"]["adversarial"] += 1.0
        data["models"].insert(0, other)

    baseline = edited_release(folder, "several.json", other_first)
    result, _ = audit(folder, cache, "several", checks=REGRESSION, baseline=baseline)
    assert check(result, "no_new_fragile_layers").measured == 0.0
    assert check(result, "max_score_drop").measured == 0.0


def test_a_release_without_the_attack_is_an_error_not_a_pass(
    folder: Path, cache: MemoryCache, released: AuditResult
) -> None:
    def other_attack(data: dict[str, Any]) -> None:
        for sweep in data["models"][0]["sweeps"]:
            sweep["attack"] = "fgsm_eps0.3"

    baseline = edited_release(folder, "other_attack.json", other_attack)
    spec_path = write_spec(
        folder, "other_attack.yaml", filtering=FILTERING, checks=REGRESSION, baseline=baseline
    )
    with pytest.raises(
        BaselineError,
        match=r"no sweep of low_pass under fgsm_eps0\.1 .*"
        r"\(it has: low_pass under fgsm_eps0\.3\)",
    ):
        run_audit(load_spec(spec_path), cache=cache)


# --------------------------------------------------------------------------- Lipschitz
def test_lipschitz_bound_above_the_limit_fails_with_the_bound_as_measured(
    folder: Path, cache: MemoryCache, released: AuditResult
) -> None:
    bound = json.loads((folder / RELEASED).read_text())["models"][0]["lipschitz"][
        "network_upper_bound"
    ]
    assert bound is not None and bound > 0
    result, current = audit(
        folder, cache, "lipschitz", checks={"max_lipschitz_upper_bound": bound / 2}
    )
    lipschitz = check(result, "max_lipschitz_upper_bound")
    assert not lipschitz.passed
    assert (
        lipschitz.measured
        == json.loads(current.read_text())["models"][0]["lipschitz"]["network_upper_bound"]
    )
    assert lipschitz.measured == pytest.approx(bound, rel=1e-9)
    assert lipschitz.limit == bound / 2
    assert lipschitz.detail.startswith(f"network Lipschitz bound {bound:.4g} > max")
    assert lipschitz.layers  # the largest layers are named


def test_an_unavailable_lipschitz_bound_fails_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "squares.py").write_text(
        "import torch.nn as nn\n"
        "class Squares(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        h = self.fc(x.reshape(x.shape[0], 64))\n"
        "        return h * h  # no global Lipschitz bound exists\n"
    )
    spec_path = write_spec(
        tmp_path,
        model={"factory": "squares.py:Squares"},
        filtering={"thresholds": 3, "filters": [FILTER], "scopes": ["local"]},
        checks={"max_lipschitz_upper_bound": 1.0e30},
    )
    result, planned, _ = run_audit(load_spec(spec_path))
    assert [p.check for p in planned] == ["max_lipschitz_upper_bound"]
    lipschitz_result = result.models[0].lipschitz
    assert lipschitz_result is not None and lipschitz_result.network_upper_bound is None
    lipschitz = check(result, "max_lipschitz_upper_bound")
    assert not lipschitz.passed and math.isinf(lipschitz.measured)
    reason = getattr(lipschitz_result, "reason", "") or lipschitz_result.note
    assert reason and reason in lipschitz.detail
    assert lipschitz.detail.endswith("cannot assert max 1e+30")
    assert not result.passed


def test_every_check_a_spec_can_ask_for_has_an_evaluator() -> None:
    planned_kinds = {*MODEL_CHECKS, *ATTACK_CHECKS, *SWEEP_CHECKS, *MEASUREMENTS, *SANITY_LIMITS}
    assert set(EVALUATORS) == planned_kinds
    # Every key of ``checks:`` is evaluated; attack_sanity as one item per indicator.
    assert set(ChecksSpec.model_fields) - {"attack_sanity"} <= set(EVALUATORS)


# --------------------------------------------------------------------------- import direction
def _imports(folder: Path, package: str) -> dict[str, set[str]]:
    """Each module of a package and the package's modules it imports: at the top, inside a
    function, or under ``TYPE_CHECKING`` alike (a lazy import still ties the two together)."""
    edges: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.startswith(f"{package}."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found.update(
                    a.name.split(".")[1] for a in node.names if a.name.startswith(f"{package}.")
                )
        edges[path.stem] = found - {path.stem}
    return edges


def _a_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    def walk(path: list[str]) -> list[str] | None:
        for dep in sorted(edges.get(path[-1], ())):
            if dep in path:
                return [*path[path.index(dep) :], dep]
            found = walk([*path, dep])
            if found:
                return found
        return None

    for start in sorted(edges):
        cycle = walk([start])
        if cycle:
            return cycle
    return None


@pytest.mark.parametrize(
    ("folder", "package"),
    [
        ("inferlink_audit", "inferlink_audit"),
        ("pytest_plugin/pytest_inferlink", "pytest_inferlink"),
    ],
)
def test_modules_import_one_way(repo_root: Path, folder: str, package: str) -> None:
    edges = _imports(repo_root / folder, package)
    assert {"checks", "compare"} <= set(edges) or {"items", "runner", "stash"} <= set(edges)
    assert _a_cycle(edges) is None
