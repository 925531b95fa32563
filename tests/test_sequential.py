"""Sequential evaluation (``statistics.sequential``; docs/method.md §8, sequential.py)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pytest_inferlink.assemble import check_properties

from inferlink_audit import audit as audit_module
from inferlink_audit import sequential
from inferlink_audit.audit import AuditSession, run_audit
from inferlink_audit.cache import DiskSweepCache
from inferlink_audit.checks import plan_checks
from inferlink_audit.errors import SpecError
from inferlink_audit.report import render_report
from inferlink_audit.results import (
    AuditResult,
    Labels,
    Scores,
    SweepOutcomes,
    SweepResult,
    result_to_dict,
)
from inferlink_audit.scores import baseline, integrate
from inferlink_audit.sequential import (
    RoundPlan,
    labels_decided,
    look_confidence,
    merge_rounds,
    run_in_rounds,
)
from inferlink_audit.spec_loader import load_spec
from inferlink_audit.statistics import (
    bootstrap_sweep,
    percentile_interval,
    resample_indices,
    resample_weights,
)
from inferlink_audit.summary import text_summary

from .specs import write_spec

pytest_plugins = ["pytester"]

# The whole digits test split (360 examples) in one batch, so a round (blocks of 32, cut at
# block starts) batches its examples differently from the full run.
DATA = {
    "source": "sklearn_digits",
    "batch_size": 360,
    "normalize": {"mean": [0.5], "std": [0.5]},
}
FILTERING = {"thresholds": 9, "filters": ["low_pass"]}
CHECKS = {
    "min_clean_accuracy": 0.90,
    "min_adversarial_accuracy": 0.30,
    "max_fragile_fraction": {"value": 0.40},
    "max_targeted_layers": 4,
}
SEQUENTIAL = {"resamples": 200, "sequential": {"round": 64}}


def _run(folder: Path, name: str, statistics: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    model, session, _ = _run_result(folder, name, statistics)
    return model, session


def _run_result(
    folder: Path, name: str, statistics: dict[str, Any]
) -> tuple[dict[str, Any], Any, AuditResult]:
    path = write_spec(
        folder, name, data=DATA, filtering=FILTERING, checks=CHECKS, statistics=statistics
    )
    result, _, session = run_audit(load_spec(path))
    return result_to_dict(result)["models"][0], session, result


@pytest.fixture(scope="module")
def exact(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The exact engine on the whole test set, its intervals at the sequential run's per-look
    confidence (360 examples in rounds of 64: 6 looks)."""
    folder = tmp_path_factory.mktemp("exact")
    model, _ = _run(
        folder, "exact.yaml", {"resamples": 200, "confidence": look_confidence(0.95, 6)}
    )
    return model


def _without_notes(check: dict[str, Any]) -> dict[str, Any]:
    """A check as both runs write it: no spec line, no sequential note in its detail."""
    detail = re.sub(r"; sequential: [^;]*$", "", check["detail"])
    return {k: v for k, v in check.items() if k != "line"} | {"detail": detail}


