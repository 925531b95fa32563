"""CI shards: the plan (deterministic, complete, balanced by cost), two shards merged equal to a
serial run, merge's refusals, and the pytest option's selection."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pytest_inferlink.plugin import OPTION_AUDIT, OPTION_SHARD

from inferlink_audit.cli import _parser, main
from inferlink_audit.results import read_results
from inferlink_audit.shards import (
    ShardError,
    attack_passes,
    merge_shards,
    parse_shard,
    plan_shards,
    shard_of_spec,
    sweep_costs,
)
from inferlink_audit.spec_loader import load_spec, parse_spec
from tests.specs import write_spec

pytest_plugins = ["pytester"]

FILTERS = ["low_pass", "high_pass"]
ATTACKS = [{"fgsm": {"eps": 0.1}}, {"gaussian": {"sigma": 0.1}}]
CHECKS = {
    "min_clean_accuracy": 0.9,
    "min_adversarial_accuracy": 0.2,
    "max_fragile_fraction": {"value": 0.4},
    "max_targeted_layers": 4,
    "max_lipschitz_upper_bound": 1.0e4,
}


def small_spec(folder: Path, **filtering: object) -> Path:
    """Two filters × two attacks, 4 thresholds, 120 digits: four sweep groups."""
    return write_spec(
        folder,
        filtering={"thresholds": 4, "filters": FILTERS, **filtering},
        attacks=ATTACKS,
        checks=CHECKS,
    )


def models_json(path: Path) -> str:
    """Every model record (sweeps, attacks, checks, …) as canonical text: NaN compares equal."""
    return json.dumps(json.loads(path.read_text())["models"], sort_keys=True)


# --------------------------------------------------------------------------- planning
def brute_force_makespan(costs: list[int], count: int) -> int:
    """The optimal largest shard load, by trying every assignment."""
    best = sum(costs)
    for assignment in itertools.product(range(count), repeat=len(costs)):
        loads = [0] * count
        for cost, shard in zip(costs, assignment, strict=True):
            loads[shard] += cost
        best = min(best, max(loads))
    return best


def test_plan_covers_every_group_exactly_once_and_is_deterministic() -> None:
    rng = random.Random(0)
    for count in (1, 2, 3, 5, 9):
        costs = {(f"f{i}", f"a{j}"): rng.randint(1, 50) for i in range(3) for j in range(2)}
        plan = plan_shards(costs, count)
        assert len(plan) == count
        flat = [key for shard in plan for key in shard]
        assert sorted(flat) == sorted(costs)  # every group, none twice
        assert plan_shards(dict(costs), count) == plan
        order = list(costs)
        for shard in plan:  # each shard keeps the serial order
            assert shard == sorted(shard, key=order.index)


def test_plan_balances_by_cost_not_by_count() -> None:
    # One group as costly as the four others together: a split by count (3 + 2) is 100 vs
    # 50 at best; by cost, the costly group runs alone.
    costs = {"big": 100, "s1": 25, "s2": 25, "s3": 25, "s4": 25}
    assert plan_shards(costs, 2) == [["big"], ["s1", "s2", "s3", "s4"]]
    assert brute_force_makespan(list(costs.values()), 2) == 100


def test_plan_is_within_grahams_bound_of_the_optimum() -> None:
    """Longest-processing-time's largest load is at most 4/3 − 1/(3n) of the optimal one."""
    rng = random.Random(1)
    for _ in range(30):
        count = rng.randint(2, 3)
        values = [rng.randint(1, 40) for _ in range(rng.randint(3, 7))]
        costs = {f"g{i}": v for i, v in enumerate(values)}
        makespan = max(sum(costs[k] for k in shard) for shard in plan_shards(costs, count))
        optimum = brute_force_makespan(values, count)
        assert makespan * 3 * count <= optimum * (4 * count - 1)


def test_cost_is_weights_times_thresholds_times_passes(tmp_path: Path) -> None:
    spec = load_spec(
        write_spec(
            tmp_path,
            filtering={"thresholds": 7, "filters": ["pulse"], "scopes": ["local", "global"]},
            attacks=[{"fgsm": {"eps": 0.1}}, {"pgd": {"eps": 0.1, "steps": 10}}],
        )
    )
    costs = sweep_costs(spec, [100, 30])
    # local scopes sweep 130 weights and the global one 130: 260 weights per variant.
    assert costs[("pulse", "fgsm_eps0.1")] == 260 * 7 * (2 + 1)
    pgd = next(a for a in spec.attack_specs if a.kind == "pgd")
    assert costs[("pulse", pgd.id)] == 260 * 7 * (2 + 10)
    # The adversarial examples made once on the unfiltered network: 2 passes per variant.
    assert attack_passes(pgd, "original") == 2


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_a_malformed_shard_is_refused(text: str) -> None:
    with pytest.raises(ShardError, match=rf"--shard '{text}': expected INDEX/COUNT"):
        parse_shard(text)


