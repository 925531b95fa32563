"""Statistics (issue 10, items 1-3): per-example outcomes, intervals and decisions on them."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from inferlink_audit.audit import AuditSession, run_audit
from inferlink_audit.cache import DiskSweepCache
from inferlink_audit.checks import PlannedCheck, evaluate_check
from inferlink_audit.results import (
    AttackResult,
    AuditResult,
    CheckResult,
    ModelResult,
    SweepOutcomes,
    SweepResult,
    read_results,
    result_to_dict,
    write_results,
)
from inferlink_audit.scores import held_tensors, integrate, score_curves
from inferlink_audit.spec import StatisticsSpec
from inferlink_audit.spec_loader import load_spec
from inferlink_audit.statistics import (
    LABELS,
    Sampling,
    SweepDraws,
    accuracy_interval,
    bootstrap_sweep,
    decide,
    fragile_fraction_draws,
    percentile_interval,
    resample_indices,
    resample_weights,
    sweep_statistics,
    wilson_interval,
)

from .specs import write_spec

pytest_plugins = ["pytester"]


def _outcomes(clean: np.ndarray, adversarial: np.ndarray, c0: np.ndarray, a0: np.ndarray):
    return SweepOutcomes(
        clean.shape[1],
        np.packbits(clean, axis=-1),
        np.packbits(adversarial, axis=-1),
        np.packbits(c0),
        np.packbits(a0),
    )


def _nested_outcomes(
    difficulty: np.ndarray, clean_truth: np.ndarray, adversarial_truth: np.ndarray
) -> SweepOutcomes:
    """Example i is correct at threshold t when its difficulty is below the true accuracy
    there: a coherent curve family whose expected accuracies are exactly the truths."""
    clean = difficulty[None, :] < clean_truth[1:, None]
    adversarial = difficulty[None, :] < adversarial_truth[1:, None]
    return _outcomes(
        clean, adversarial, difficulty < clean_truth[0], difficulty < adversarial_truth[0]
    )


# --------------------------------------------------------------------------- intervals
@pytest.mark.parametrize("p", [0.05, 0.5, 0.93])
def test_wilson_intervals_cover_the_true_accuracy_in_about_95_percent_of_test_sets(p):
    rng = np.random.default_rng(1)
    n = 200
    correct = rng.binomial(n, p, size=20_000)
    lo, hi = wilson_interval(correct, n, 0.95)
    coverage = float(np.mean((lo <= p) & (p <= hi)))
    assert 0.93 <= coverage <= 0.975


def test_wilson_interval_matches_the_textbook_value():
    # 81 of 263 at 95 %: Brown, Cai & DasGupta's running example gives (0.2553, 0.3662).
    lo, hi = wilson_interval(81, 263, 0.95)
    assert (round(float(lo), 4), round(float(hi), 4)) == (0.2553, 0.3662)


def test_bootstrap_intervals_of_the_scores_cover_the_true_scores():
    """Simulated test sets from a curve family with known truth: φc, φa and φΔ's 95 % paired
    bootstrap intervals cover the true scores in about 95 % of them."""
    thresholds = 9
    removed = np.linspace(0.0, 1.0, thresholds)
    clean_truth = np.concatenate([[0.9], 0.9 * (1.0 - removed**2)])
    adversarial_truth = np.concatenate([[0.5], 0.5 * (1.0 - removed)])
    base = 1.0 - removed
    true_c = integrate(clean_truth[1:] / clean_truth[0] - base)
    true_a = integrate(adversarial_truth[1:] / adversarial_truth[0] - base)
    true_d = true_a - true_c
    rng = np.random.default_rng(7)
    covered = np.zeros(3)
    trials = 300
    for trial in range(trials):
        outcomes = _nested_outcomes(rng.random(400), clean_truth, adversarial_truth)
        weights = resample_weights(resample_indices(400, 500, seed=trial))
        draws = bootstrap_sweep(outcomes, removed, weights, tolerance=0.05)
        for k, (key, truth) in enumerate(
            [("clean", true_c), ("adversarial", true_a), ("difference", true_d)]
        ):
            lo, hi = percentile_interval(draws.scores[key], 0.95)
            covered[k] += lo <= truth <= hi
    coverage = covered / trials
    assert np.all((coverage >= 0.88) & (coverage <= 0.99)), coverage


def test_paired_bootstrap_matches_a_slow_loop_over_resamples():
    """Same seed, same numbers: each resample's scores, labels and targeted flag equal what
    ``score_curves`` gives on the curves of that resample of the examples."""
    rng = np.random.default_rng(3)
    n, thresholds, resamples = 40, 6, 60
    clean = rng.random((thresholds, n)) < np.linspace(0.95, 0.2, thresholds)[:, None]
    adversarial = rng.random((thresholds, n)) < np.linspace(0.5, 0.1, thresholds)[:, None]
    c0, a0 = rng.random(n) < 0.95, rng.random(n) < 0.5
    removed = np.linspace(0.0, 1.0, thresholds)
    indices = resample_indices(n, resamples, seed=11)
    draws = bootstrap_sweep(
        _outcomes(clean, adversarial, c0, a0), removed, resample_weights(indices), 0.05
    )
    assert np.array_equal(indices, resample_indices(n, resamples, seed=11))
    for b, idx in enumerate(indices):
        slow = score_curves(
            clean[:, idx].mean(axis=1),
            adversarial[:, idx].mean(axis=1),
            removed,
            clean_reference=c0[idx].mean(),
            adversarial_reference=a0[idx].mean(),
            tolerance=0.05,
        )
        for key in ("clean", "adversarial", "difference"):
            assert draws.scores[key][b] == pytest.approx(getattr(slow.scores, key), abs=1e-12)
        for key in ("clean", "adversarial"):
            assert LABELS[draws.labels[key][b]] == getattr(slow.labels, key)
            assert draws.antifragile_area[key][b] == pytest.approx(
                getattr(slow.antifragile_area, key), abs=1e-12
            )
        assert bool(draws.targeted[b]) == slow.targeted


# --------------------------------------------------------------------------- decisions
@pytest.mark.parametrize(
    ("ci", "mode", "passed", "certain"),
    [
        ([0.30, 0.38], "strict", True, True),  # wholly within max 0.40
        ([0.33, 0.52], "strict", False, False),  # straddles: strict fails
        ([0.33, 0.52], "lenient", True, False),  # straddles: lenient passes
        ([0.33, 0.52], "estimate", True, False),  # the estimate 0.39 decides
        ([0.42, 0.50], "lenient", False, True),  # wholly beyond: even lenient fails
        ([0.42, 0.50], "estimate", True, True),  # estimate ignores the interval
    ],
)
def test_decide_modes_on_a_max_check(ci, mode, passed, certain):
    assert decide(0.39, 0.40, ci, "max", mode) == (passed, certain)


def test_fragile_fraction_draws_count_a_tied_tensor_once_as_the_point_value_does():
    # Three layers, a and b tied; per resample, each layer fragile or not.
    members = {"a": [("w", 30)], "b": [("w", 30)], "c": [("c.weight", 10)]}
    rng = np.random.default_rng(0)
    fragile = rng.random((3, 64)) < 0.5
    draws = [
        SweepDraws(
            scores={},
            antifragile_area={},
            labels={"clean": np.where(f, LABELS.index("fragile"), LABELS.index("robust"))},
            targeted=np.zeros(64, dtype=bool),
        )
        for f in fragile
    ]
    sweeps = [SimpleNamespace(layer=name, numel=n) for name, n in (("a", 30), ("b", 30), ("c", 10))]
    got = fragile_fraction_draws(draws, [held_tensors(s, members) for s in sweeps], "clean")
    for k in range(64):
        shared = fragile[0, k] or fragile[1, k]
        assert got[k] == pytest.approx((30 * shared + 10 * fragile[2, k]) / 40, abs=1e-15)


def test_decide_on_a_min_check_mirrors_the_max_check():
    assert decide(0.96, 0.95, [0.94, 0.98], "min", "strict") == (False, False)
    assert decide(0.94, 0.95, [0.93, 0.96], "min", "lenient") == (True, False)
    assert decide(0.94, 0.95, [0.90, 0.94], "min", "lenient") == (False, True)


class _Measured:
    """Constructed measurements: a clean accuracy and an attack on ``n`` examples."""

    def __init__(self, clean: float, adversarial: float, sampling: Sampling) -> None:
        self.clean, self.adversarial, self._sampling = clean, adversarial, sampling

    def clean_accuracy(self) -> float:
        return self.clean

    def attack_result(self, attack_id: str) -> AttackResult:
        return AttackResult(attack_id, "fgsm", {}, self.adversarial, 0.5, 0.1, 0.1)

    def sampling(self) -> Sampling:
        return self._sampling


def _sampling(mode: Any, n: int = 100) -> Sampling:
    return Sampling(0.95, mode, n, lambda f, a: [])


@pytest.mark.parametrize(
    ("mode", "passed"), [("estimate", True), ("strict", False), ("lenient", True)]
)
def test_a_clean_accuracy_just_above_its_minimum_passes_only_where_the_mode_allows(mode, passed):
    planned = PlannedCheck("min_clean_accuracy", "min_clean_accuracy", None, None, 0.9, 3, "m")
    result = evaluate_check(planned, _Measured(0.93, 0.5, _sampling(mode)))  # type: ignore[arg-type]
    assert result.passed is passed
    assert result.ci == accuracy_interval(0.93, 100, 0.95)
    assert result.certain is False
    assert "95% interval [0.86, 0.97], uncertain" in result.detail


def test_lenient_fails_an_adversarial_accuracy_whose_whole_interval_is_below_the_minimum():
    planned = PlannedCheck(
        "fgsm-min_adversarial_accuracy", "min_adversarial_accuracy", None, "fgsm", 0.6, 3, "m"
    )
    result = evaluate_check(planned, _Measured(0.9, 0.3, _sampling("lenient", n=400)))  # type: ignore[arg-type]
    assert (result.passed, result.certain) == (False, True)
    assert result.detail.endswith("(lenient: fails)")


# --------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def digits_session() -> AuditSession:
    spec = load_spec(Path(__file__).resolve().parents[1] / "example_audits" / "digits.yaml")
    filtering = spec.filtering.model_copy(update={"filters": ["low_pass"]})
    return AuditSession(spec.model_copy(update={"filtering": filtering}), device="cpu")


def test_per_example_bits_sum_to_the_reported_accuracies_on_the_digits_example(digits_session):
    sweeps = digits_session.sweeps("low_pass", "fgsm_eps0.1")
    n = digits_session.prepared.data.n
    for sweep in sweeps:
        outcomes = sweep.outcomes
        assert outcomes is not None and outcomes.n == n
        clean = outcomes.unpacked(outcomes.clean).sum(axis=1)
        adversarial = outcomes.unpacked(outcomes.adversarial).sum(axis=1)
        assert list(clean / n) == sweep.clean_accuracy
        assert list(adversarial / n) == sweep.adversarial_accuracy
        unfiltered = outcomes.unpacked(outcomes.unfiltered_clean).sum() / n
        assert unfiltered == digits_session.clean_accuracy()
    attack = digits_session.attack_result("fgsm_eps0.1")
    assert outcomes.unpacked(outcomes.unfiltered_adversarial).sum() / n == attack.accuracy


class _Layers:
    """Constructed local sweeps of one (filter, attack) with their per-example outcomes."""

    def __init__(self, sweeps: list[SweepResult], sampling: Sampling) -> None:
        self._sweeps, self._sampling = sweeps, sampling

    def sweeps(self, filter_name: str, attack_id: str) -> list[SweepResult]:
        return self._sweeps

    def scope_members(self) -> None:
        return None

    def sampling(self) -> Sampling:
        return self._sampling


def test_fragile_fraction_and_targeted_intervals_are_percentiles_of_resampled_audits():
    """Six layers whose adversarial curves sit near the fragile boundary, each on its own
    examples: the max_fragile_fraction (on adversarial) and max_targeted_layers intervals equal
    the 2.5/97.5 percentiles of those numbers recomputed from each resample of the examples
    with ``score_curves``, weights counted by numel."""
    rng = np.random.default_rng(21)
    n, resamples, tau = 200, 300, 0.05
    removed = np.linspace(0.0, 0.8, 5)
    numels = [10, 20, 40, 80, 160, 320]
    indices = resample_indices(n, resamples, 0)
    weights = resample_weights(indices)
    sweeps, draws = [], []
    fractions, targeted = np.zeros(resamples), np.zeros(resamples)
    for j, numel in enumerate(numels):
        # clean a little off the baseline (robust); adversarial near r = b - τ, so both its
        # label and the targeted flag (φΔ < -τ, not φa < -τ) change from resample to resample
        clean_truth = np.concatenate([[0.9], 0.9 * (1.0 - removed + 0.03 * (j % 3 - 1))])
        shift = tau + 0.01 * (j - 2.5)
        adversarial_truth = np.concatenate([[0.6], 0.6 * (1.0 - removed - shift)])
        difficulty = rng.random(n)
        outcomes = _nested_outcomes(difficulty, clean_truth, adversarial_truth)
        clean = difficulty[None, :] < clean_truth[1:, None]
        adversarial = difficulty[None, :] < adversarial_truth[1:, None]
        point = score_curves(
            clean.mean(axis=1),
            adversarial.mean(axis=1),
            removed,
            clean_reference=float(np.mean(difficulty < 0.9)),
            adversarial_reference=float(np.mean(difficulty < 0.6)),
            tolerance=tau,
        )
        sweeps.append(
            SweepResult(
                "local", f"l{j}", "low_pass", "fgsm", numel, [], list(removed), [], [],
                point.scores, point.labels, point.targeted, outcomes=outcomes,
            )
        )  # fmt: skip
        draws.append(bootstrap_sweep(outcomes, removed, weights, tau))
        for b, idx in enumerate(indices):
            scored = score_curves(
                clean[:, idx].mean(axis=1),
                adversarial[:, idx].mean(axis=1),
                removed,
                clean_reference=float(np.mean(difficulty[idx] < 0.9)),
                adversarial_reference=float(np.mean(difficulty[idx] < 0.6)),
                tolerance=tau,
            )
            fractions[b] += numel * (scored.labels.adversarial == "fragile") / sum(numels)
            targeted[b] += scored.targeted
    assert len(set(fractions)) > 10 and len(set(targeted)) > 2  # the resamples disagree
    measurements = _Layers(sweeps, Sampling(0.95, "estimate", n, lambda f, a: draws))
    for check, values in (("max_fragile_fraction", fractions), ("max_targeted_layers", targeted)):
        planned = PlannedCheck(check, check, "low_pass", "fgsm", 0.5, 3, "m", "adversarial")
        result = evaluate_check(planned, measurements)  # type: ignore[arg-type]
        expected = np.percentile(values, [2.5, 97.5]).tolist()
        assert result.ci == pytest.approx(expected, abs=1e-9), check


def test_the_sweep_cache_keeps_per_example_outcomes(digits_session, tmp_path):
    sweeps = digits_session.sweeps("low_pass", "fgsm_eps0.1")
    cache = DiskSweepCache(tmp_path)
    cache.put("ab" * 16, sweeps)
    back = cache.get("ab" * 16)
    assert back is not None and cache.hits == 1
    for before, after in zip(sweeps, back, strict=True):
        assert after.outcomes is not None and before.outcomes is not None
        for key in ("clean", "adversarial", "unfiltered_clean", "unfiltered_adversarial"):
            assert np.array_equal(getattr(after.outcomes, key), getattr(before.outcomes, key))
    assert back == sweeps  # outcomes aside (compare=False), the sweep reads back equal


def test_a_cache_entry_without_outcomes_is_recomputed_when_statistics_are_asked(
    digits_session, tmp_path
):
    spec = digits_session.spec.model_copy(update={"statistics": StatisticsSpec(resamples=200)})
    cache = DiskSweepCache(tmp_path)
    stale = [replace(s, outcomes=None) for s in digits_session.sweeps("low_pass", "fgsm_eps0.1")]
    session = AuditSession(spec, device="cpu", cache=cache)
    cache.put(session.cache_key("low_pass", "fgsm_eps0.1"), stale)
    sweeps = session.sweeps("low_pass", "fgsm_eps0.1")
    assert session.computed_sweeps == 1
    assert all(s.statistics is not None for s in sweeps)


def _strip(value: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_strip(v, keys) for v in value]
    return value


ADDED = ("statistics", "ci", "certain", "accuracy_ci", "clean_accuracy_ci")


def test_statistics_are_opt_in_and_leave_every_number_as_it_was(tmp_path):
    """Without ``statistics:`` results.json has none of its fields; with it, removing them
    gives the same file (same numbers, same decisions under ``estimate``)."""
    checks = {
        "min_clean_accuracy": 0.9,
        "max_fragile_fraction": 0.4,
        "max_targeted_layers": 2,
        "min_adversarial_accuracy": 0.3,
    }
    data = {
        "source": "sklearn_digits",
        "limit": 120,
        "batch_size": 50,  # several batches: outcomes are concatenated across them
        "normalize": {"mean": [0.5], "std": [0.5]},
    }
    plain_path = write_spec(tmp_path, "plain.yaml", checks=checks, data=data)
    stats_path = write_spec(
        tmp_path, "stats.yaml", checks=checks, data=data, statistics={"resamples": 200}
    )
    plain, _, _ = run_audit(load_spec(plain_path))
    with_stats, _, _ = run_audit(load_spec(stats_path))
    plain_dict, stats_dict = result_to_dict(plain), result_to_dict(with_stats)
    for d in (plain_dict, stats_dict):
        d.pop("meta")
        d["models"][0].pop("spec_path")
    assert _strip(plain_dict, ADDED) == plain_dict  # nothing added without statistics
    assert "outcomes" not in str(plain_dict) and "outcomes" not in str(stats_dict)
    # Each check's detail gains its interval after today's text.
    plain_checks, stats_checks = (
        plain_dict["models"][0]["checks"],
        stats_dict["models"][0]["checks"],
    )
    for before, after in zip(plain_checks, stats_checks, strict=True):
        assert after["detail"].startswith(before["detail"] + "; 95% interval [")
        after["detail"] = before["detail"]
    assert _strip(stats_dict, ADDED) == plain_dict
    model = stats_dict["models"][0]
    assert model["statistics"] == {"confidence": 0.95, "resamples": 200, "decide": "estimate"}
    assert all(len(c["ci"]) == 2 and c["certain"] in (True, False) for c in model["checks"])
    sweep = model["sweeps"][0]["statistics"]
    assert set(sweep["label_probability"]["clean"]) == set(LABELS)
    assert sum(sweep["label_probability"]["adversarial"].values()) == pytest.approx(1.0)
    for key in ("clean", "adversarial", "difference"):
        lo, hi = sweep["scores_ci"][key]
        assert lo <= hi


def test_a_sweep_of_mixed_labels_reports_each_labels_probability():
    """Constructed outcomes whose clean score sits on the fragile boundary: the recorded
    label probabilities, targeted probability and score intervals equal what ``score_curves``
    gives resample by resample (label counts, and the 2.5/97.5 percentiles of the scores)."""
    rng = np.random.default_rng(5)
    n, thresholds, resamples = 300, 5, 400
    removed = np.linspace(0.0, 0.8, thresholds)
    # true clean curve: r = b - 0.05 (φ = -0.05 = -τ); adversarial falls a little faster
    clean_truth = np.concatenate([[0.8], 0.8 * (1.0 - removed - 0.05)])
    adversarial_truth = np.concatenate([[0.5], 0.5 * (1.0 - removed - 0.08)])
    difficulty = rng.random(n)
    outcomes = _nested_outcomes(difficulty, clean_truth, adversarial_truth)
    indices = resample_indices(n, resamples, 0)
    draws = bootstrap_sweep(outcomes, removed, resample_weights(indices), 0.05)
    stats = sweep_statistics(outcomes, draws, 0.95)
    clean = difficulty[None, :] < clean_truth[1:, None]
    adversarial = difficulty[None, :] < adversarial_truth[1:, None]
    slow = [
        score_curves(
            clean[:, idx].mean(axis=1),
            adversarial[:, idx].mean(axis=1),
            removed,
            clean_reference=float(np.mean(difficulty[idx] < clean_truth[0])),
            adversarial_reference=float(np.mean(difficulty[idx] < adversarial_truth[0])),
            tolerance=0.05,
        )
        for idx in indices
    ]
    for response in ("clean", "adversarial"):
        labels = [getattr(s.labels, response) for s in slow]
        expected = {label: labels.count(label) / resamples for label in LABELS}
        assert stats.label_probability[response] == pytest.approx(expected, abs=1e-12)
    assert 0.05 < stats.label_probability["clean"]["fragile"] < 0.95  # both labels occur
    targeted = sum(s.targeted for s in slow) / resamples
    assert 0.05 < targeted < 0.95
    assert stats.targeted_probability == pytest.approx(targeted, abs=1e-12)
    for key in ("clean", "adversarial", "difference"):
        scores = [getattr(s.scores, key) for s in slow]
        expected_ci = np.percentile(scores, [2.5, 97.5]).tolist()
        assert stats.scores_ci[key] == pytest.approx(expected_ci, abs=1e-9), key


def test_results_json_reads_back_the_statistics(digits_session, tmp_path):
    spec = digits_session.spec.model_copy(update={"statistics": StatisticsSpec(resamples=100)})
    session = AuditSession(spec, device="cpu")
    sweeps = session.sweeps("low_pass", "fgsm_eps0.1")
    model = ModelResult("m", "", 1, 1.0, [], sweeps, None, None, [], clean_accuracy_ci=[0.9, 1.0])
    path = write_results(AuditResult(meta={}, models=[model]), tmp_path / "results.json")
    back = read_results(path).models[0]
    assert back.sweeps == sweeps and back.clean_accuracy_ci == [0.9, 1.0]
    assert back.sweeps[0].statistics is not None and back.sweeps[0].outcomes is None


# --------------------------------------------------------------------------- what people read
def test_report_shows_intervals_uncertainty_and_curve_bands(digits_session, tmp_path):
    from inferlink_audit.report import render_report

    spec = digits_session.spec.model_copy(
        update={"statistics": StatisticsSpec(resamples=200), "report": {"dir": tmp_path}}
    )
    result, _, _ = run_audit(spec, device="cpu")
    model = result.models[0]
    plain = replace(
        result,
        models=[
            replace(
                model,
                statistics=None,
                clean_accuracy_ci=None,
                checks=[replace(c, ci=None, certain=None) for c in model.checks],
                sweeps=[replace(s, statistics=None) for s in model.sweeps],
            )
        ],
    )
    html = render_report(result, tmp_path / "stats").read_text(encoding="utf-8")
    plain_html = render_report(plain, tmp_path / "plain").read_text(encoding="utf-8")
    clean = next(c for c in model.checks if c.check == "min_clean_accuracy")
    assert clean.ci is not None
    assert f"97.5% [{100 * clean.ci[0]:.1f}%, {100 * clean.ci[1]:.1f}%]" in html
    assert 'badge uncertain"' not in plain_html and "interval in brackets" not in plain_html
    assert "95 % interval in brackets" in html
    uncertain = [c for c in model.checks if c.certain is False]
    assert html.count('class="badge uncertain"') == len(uncertain)
    # Each panel gains two bands (clean, adversarial): more filled areas than without.
    assert html.count("<path") > plain_html.count("<path")


def test_plugin_shows_intervals_in_junit_the_terminal_and_the_step_summary(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64 examples: a clean accuracy near 0.98 is certainly above 0.5 and uncertain against
    # 0.97, whose Wilson interval reaches well below it.
    write_spec(
        pytester.path,
        "spec.yaml",
        data={
            "source": "sklearn_digits",
            "limit": 64,
            "batch_size": 64,
            "normalize": {"mean": [0.5], "std": [0.5]},
        },
        filtering={"thresholds": 5, "scopes": ["local"], "filters": ["low_pass"]},
        checks={"min_clean_accuracy": 0.97, "max_targeted_layers": 4},
        statistics={"resamples": 200, "decide": "strict"},
    )
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    run = pytester.runpytest_subprocess(
        "--inferlink-audit", "spec.yaml", "--junitxml=junit.xml", "-p", "no:cacheprovider"
    )
    root = ET.parse(pytester.path / "junit.xml").getroot()
    cases = {case.get("name"): case for case in root.iter("testcase")}
    clean = cases["digits-small[min_clean_accuracy]"]
    props = {p.get("name"): p.get("value") for p in clean.iter("property")}
    lo, hi = float(props["ci_low"]), float(props["ci_high"])
    # The 95 % Wilson interval of the measured accuracy on 64 examples, written out.
    p, n, z = float(props["measured"]), 64, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    assert p == pytest.approx(63 / 64)  # 63 of the 64 digits right
    assert (lo, hi) == pytest.approx((centre - half, min(1.0, centre + half)), abs=1e-9)
    assert lo < 0.97 < hi and props["certain"] == "False"
    assert props["passed"] == "False"  # strict: the interval is not wholly above 0.97
    assert "uncertain" in run.stdout.str() and "1 uncertain" in run.stdout.str()
    failure = clean.find("failure")
    assert failure is not None and "interval: [" in (failure.text or "")
    text = summary.read_text()
    assert re.search(r"\| `min_clean_accuracy` \| ❌ fail \(uncertain\) \| 0\.98\d* \[", text)


def test_the_command_line_summary_counts_and_lists_uncertain_decisions():
    from inferlink_audit.summary import text_summary

    checks = [
        CheckResult("a", True, 0.39, 0.4, "a detail", ci=[0.3, 0.5], certain=False),
        CheckResult("b", True, 0.1, 0.4, "b detail", ci=[0.05, 0.2], certain=True),
        CheckResult("c", False, 0.45, 0.4, "c detail", ci=[0.35, 0.5], certain=False),
    ]
    stats = {"confidence": 0.9, "resamples": 1000, "decide": "estimate"}
    model = ModelResult("m", "", 10, 1.0, [], [], None, None, checks, statistics=stats)
    text = text_summary(AuditResult(meta={}, models=[model]))
    assert "checks: 2 passed, 1 failed, 2 uncertain at 90%" in text
    assert "UNCERTAIN a: a detail" in text and "FAIL c: c detail" in text
    assert "UNCERTAIN b" not in text and "UNCERTAIN c" not in text
    plain = replace(
        model, statistics=None, checks=[replace(c, ci=None, certain=None) for c in checks]
    )
    assert "uncertain" not in text_summary(AuditResult(meta={}, models=[plain])).lower()


def test_a_statistics_typo_names_the_line_and_the_nearest_key(tmp_path):
    from inferlink_audit.errors import SpecError

    path = write_spec(tmp_path, statistics={"confidense": 0.9})
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "statistics" in message and "confidence" in message
    assert f"{path.name}:" in message
    with pytest.raises(SpecError, match="strict"):
        load_spec(write_spec(tmp_path, "b.yaml", statistics={"decide": "sure"}))