def test_a_sequential_run_that_runs_out_of_rounds_gives_exactly_the_exact_runs_numbers(
    tmp_path: Path, exact: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is ever decided, so every sweep and accuracy uses all six rounds: the merged
    results must be the exact engine's bit for bit (accuracies, scores, labels, intervals,
    label probabilities, check values and decisions)."""
    monkeypatch.setattr(sequential, "labels_decided", lambda draws, look: False)
    monkeypatch.setattr(audit_module, "accuracy_decided", lambda *args: False)
    model, session = _run(tmp_path, "sequential.yaml", SEQUENTIAL)
    assert session.confidence == exact["statistics"]["confidence"]
    records = [s.pop("sequential") for s in model["sweeps"]]
    assert records == [
        {"examples": 360, "rounds": 6, "stopped_early": False, "decided": False}
    ] * len(records)
    assert model["sweeps"] == exact["sweeps"]
    assert model["clean_accuracy"] == exact["clean_accuracy"]
    assert model["clean_accuracy_ci"] == exact["clean_accuracy_ci"]
    assert model["attacks"] == exact["attacks"]
    assert [_without_notes(c) for c in model["checks"]] == [
        _without_notes(c) for c in exact["checks"]
    ]
    examples = model["statistics"]["sequential"]["examples"]
    assert examples == {"clean_accuracy": 360, "fgsm_eps0.1": 360}


def test_a_clearly_decided_sweep_stops_early_with_the_full_runs_decision(
    tmp_path: Path, exact: dict[str, Any]
) -> None:
    model, session, result = _run_result(tmp_path, "sequential.yaml", SEQUENTIAL)
    stopped = [s for s in model["sweeps"] if s["sequential"]["stopped_early"]]
    assert stopped, "no sweep of the digits example stopped before the data ran out"
    by_layer = {s["layer"]: s for s in exact["sweeps"]}
    for sweep in stopped:
        record = sweep["sequential"]
        assert record["decided"] and record["examples"] < 360
        assert record["examples"] == 64 * record["rounds"]
        full = by_layer[sweep["layer"]]
        assert (sweep["labels"], sweep["targeted"]) == (full["labels"], full["targeted"])
    # The clean accuracy is far above its minimum: decided before the last round.
    clean = model["statistics"]["sequential"]["examples"]["clean_accuracy"]
    assert clean < 360
    min_clean = next(c for c in model["checks"] if c["id"] == "min_clean_accuracy")
    assert min_clean["certain"] and min_clean["passed"]
    assert min_clean["detail"].endswith(f"sequential: decided on {clean} of 360 examples")
    # The terminal summary and the report say what each sweep used.
    summary = text_summary(result)
    early = f"sweeps: {len(stopped)} of {len(model['sweeps'])} decided early"
    assert f"sequential: clean_accuracy {clean}, " in summary and early in summary
    html = render_report(result, tmp_path).read_text(encoding="utf-8")
    section = html[html.index('id="sequential"') :]
    first = stopped[0]
    assert f"{first['sequential']['examples']} / 360" in section
    assert "decided early" in section
    # JUnit: each check's properties carry the examples that decided it.
    planned = next(p for p in plan_checks(session.spec) if p.id == "min_clean_accuracy")
    checked = next(c for c in result.models[0].checks if c.id == "min_clean_accuracy")
    assert ("examples", str(clean)) in check_properties(planned, checked, session)
    # Every certain decision is the full run's decision.
    full_checks = {c["id"]: c for c in exact["checks"]}
    for check in model["checks"]:
        if check["certain"]:
            assert check["passed"] == full_checks[check["id"]]["passed"], check["id"]


def test_sequential_sweeps_are_cached_with_their_records_and_keyed_by_the_checks(
    tmp_path: Path,
) -> None:
    """A second session reads the sequential sweeps back (examples, rounds, intervals) and
    computes none; a spec whose checks differ (so its sweeps may stop elsewhere) misses."""
    cache = DiskSweepCache(tmp_path / "cache")
    path = write_spec(
        tmp_path, data=DATA, filtering=FILTERING, checks=CHECKS, statistics=SEQUENTIAL
    )
    first = AuditSession(load_spec(path), cache=cache)
    computed = first.sweeps("low_pass", "fgsm_eps0.1")
    second = AuditSession(load_spec(path), cache=cache)
    again = second.sweeps("low_pass", "fgsm_eps0.1")
    assert second.computed_sweeps == 0
    assert again == computed
    assert [s.sequential for s in again] == [s.sequential for s in computed]
    assert all(s.statistics is not None for s in again)
    other = write_spec(
        tmp_path,
        "other.yaml",
        data=DATA,
        filtering=FILTERING,
        checks={**CHECKS, "max_targeted_layers": 1},
        statistics=SEQUENTIAL,
    )
    third = AuditSession(load_spec(other), cache=cache)
    assert third.cache_key("low_pass", "fgsm_eps0.1") != first.cache_key("low_pass", "fgsm_eps0.1")


# FGSM at ε = 0.6 leaves 7 of the 360 digits correct (ψa⁰ = 7/360), none of them in the
# first round of seed 0's order: on that round's 64 examples ψa⁰ = 0, so every bootstrap draw
# normalises the adversarial curve by ψc⁰ instead and the labels look certain, wrongly.
STRONG = [{"fgsm": {"eps": 0.6}}]
STRONG_CHECKS = {
    "max_fragile_fraction": {"value": 0.40, "on": "adversarial"},
    "max_targeted_layers": 1,
}


def test_a_sweep_is_not_decided_while_its_normaliser_may_differ_from_the_whole_sets(
    tmp_path: Path,
) -> None:
    def run(name: str, statistics: dict[str, Any]) -> dict[str, Any]:
        path = write_spec(
            tmp_path, name, data=DATA, filtering=FILTERING, attacks=STRONG,
            checks=STRONG_CHECKS, statistics=statistics,
        )  # fmt: skip
        result, _, _ = run_audit(load_spec(path))
        return result_to_dict(result)["models"][0]

    full = run("exact.yaml", {"resamples": 200, "confidence": look_confidence(0.95, 6)})
    model = run("sequential.yaml", SEQUENTIAL)
    assert {s["adversarial_normalised_by"] for s in full["sweeps"]} == {"adversarial"}
    for exact, sweep in zip(full["sweeps"], model["sweeps"], strict=True):
        if sweep["sequential"]["decided"]:
            assert (sweep["labels"], sweep["targeted"]) == (exact["labels"], exact["targeted"])
    for exact, check in zip(full["checks"], model["checks"], strict=True):
        if check["certain"]:
            assert check["passed"] == exact["passed"], check["id"]
    # Every sweep went on until it met a correct adversarial example.
    assert {s["adversarial_normalised_by"] for s in model["sweeps"]} == {"adversarial"}


def test_the_points_of_an_eps_curve_use_every_example(tmp_path: Path) -> None:
    """eps_not_monotone compares a curve's points example by example, so a curve's accuracies
    never stop early; a single attack with a clearly met minimum does."""
    attacks = [{"fgsm": {"eps": [0.05, 0.1]}}, {"gaussian": {"sigma": 0.1}}]
    path = write_spec(
        tmp_path,
        data=DATA,
        filtering={**FILTERING, "scopes": ["global"]},
        attacks=attacks,
        checks={"min_adversarial_accuracy": 0.05},
        statistics=SEQUENTIAL,
    )
    result, _, _ = run_audit(load_spec(path))
    used = result_to_dict(result)["models"][0]["statistics"]["sequential"]["examples"]
    assert used["fgsm_eps0.05"] == used["fgsm_eps0.1"] == 360
    assert used["gaussian_sigma0.1"] < 360


def test_a_round_attacks_each_example_as_the_full_run_does() -> None:
    """Blocks are whole, in a seeded order, the short last block last; each round's batches
    start where their block starts in the test set."""
    plan = RoundPlan.of(n=100, round_size=24, block=8, batch_size=64, seed=3)
    assert plan.block == 8 and plan.blocks_per_round == 3 and plan.rounds == 5
    assert plan.order[-1] == 12  # examples 96..99
    assert sorted(plan.order) == list(range(13))
    everything = plan.indices(plan.rounds)
    assert sorted(everything.tolist()) == list(range(100))
    import torch

    from inferlink_audit.sweep import EvalData

    full = EvalData(torch.arange(100.0)[:, None], torch.arange(100), 64)
    data = plan.data(full, 1)
    for index, xb, _ in data.batches():
        start = data.offset(index)
        assert xb[:, 0].tolist() == list(range(start, start + len(xb)))
    assert RoundPlan.of(n=100, round_size=24, block=8, batch_size=64, seed=4).order != plan.order


# --------------------------------------------------------------------------- coverage
T = 9  # thresholds of the synthetic sweep; threshold 0 removes nothing
TAU = 0.05
N, ROUND, RESAMPLES, SIMULATIONS = 512, 64, 500, 150


def _truth(drop: float) -> tuple[np.ndarray, np.ndarray, float]:
    """A curve family with known truth: the population accuracy at each threshold, the
    removed fractions, and the true clean score φc."""
    removed = np.linspace(0.0, 1.0, T)
    p = 0.9 * np.clip(1.0 - removed * drop, 0.0, 1.0)
    phi = integrate(p / p[0] - baseline(removed))
    return p, removed, phi


def _drop_for(phi: float) -> float:
    """The drop whose true φc is ``phi`` (φc falls as the drop grows)."""
    lo, hi = 0.0, 3.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _truth(mid)[2] > phi else (lo, mid)
    return (lo + hi) / 2


def _sweep(outcomes: SweepOutcomes, removed: np.ndarray) -> SweepResult:
    zeros = Scores(0.0, 0.0, 0.0)
    return SweepResult(
        scope="local", layer="synthetic", filter="low_pass", attack="none", numel=1,
        thresholds=list(removed), removed_fraction=list(removed),
        clean_accuracy=[0.0] * T, adversarial_accuracy=[0.0] * T, scores=zeros,
        labels=Labels("robust", "robust"), targeted=False, outcomes=outcomes,
    )  # fmt: skip


def _covered_at_stop(drop: float, look: float, seed: int) -> tuple[bool, bool]:
    """One simulated test set, evaluated in rounds with the engine's own loop, stopping rule
    and bootstrap: (whether the φc interval at stop covers the truth, whether it stopped)."""
    p, removed, phi = _truth(drop)
    rng = np.random.default_rng(seed)
    latent = rng.random(N)
    bits = latent[None, :] < p[:, None]  # nested: removing more never fixes an example
    plan = RoundPlan.of(N, ROUND, 8, N, seed)
    weights: dict[int, np.ndarray] = {}

    def weights_of(m: int) -> np.ndarray:
        if m not in weights:
            weights[m] = resample_weights(resample_indices(m, RESAMPLES, seed))
        return weights[m]

    def evaluate_round(r: int, keys: list[Any]) -> dict[Any, SweepResult]:
        part = bits[:, plan.indices(r + 1, r)]
        packed, first = np.packbits(part, axis=-1), np.packbits(part[0])
        return {"s": _sweep(SweepOutcomes(part.shape[1], packed, packed, first, first), removed)}

    def draws(sweep: SweepResult) -> Any:
        assert sweep.outcomes is not None
        w = weights_of(sweep.outcomes.n)
        return bootstrap_sweep(sweep.outcomes, sweep.removed_fraction, w, TAU)

    def settled(sweeps: list[SweepResult]) -> list[bool]:
        return [labels_decided(draws(s), look) for s in sweeps]

    (final,) = run_in_rounds(
        ["s"], plan, evaluate_round, lambda parts: merge_rounds(parts, plan, TAU), settled
    )
    lo, hi = percentile_interval(draws(final).scores["clean"], look)
    assert final.sequential is not None
    return lo <= phi <= hi, final.sequential.stopped_early


def _coverage(drop: float, look: float) -> tuple[float, float]:
    runs = [_covered_at_stop(drop, look, seed) for seed in range(SIMULATIONS)]
    return float(np.mean([c for c, _ in runs])), float(np.mean([s for _, s in runs]))


def test_sequential_stopping_keeps_the_coverage_that_the_uncorrected_rule_loses() -> None:
    """Over 150 simulated test sets of 512 examples from a synthetic curve family with known
    φc, evaluated in 8 rounds of 64: with the Bonferroni look confidence the φc interval at
    stop covers the truth in ≈ 95 % of test sets (measured 93 %, as one look at the whole
    test set: 92 %) even for a truth on the label boundary, where any stop is wrong; looking
    at 0.95 after every round covers only 76 % there. A clearly fragile truth (φc = -0.3)
    stops early in every test set and is covered in 98 %."""
    rounds = RoundPlan.of(N, ROUND, 8, N, 0).rounds
    corrected = look_confidence(0.95, rounds)
    boundary = _drop_for(-TAU)
    covered, _ = _coverage(boundary, corrected)
    uncorrected, _ = _coverage(boundary, 0.95)
    assert covered >= 0.90  # 0.95 less three simulation standard errors
    assert uncorrected <= covered - 0.10
    clear, stopped = _coverage(_drop_for(-0.3), corrected)
    assert clear >= 0.90 and stopped >= 0.9
    # docs/method.md §8 quotes these seeded runs: the page says what the simulation gives.
    method = " ".join((Path(__file__).parents[1] / "docs" / "method.md").read_text().split())
    quoted = re.search(
        r"covers the truth in (\d+) % of test sets .*? against (\d+) % when every look .*? "
        r"stops early in every test set and is covered in (\d+) %",
        method,
    )
    assert quoted is not None
    measured = (round(100 * covered), round(100 * uncorrected), round(100 * clear))
    assert measured == tuple(int(n) for n in quoted.groups()) and stopped == 1.0


def test_a_reopened_sweep_is_looked_at_again_and_goes_on_only_while_undecided() -> None:
    """What bf16 confirmation relies on: after a first run, a key's rounds replaced and the
    key reopened, it is looked at on what it has, evaluated further only while ``settled``
    says no, and the other keys are never evaluated again."""
    removed = np.linspace(0.0, 1.0, T)
    plan = RoundPlan.of(N, ROUND, 8, N, 0)
    bits = np.ones((T, N), dtype=bool)
    calls: list[tuple[int, list[Any]]] = []

    def evaluate_round(r: int, keys: list[Any]) -> dict[Any, SweepResult]:
        calls.append((r, list(keys)))
        part = bits[:, plan.indices(r + 1, r)]
        packed, first = np.packbits(part, axis=-1), np.packbits(part[0])
        outcomes = SweepOutcomes(part.shape[1], packed, packed, first, first)
        return {key: _sweep(outcomes, removed) for key in keys}

    def merge(parts: list[SweepResult]) -> SweepResult:
        return merge_rounds(parts, plan, TAU)

    needed = {"a": 2, "b": 2}

    def settled(sweeps: list[SweepResult]) -> list[bool]:
        return [
            s.outcomes is not None and s.outcomes.n >= ROUND * needed[key]
            for key, s in zip("ab", sweeps, strict=True)
        ]

    parts: dict[Any, list[SweepResult]] = {}
    first = run_in_rounds(["a", "b"], plan, evaluate_round, merge, settled, parts)
    assert calls == [(0, ["a", "b"]), (1, ["a", "b"])]
    assert [s.sequential.rounds for s in first if s.sequential] == [2, 2]
    calls.clear()
    needed["a"] = 5  # confirmed in another precision, "a" is no longer decided
    again = run_in_rounds(["a", "b"], plan, evaluate_round, merge, settled, parts, reopen=["a"])
    assert calls == [(2, ["a"]), (3, ["a"]), (4, ["a"])]
    records = [s.sequential for s in again]
    assert [(r.rounds, r.decided) for r in records if r] == [(5, True), (2, True)]
    calls.clear()
    run_in_rounds(["a", "b"], plan, evaluate_round, merge, settled, parts, reopen=["b"])
    assert calls == []  # "b" is decided on what it has: not evaluated again


def test_a_sweep_that_closed_decided_stays_recorded_as_decided() -> None:
    """A check reading two sweeps can turn uncertain after one of them closed (the other's
    later rounds widen its interval); the closed sweep is not evaluated further and its record
    keeps the decision it closed on (on digits, two pulse sweeps stopped on 320 of 360
    examples were recorded undecided and counted as having run out of data)."""
    removed = np.linspace(0.0, 1.0, T)
    plan = RoundPlan.of(N, ROUND, 8, N, 0)
    bits = np.ones((T, N), dtype=bool)

    def evaluate_round(r: int, keys: list[Any]) -> dict[Any, SweepResult]:
        part = bits[:, plan.indices(r + 1, r)]
        packed, first = np.packbits(part, axis=-1), np.packbits(part[0])
        outcomes = SweepOutcomes(part.shape[1], packed, packed, first, first)
        return {key: _sweep(outcomes, removed) for key in keys}

    def settled(sweeps: list[SweepResult]) -> list[bool]:
        a, b = (s.outcomes.n if s.outcomes is not None else 0 for s in sweeps)
        # "a" is decided from round 2 on while "b" has under 3 rounds; "b" from round 4 on.
        return [a >= 2 * ROUND and b < 3 * ROUND, b >= 4 * ROUND]

    def merge(parts: list[SweepResult]) -> SweepResult:
        return merge_rounds(parts, plan, TAU)

    parts: dict[Any, list[SweepResult]] = {}
    swept = run_in_rounds(["a", "b"], plan, evaluate_round, merge, settled, parts)
    records = [s.sequential for s in swept]
    assert [(r.rounds, r.stopped_early, r.decided) for r in records if r] == [
        (2, True, True),
        (4, True, True),
    ]
    # "b" reopened (its rounds confirmed in another precision): "a" is not looked at again and
    # keeps its decision, though the check it reads now reads "b"'s 4 rounds.
    again = run_in_rounds(["a", "b"], plan, evaluate_round, merge, settled, parts, reopen=["b"])
    assert [s.sequential.decided for s in again if s.sequential] == [True, True]


# --------------------------------------------------------------------------- spec errors
def test_sequential_with_fast_batched_passes_is_a_spec_error_naming_the_key(
    tmp_path: Path,
) -> None:
    path = write_spec(
        tmp_path,
        filtering={"fast": True},
        statistics={"sequential": {"round": 64}},
    )
    with pytest.raises(SpecError, match=r"statistics\.sequential.*filtering\.fast") as caught:
        load_spec(path)
    line = next(
        i for i, text in enumerate(path.read_text().splitlines(), 1) if "sequential" in text
    )
    assert f"audit.yaml:{line}" in str(caught.value)


def test_a_misspelt_sequential_key_is_a_spec_error_that_suggests_the_valid_one(
    tmp_path: Path,
) -> None:
    path = write_spec(tmp_path, statistics={"sequential": {"rounds": 64}})
    with pytest.raises(SpecError, match=r"rounds.*round"):
        load_spec(path)


def test_a_round_of_no_examples_is_a_spec_error(tmp_path: Path) -> None:
    path = write_spec(tmp_path, statistics={"sequential": {"round": 0}})
    with pytest.raises(SpecError, match=r"statistics\.sequential\.round"):
        load_spec(path)


# --------------------------------------------------------------------------- the plugin
def test_the_plugin_records_the_examples_each_item_used(pytester: pytest.Pytester) -> None:
    """Under pytest each item measures what it needs: results.json merges the examples every
    unfiltered accuracy used, and each item's JUnit properties carry its own."""
    write_spec(
        pytester.path,
        "spec.yaml",
        data=DATA,
        filtering={**FILTERING, "scopes": ["global"]},
        checks={"min_clean_accuracy": 0.90, "min_adversarial_accuracy": 0.30},
        statistics=SEQUENTIAL,
    )
    pytester.runpytest_subprocess(
        "--inferlink-audit", "spec.yaml", "--junitxml=junit.xml", "-p", "no:cacheprovider"
    ).assert_outcomes(passed=2)
    root = ET.parse(pytester.path / "junit.xml").getroot()
    used = {}
    for case in root.iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        used[props["check"]] = int(props["examples"])
    results = json.loads((pytester.path / "inferlink-report" / "results.json").read_text())
    examples = results["models"][0]["statistics"]["sequential"]["examples"]
    assert examples == {
        "clean_accuracy": used["min_clean_accuracy"],
        "fgsm_eps0.1": used["fgsm_eps0.1-min_adversarial_accuracy"],
    }
    assert max(examples.values()) < 360  # both minimums are clearly met: decided early