UNSPLITTABLE = {
    "statistics.sequential": {"statistics": {"resamples": 200, "sequential": {}}},
    "remediation": {
        "data": {
            "source": "sklearn_digits",
            "limit": 120,
            "batch_size": 120,
            "train": {"source": "sklearn_digits", "split": "train"},
        },
        "remediation": {"selective_retrain": {"epochs": 1}},
    },
}


@pytest.mark.parametrize("key", sorted(UNSPLITTABLE))
def test_a_shard_of_a_spec_that_cannot_be_split_is_refused_naming_the_key(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], pytester: pytest.Pytester
) -> None:
    spec = write_spec(tmp_path, **UNSPLITTABLE[key])
    out = tmp_path / "no-out"
    assert main(["run", str(spec), "--out", str(out), "--shard", "1/2", "--quiet"]) == 2
    assert not (out / "results.json").exists()
    err = capsys.readouterr().err
    assert re.search(rf"error: {re.escape(str(spec))}:\d+: {key}: cannot run in shards", err)
    assert "run this spec without --shard" in err
    # The plugin refuses it before any item runs, naming its own option.
    write_spec(pytester.path, **UNSPLITTABLE[key])
    result = pytester.runpytest(OPTION_AUDIT, "audit.yaml", OPTION_SHARD, "2/2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*audit.yaml:*: {key}: cannot run in shards*without {OPTION_SHARD}*"]
    )


# --------------------------------------------------------------------------- shards and merge
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small spec run serially and as two shards, in one folder."""
    folder = tmp_path_factory.mktemp("shards")
    spec = small_spec(folder)
    assert main(["run", str(spec), "--out", str(folder / "serial"), "--quiet"]) == 0
    for i in (1, 2):
        out = folder / f"shard{i}"
        assert main(["run", str(spec), "--out", str(out), "--shard", f"{i}/2", "--quiet"]) == 0
    return folder


def test_two_shards_merged_equal_a_serial_run(runs: Path) -> None:
    out = runs / "merged"
    shards = [str(runs / "shard2" / "results.json"), str(runs / "shard1" / "results.json")]
    assert main(["merge", *shards, "--out", str(out)]) == 0
    assert models_json(out / "results.json") == models_json(runs / "serial" / "results.json")
    assert (out / "report.html").is_file()
    merged = read_results(out / "results.json")
    assert "shard" not in merged.meta
    assert merged.meta["merged_from"] == sorted(shards)


def test_each_shard_holds_its_planned_groups_and_only_their_checks(runs: Path) -> None:
    spec = load_spec(runs / "audit.yaml")
    held = []
    for i in (1, 2):
        result = read_results(runs / f"shard{i}" / "results.json")
        info = result.meta["shard"]
        assert (info["index"], info["count"]) == (i, 2)
        groups = [tuple(k) for k in info["sweeps"]]
        assert groups == shard_of_spec(spec, parse_shard(f"{i}/2"))
        model = result.models[0]
        assert {(s.filter, s.attack) for s in model.sweeps} == set(groups)
        model_wide = {c.id for c in model.checks if c.check in ("min_clean_accuracy",)}
        assert model_wide == ({"min_clean_accuracy"} if i == 1 else set())
        for check in model.checks:
            if check.check in ("max_fragile_fraction", "max_targeted_layers"):
                assert any(check.id.startswith(f"{f}-{a}-") for f, a in groups)
        held += groups
    assert sorted(held) == sorted((f, a.id) for f in FILTERS for a in spec.attack_specs)


def test_a_shard_reuses_its_cached_sweeps(runs: Path, tmp_path: Path) -> None:
    """``--cache``, as a CI cache restores it: the second run computes no sweep and writes the
    same records."""
    spec, cache = runs / "audit.yaml", tmp_path / "cache"
    for name in ("first", "second"):
        args = ["run", str(spec), "--out", str(tmp_path / name), "--shard", "2/2", "--quiet"]
        assert main([*args, "--cache", str(cache)]) == 0
    second = read_results(tmp_path / "second" / "results.json")
    assert not [key for key in second.meta["timings"] if key.startswith("sweep ")]
    assert len(list(cache.glob("*.json"))) == len(second.meta["shard"]["sweeps"])
    expected = models_json(runs / "shard2" / "results.json")
    assert models_json(tmp_path / "second" / "results.json") == expected


def test_merge_refuses_a_missing_shard(runs: Path) -> None:
    one = runs / "shard1" / "results.json"
    with pytest.raises(ShardError, match=r"shard 2/2 missing; given .*shard1/results.json"):
        merge_shards([(one, read_results(one))])


def test_merge_refuses_a_duplicate_shard(runs: Path, tmp_path: Path) -> None:
    one = runs / "shard1" / "results.json"
    copy = tmp_path / "again.json"
    shutil.copy(one, copy)
    with pytest.raises(
        ShardError, match=r"duplicate shards \(shard 1/2 in .*shard1/results.json, .*again.json\)"
    ):
        merge_shards([(one, read_results(one)), (copy, read_results(copy))])


def test_merge_refuses_shards_of_different_specs(runs: Path, tmp_path: Path) -> None:
    """A real shard of a spec that differs only in its tolerance."""
    other = small_spec(tmp_path, tolerance=0.1)
    out = tmp_path / "other2"
    assert main(["run", str(other), "--out", str(out), "--shard", "2/2", "--quiet"]) == 0
    one, two = runs / "shard1" / "results.json", out / "results.json"
    with pytest.raises(
        ShardError,
        match=r"cannot merge shards of different specs \(spec_sha256\) \(.*shard1/results.json: "
        r"[0-9a-f]{64}; .*other2/results.json: [0-9a-f]{64}\)",
    ):
        merge_shards([(one, read_results(one)), (two, read_results(two))])


def test_merge_refuses_shards_of_different_checkpoints(runs: Path, tmp_path: Path) -> None:
    # The same shard, as if its job had audited another checkpoint.
    data = json.loads((runs / "shard2" / "results.json").read_text())
    data["models"][0]["checkpoint_sha256"] = "0" * 64
    two = tmp_path / "retrained.json"
    two.write_text(json.dumps(data))
    one = runs / "shard1" / "results.json"
    with pytest.raises(
        ShardError,
        match=r"different checkpoints \(checkpoint_sha256\) .*retrained.json: \['0{64}'\]",
    ):
        merge_shards([(one, read_results(one)), (two, read_results(two))])


def test_merge_refuses_shards_of_different_versions(runs: Path, tmp_path: Path) -> None:
    data = json.loads((runs / "shard2" / "results.json").read_text())
    data["meta"]["version"] = "0.0.1"
    two = tmp_path / "old.json"
    two.write_text(json.dumps(data))
    one = runs / "shard1" / "results.json"
    code = main(["merge", str(one), str(two), "--out", str(tmp_path / "m")])
    assert code == 2
    with pytest.raises(ShardError, match=r"different versions .*old.json: inferlink-audit 0.0.1"):
        merge_shards([(one, read_results(one)), (two, read_results(two))])


# --------------------------------------------------------------------------- pytest
def _ids(result: pytest.RunResult) -> set[str]:
    return {line.split("::")[-1] for line in result.outlines if "::" in line}


def test_the_pytest_option_keeps_only_its_shards_items(pytester: pytest.Pytester) -> None:
    spec_path = small_spec(pytester.path)
    spec = parse_spec(spec_path.read_text(), path=spec_path)
    every = _ids(pytester.runpytest_subprocess(OPTION_AUDIT, "audit.yaml", "--collect-only", "-q"))
    shards = []
    for i in (1, 2):
        result = pytester.runpytest_subprocess(
            OPTION_AUDIT, "audit.yaml", OPTION_SHARD, f"{i}/2", "--collect-only", "-q"
        )
        ids = _ids(result)
        groups = shard_of_spec(spec, parse_shard(f"{i}/2"))  # the CLI's plan
        sweep_ids = {x for x in ids if any(f"[{f}-{a}-" in x for f, a in groups)}
        model_wide = ids - sweep_ids
        assert model_wide == (
            {x for x in every if x.split("[")[1].split("-")[0] not in FILTERS} if i == 1 else set()
        )
        assert sweep_ids and all(any(f"[{f}-{a}-" in x for f, a in groups) for x in sweep_ids)
        result.stdout.fnmatch_lines([f"*{len(every) - len(ids)} deselected*"])
        shards.append(ids)
    assert shards[0] | shards[1] == every and not shards[0] & shards[1]


def test_the_pytest_plan_ignores_keyword_selection(pytester: pytest.Pytester) -> None:
    """``-k`` narrows a shard's items; it does not move groups to another shard (planned over
    the low_pass groups alone, each shard would get one of them)."""
    spec_path = small_spec(pytester.path)
    spec = parse_spec(spec_path.read_text(), path=spec_path)
    for i in (1, 2):
        groups = shard_of_spec(spec, parse_shard(f"{i}/2"))
        result = pytester.runpytest_subprocess(
            OPTION_AUDIT, "audit.yaml", OPTION_SHARD, f"{i}/2", "-k", "low_pass", "--co", "-q"
        )
        seen = {(f, a) for x in _ids(result) for f, a in groups if f"[{f}-{a}-" in x}
        assert seen == {(f, a) for f, a in groups if f == "low_pass"}
        assert len(_ids(result)) == len(seen) * 2  # fragile fraction and targeted layers


def test_the_pytest_shard_runs_only_its_items(pytester: pytest.Pytester) -> None:
    small_spec(pytester.path)
    result = pytester.runpytest_subprocess(OPTION_AUDIT, "audit.yaml", OPTION_SHARD, "2/2", "-v")
    outcomes = result.parseoutcomes()
    assert outcomes["deselected"] > 0
    ran = [line for line in result.outlines if " PASSED" in line or " FAILED" in line]
    assert len(ran) == outcomes.get("passed", 0) + outcomes.get("failed", 0)
    assert all("min_clean_accuracy" not in line for line in ran)


def test_a_malformed_pytest_shard_is_a_usage_error(pytester: pytest.Pytester) -> None:
    small_spec(pytester.path)
    result = pytester.runpytest_subprocess(OPTION_AUDIT, "audit.yaml", OPTION_SHARD, "3/2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{OPTION_SHARD} '3/2': expected INDEX/COUNT*"])


# --------------------------------------------------------------------------- the CI recipe
RECIPE = Path(__file__).resolve().parents[1] / "docs" / "ci" / "github-actions.yml"


def test_the_github_actions_recipe_uses_the_command_lines_options() -> None:
    """Every ``inferlink-audit`` command in the recipe parses with today's command line, and
    the matrix has as many shards as ``SHARDS`` says."""
    import yaml

    workflow = yaml.safe_load(RECIPE.read_text())
    shards = workflow["jobs"]["shard"]["strategy"]["matrix"]["shard"]
    assert shards == list(range(1, int(workflow["env"]["SHARDS"]) + 1))
    scripts = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    text = "\n".join(scripts).replace("\\\n", " ")
    text = re.sub(r"\$\{\{[^}]*\}\}", "1", text).replace("$SHARDS", "2")
    commands = [
        shlex.split(line.split("||")[0])
        for line in text.splitlines()
        if line.strip().startswith("inferlink-audit ")
    ]
    assert [c[1] for c in commands] == ["run", "merge"]
    for command in commands:
        args = _parser().parse_args(command[1:])
        if args.command == "run":
            assert (args.shard, args.cache) == ("1/2", Path(".inferlink-cache"))


# --------------------------------------------------------------------------- pytest's shard files
STATISTICS = {"resamples": 200}  # 95 %, seeded by the spec's seed 0


def stats_spec(folder: Path) -> Path:
    """The small spec with statistics: every check gets an interval, every sweep its label
    probabilities."""
    return write_spec(
        folder,
        filtering={"thresholds": 4, "filters": FILTERS},
        attacks=ATTACKS,
        checks=CHECKS,
        statistics=STATISTICS,
    )


def run_pytest(folder: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """pytest in its own interpreter, as a CI job runs it; its output."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=folder,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def stats_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The statistics spec run serially and as two shards, by the plugin (``serial``, ``p1``,
    ``p2``) and by the command line (``cli``, ``c1``, ``c2``); shard 1's pytest output,
    step summary and JUnit XML kept next to them."""
    folder = tmp_path_factory.mktemp("stats-shards")
    spec = stats_spec(folder)
    run_pytest(folder, OPTION_AUDIT, "audit.yaml", "--inferlink-report", "serial")
    summary = folder / "summary.md"
    output = run_pytest(
        folder,
        *(OPTION_AUDIT, "audit.yaml", "--inferlink-report", "p1", OPTION_SHARD, "1/2"),
        "--junitxml=junit.xml",
        env={"GITHUB_STEP_SUMMARY": str(summary)},
    )
    (folder / "p1.out").write_text(output)
    run_pytest(folder, OPTION_AUDIT, "audit.yaml", "--inferlink-report", "p2", OPTION_SHARD, "2/2")
    assert main(["run", str(spec), "--out", str(folder / "cli"), "--quiet"]) == 0
    for i in (1, 2):
        out = folder / f"c{i}"
        assert main(["run", str(spec), "--out", str(out), "--shard", f"{i}/2", "--quiet"]) == 0
    return folder


def test_the_plugins_shards_merged_equal_a_serial_plugin_run(stats_runs: Path) -> None:
    shards = [str(stats_runs / f"p{i}" / "results.json") for i in (1, 2)]
    assert main(["merge", *shards, "--out", str(stats_runs / "pm")]) == 0
    serial = json.loads((stats_runs / "serial" / "results.json").read_text())["models"][0]
    merged = json.loads((stats_runs / "pm" / "results.json").read_text())["models"][0]
    scopes = len(serial["layers"]) + 1  # every layer and the global scope
    assert len(merged["sweeps"]) == len(serial["sweeps"]) == 4 * scopes
    for ours, theirs in zip(merged["sweeps"], serial["sweeps"], strict=True):
        assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)
    assert [c["id"] for c in merged["checks"]] == [c["id"] for c in serial["checks"]]
    for ours, theirs in zip(merged["checks"], serial["checks"], strict=True):
        assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)
    assert models_json(stats_runs / "pm" / "results.json") == models_json(
        stats_runs / "serial" / "results.json"
    )


def test_the_plugins_shard_file_equals_the_command_lines(stats_runs: Path) -> None:
    """Same plan (costs with the layers' sizes), same sweeps, same ``meta.shard``."""
    for i in (1, 2):
        plugin = json.loads((stats_runs / f"p{i}" / "results.json").read_text())
        cli = json.loads((stats_runs / f"c{i}" / "results.json").read_text())
        assert plugin["meta"]["shard"] == cli["meta"]["shard"]
        assert plugin["models"][0]["sweeps"] == cli["models"][0]["sweeps"]
        info = cli["meta"]["shard"]
        assert info["index"] == i and len(info["sweeps"]) == 2
        weights = sum(layer["numel"] for layer in cli["models"][0]["layers"])
        # (local + global) × weights × thresholds × passes (fgsm: 3, gaussian: 2)
        assert info["costs"] == [2 * weights * 4 * passes for _ in FILTERS for passes in (3, 2)]


def intervals(path: Path) -> list[object]:
    """Every interval, certainty and label probability of a results.json, in order."""
    model = json.loads(path.read_text())["models"][0]
    found: list[object] = [model["clean_accuracy_ci"], [a["accuracy_ci"] for a in model["attacks"]]]
    found += [(c["id"], c["ci"], c["certain"]) for c in model["checks"] if "ci" in c]
    found += [s["statistics"] for s in model["sweeps"]]
    return found


def test_sharded_statistics_merged_equal_a_serial_run_interval_for_interval(
    stats_runs: Path, tmp_path: Path
) -> None:
    """Merge recomputes the bootstrap and Wilson intervals from the shards' per-example
    outcomes: with every interval removed from the shard files it still gives the serial
    run's, to the last digit."""
    shards = []
    for i in (1, 2):
        data = json.loads((stats_runs / f"c{i}" / "results.json").read_text())
        model = data["models"][0]
        for key in ("clean_accuracy_ci",):
            model.pop(key, None)
        for item in [*model["attacks"], *model["checks"], *model["sweeps"]]:
            for key in ("accuracy_ci", "ci", "certain", "statistics"):
                item.pop(key, None)
        shards.append(tmp_path / f"bare{i}.json")
        shards[-1].write_text(json.dumps(data))
    assert main(["merge", *map(str, shards), "--out", str(tmp_path / "merged")]) == 0
    serial = intervals(stats_runs / "cli" / "results.json")
    assert intervals(tmp_path / "merged" / "results.json") == serial
    checks = [x for x in serial if isinstance(x, tuple)]
    assert len(checks) == 11 and any(certain is False for _, _, certain in checks)
    assert models_json(tmp_path / "merged" / "results.json") == models_json(
        stats_runs / "cli" / "results.json"
    )


def test_a_pytest_shard_says_it_is_a_shard_not_the_audits_verdict(stats_runs: Path) -> None:
    output = (stats_runs / "p1.out").read_text()
    assert f"inferlink-audit: 1 spec, shard 1/2, results: {stats_runs / 'p1'} (" in output
    assert re.search(
        r"digits-small \(audit.yaml\): shard 1/2: 2 of 4 sweep groups and the model-wide "
        r"checks: 8 passed, 0 failed",
        output,
    )
    assert f"shard results: {stats_runs / 'p1' / 'results.json'}" in output
    assert "join every shard's results.json with 'inferlink-audit merge'" in output
    assert not (stats_runs / "p1" / "report.html").exists()  # merge writes the report
    summary = (stats_runs / "summary.md").read_text()
    assert "## inferlink-audit: one shard, its checks PASS" in summary
    assert "digits-small: shard 1/2: 2 of 4 sweep groups and the model-wide checks, PASS" in summary
    cases = ET.parse(stats_runs / "junit.xml").getroot().iter("testcase")
    shards = [
        [p.get("value") for p in case.iter("property") if p.get("name") == "shard"]
        for case in cases
    ]
    assert len(shards) == 8 and all(s == ["1/2"] for s in shards)


def test_each_spec_of_a_pytest_run_is_split_by_its_own_plan(pytester: pytest.Pytester) -> None:
    """Two specs: each one's items follow ``inferlink-audit run SPEC --shard``'s plan for it
    (planned over both specs' groups together, shard 1 would hold one of the first spec's
    four groups, not two), and each spec's shard file goes to its own folder."""
    small_spec(pytester.path)
    one = write_spec(
        pytester.path,
        "one.yaml",
        name="digits-one",
        filtering={"thresholds": 4, "filters": ["pulse"]},
        checks={"max_targeted_layers": 4},
    )
    specs = {p: load_spec(pytester.path / p) for p in ("audit.yaml", one.name)}
    for i in (1, 2):
        result = pytester.runpytest(
            OPTION_AUDIT, "audit.yaml", OPTION_AUDIT, one.name, OPTION_SHARD, f"{i}/2", "--co", "-q"
        )
        nodes = [line for line in result.outlines if "::" in line]
        for path, spec in specs.items():
            groups = shard_of_spec(spec, parse_shard(f"{i}/2"))
            seen = {
                (f, a)
                for node in nodes
                if node.startswith(path)
                for f in spec.filtering.filters
                for a in (x.id for x in spec.attack_specs)
                if f"[{f}-{a}-" in node
            }
            assert seen == set(groups)
    assert shard_of_spec(specs["audit.yaml"], parse_shard("1/2")) == [
        ("low_pass", "fgsm_eps0.1"),
        ("low_pass", "gaussian_sigma0.1"),
    ]
    result = pytester.runpytest(
        OPTION_AUDIT,
        "audit.yaml",
        OPTION_AUDIT,
        one.name,
        OPTION_SHARD,
        "1/2",
        "--inferlink-report",
        "out",
        "-p",
        "no:cacheprovider",
    )
    assert result.ret == 0
    for name in ("digits-small", "digits-one"):
        shard = read_results(pytester.path / "out" / name / "results.json")
        assert shard.models[0].name == name and shard.meta["shard"]["index"] == 1


def test_a_compare_spec_sharded_and_merged_equals_a_serial_run(pytester: pytest.Pytester) -> None:
    """compare: every model split by its own plan; shard 1 measures transferability; merge
    recomputes the label consistency on the joined sweeps. The plugin's shards (the spec and
    the one it compares in one file) merge to the same."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.specs import EXAMPLES, digits_spec

    folder = pytester.path
    torch.manual_seed(1)
    state = load_file(EXAMPLES / "digits_cnn.safetensors")
    noisy = folder / "noisy.safetensors"
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}, noisy)
    model = {**digits_spec()["model"], "checkpoint": str(noisy)}
    small = {"thresholds": 4, "filters": ["low_pass", "pulse"], "scopes": ["local"]}
    checks = {"min_clean_accuracy": 0.5, "max_targeted_layers": 4}
    write_spec(
        folder, "other.yaml", name="digits-noisy", model=model, filtering=small, checks=checks
    )
    spec = write_spec(folder, filtering=small, compare=["other.yaml"], checks=checks)
    assert main(["run", str(spec), "--out", str(folder / "serial"), "--quiet"]) == 0
    for i in (1, 2):
        args = ["run", str(spec), "--out", str(folder / f"c{i}"), "--shard", f"{i}/2"]
        assert main([*args, "--quiet"]) == 0
        report = ("--inferlink-report", f"p{i}", "-p", "no:cacheprovider")
        result = pytester.runpytest(OPTION_AUDIT, "audit.yaml", OPTION_SHARD, f"{i}/2", *report)
        assert result.ret == 0
    serial = json.loads((folder / "serial" / "results.json").read_text())
    assert serial["consistency"]["transfer"] and serial["consistency"]["layers"]
    for made in ("c", "p"):  # the command line's shards, the plugin's
        shards = [str(folder / f"{made}{i}" / "results.json") for i in (1, 2)]
        assert main(["merge", *shards, "--out", str(folder / f"{made}m")]) == 0
        merged = json.loads((folder / f"{made}m" / "results.json").read_text())
        assert [m["name"] for m in merged["models"]] == ["digits-small", "digits-noisy"]
        for key in ("models", "consistency"):
            assert json.dumps(merged[key], sort_keys=True) == json.dumps(
                serial[key], sort_keys=True
            )


def test_merge_refuses_a_pytest_shard_that_skipped_items(stats_runs: Path) -> None:
    """``-k`` narrows a shard; merging it would evaluate the skipped checks on nothing."""
    run_pytest(
        stats_runs,
        *(OPTION_AUDIT, "audit.yaml", OPTION_SHARD, "1/2", "--inferlink-report", "k1"),
        *("-k", "high_pass or min_clean_accuracy"),
    )
    narrowed, two = stats_runs / "k1" / "results.json", stats_runs / "p2" / "results.json"
    assert read_results(narrowed).meta["shard"]["missing_items"][:2] == [
        "max_lipschitz_upper_bound",
        "fgsm_eps0.1-min_adversarial_accuracy",
    ]
    with pytest.raises(
        ShardError,
        match=r"cannot merge: .*k1/results.json \(shard 1/2\) did not run 7 of its items "
        r"\(max_lipschitz_upper_bound, fgsm_eps0.1-min_adversarial_accuracy, .*deselected by -k",
    ):
        merge_shards([(narrowed, read_results(narrowed)), (two, read_results(two))])


def test_merge_refuses_a_check_whose_sweeps_no_shard_holds(
    stats_runs: Path, tmp_path: Path
) -> None:
    """As when a shard's items failed before their sweeps were measured."""
    data = json.loads((stats_runs / "c2" / "results.json").read_text())
    model = data["models"][0]
    group = data["meta"]["shard"]["sweeps"][0]
    kept = [i for i, s in enumerate(model["sweeps"]) if [s["filter"], s["attack"]] != group]
    model["sweeps"] = [model["sweeps"][i] for i in kept]
    data["meta"]["shard"]["outcomes"] = [data["meta"]["shard"]["outcomes"][i] for i in kept]
    two = tmp_path / "failed.json"
    two.write_text(json.dumps(data))
    one = stats_runs / "c1" / "results.json"
    with pytest.raises(
        ShardError,
        match=rf"shard 2/2 holds no sweeps of {group[0]} under {group[1]} for digits-small, "
        rf"which check {group[0]}-{group[1]}-max_fragile_fraction reads",
    ):
        merge_shards([(one, read_results(one)), (two, read_results(two))])


def test_a_pytest_shard_under_xdist_writes_the_same_shard_file(stats_runs: Path) -> None:
    """The controller builds the shard file from the workers' items (outcomes and scope
    members travel in their payloads): the same file as a plain run's."""
    run_pytest(
        stats_runs,
        *(OPTION_AUDIT, "audit.yaml", OPTION_SHARD, "1/2", "--inferlink-report", "x1", "-n", "2"),
    )
    plain = json.loads((stats_runs / "p1" / "results.json").read_text())
    xdist = json.loads((stats_runs / "x1" / "results.json").read_text())
    assert xdist["meta"]["shard"] == plain["meta"]["shard"]
    assert json.dumps(xdist["models"], sort_keys=True) == json.dumps(
        plain["models"], sort_keys=True
    )
