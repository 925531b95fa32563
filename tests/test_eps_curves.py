"""ε curves: an attack's eps (gaussian's sigma) given as a list. Each value is measured as its
own attack, exactly as a single-ε spec measures it; the report draws accuracy against ε; the
adversarial-accuracy limit can be given per ε; bad shapes are spec errors naming the key."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from inferlink_audit.attack_sanity import SanityRunner
from inferlink_audit.audit import AuditSession, run_audit
from inferlink_audit.checks import SANITY_LIMITS, plan_checks
from inferlink_audit.eps_plots import eps_curve_figure
from inferlink_audit.errors import SpecError
from inferlink_audit.report import report_html
from inferlink_audit.results import (
    AuditResult,
    CheckResult,
    EpsCurve,
    ModelResult,
    result_to_dict,
)
from inferlink_audit.spec import FGSMSpec
from inferlink_audit.spec_loader import load_spec, parse_spec
from inferlink_audit.summary import text_summary

from .specs import digits_spec, write_spec
from .test_attack_sanity import Periodic

ONE_FILTER = {"thresholds": 3, "scopes": ["global"], "filters": ["low_pass"]}
FGSM_CURVE = [0.05, 0.1, 0.2]


def session_for(folder: Path, name: str, **overrides: Any) -> AuditSession:
    spec = write_spec(folder, f"{name}.yaml", filtering=ONE_FILTER, **overrides)
    return AuditSession(load_spec(spec))


def fgsm_by_hand(session: AuditSession, eps: float) -> float:
    """FGSM written out (sign of the input gradient of the cross-entropy, clamped to the box)
    on the session's own model and data: an accuracy computed without the library's attack."""
    p = session.prepared
    model, x, y = p.loaded.module, p.data.x, p.data.y
    point = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(point), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, point)
    with torch.no_grad():
        adversarial = (x + eps * grad.sign()).clamp(0.0, 1.0)
        return float((model(adversarial).argmax(1) == y).float().mean())


def wilson(p: float, n: int, z: float = 1.959963984540054) -> list[float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [centre - half, centre + half]


# --------------------------------------------------------------------------- measurements
def test_each_eps_of_a_list_measures_what_a_single_eps_run_measures(tmp_path: Path) -> None:
    curve = session_for(
        tmp_path,
        "curve",
        attacks=[{"fgsm": {"eps": FGSM_CURVE}}, {"pgd": {"eps": [0.05, 0.1], "steps": 3}}],
        statistics={"resamples": 100},
    )
    curves = curve.eps_curves()
    assert curves is not None and [c.label for c in curves] == ["fgsm", "pgd-linf(steps=3)"]
    fgsm, pgd = curves
    assert fgsm.values == FGSM_CURVE and fgsm.attacks == [f"fgsm_eps{e:g}" for e in FGSM_CURVE]
    n = curve.prepared.data.n
    for eps, accuracy, interval in zip(
        fgsm.values, fgsm.accuracy, fgsm.accuracy_ci or [], strict=True
    ):
        single = session_for(tmp_path, f"single{eps}", attacks=[{"fgsm": {"eps": eps}}])
        assert accuracy == single.attack_result(f"fgsm_eps{eps:g}").accuracy
        assert accuracy == pytest.approx(fgsm_by_hand(single, eps), abs=0.5 / n)
        assert interval == pytest.approx(wilson(accuracy, n), abs=1e-9)
    single_pgd = session_for(tmp_path, "pgd", attacks=[{"pgd": {"eps": 0.1, "steps": 3}}])
    assert pgd.accuracy[1] == single_pgd.attack_result("pgd_linf_eps0.1_steps3").accuracy
    # The accuracy falls along the curve on the digits CNN: the plot has something to show.
    assert fgsm.accuracy[0] > fgsm.accuracy[1] > fgsm.accuracy[2]


def test_sweeps_run_at_one_eps_the_first_listed_or_sweep_eps(tmp_path: Path) -> None:
    first = load_spec(write_spec(tmp_path, attacks=[{"fgsm": {"eps": [0.2, 0.05]}}]))
    assert [a.id for a in first.attack_specs] == ["fgsm_eps0.2"]
    chosen = load_spec(
        write_spec(tmp_path, "b.yaml", attacks=[{"fgsm": {"eps": [0.2, 0.05], "sweep_eps": 0.05}}])
    )
    assert [a.id for a in chosen.attack_specs] == ["fgsm_eps0.05"]
    assert [a.id for a in chosen.attack_points] == ["fgsm_eps0.2", "fgsm_eps0.05"]
    sweep_items = [p for p in plan_checks(chosen) if p.filter is not None]
    assert {p.attack for p in sweep_items} == {"fgsm_eps0.05"}


def test_a_single_eps_spec_writes_the_results_it_always_did(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, filtering=ONE_FILTER))
    result, _, _ = run_audit(spec)
    model = result_to_dict(result)["models"][0]
    assert "eps_curves" not in model
    assert model["attacks"][0]["params"] == {"eps": 0.1}
    assert all("examples" not in c and "examples_count" not in c for c in model["checks"])
    assert spec.attack_specs[0] == FGSMSpec(eps=0.1)


# --------------------------------------------------------------------------- checks per ε
def test_per_eps_limits_pass_and_fail_at_their_own_eps(tmp_path: Path) -> None:
    measured = session_for(tmp_path, "m", attacks=[{"fgsm": {"eps": FGSM_CURVE}}]).eps_curves()
    assert measured is not None
    low, _, high = measured[0].accuracy
    limits = [{"eps": 0.05, "value": low - 0.02}, {"eps": 0.2, "value": high + 0.02}]
    path = write_spec(
        tmp_path,
        "checks.yaml",
        filtering=ONE_FILTER,
        attacks=[{"fgsm": {"eps": FGSM_CURVE}}],
        checks={"min_adversarial_accuracy": limits, "attack_sanity": False},
    )
    result, planned, _ = run_audit(load_spec(path))
    checks = {c.id: c for c in result.models[0].checks}
    # One item per eps that has a limit; eps 0.1 has none.
    assert list(checks) == [
        "fgsm_eps0.05-min_adversarial_accuracy",
        "fgsm_eps0.2-min_adversarial_accuracy",
    ]
    assert checks["fgsm_eps0.05-min_adversarial_accuracy"].passed
    assert not checks["fgsm_eps0.2-min_adversarial_accuracy"].passed
    assert checks["fgsm_eps0.2-min_adversarial_accuracy"].limit == pytest.approx(high + 0.02)
    # Each item points at its own {eps, value} line.
    lines = path.read_text().splitlines()
    for p in planned:
        if p.check == "min_adversarial_accuracy":
            eps = p.attack.removeprefix("fgsm_eps")
            assert p.line is not None and f"eps: {eps}" in lines[p.line - 1]


def test_one_fraction_limits_every_eps_of_a_list(tmp_path: Path) -> None:
    spec = load_spec(
        write_spec(
            tmp_path,
            attacks=[{"fgsm": {"eps": FGSM_CURVE}}, {"gaussian": {"sigma": [0.1, 0.2]}}],
            checks={"min_adversarial_accuracy": 0.3},
        )
    )
    ids = [p.id for p in plan_checks(spec) if p.check == "min_adversarial_accuracy"]
    assert ids == [f"fgsm_eps{e:g}-min_adversarial_accuracy" for e in FGSM_CURVE] + [
        "gaussian_sigma0.1-min_adversarial_accuracy",
        "gaussian_sigma0.2-min_adversarial_accuracy",
    ]


BAD_SHAPES = [
    ("attacks: [{fgsm: {eps: []}}]", "attacks[0].fgsm.eps", "empty list"),
    ("attacks: [{fgsm: {eps: [0.1, -0.2]}}]", "attacks[0].fgsm.eps", "eps[1] is -0.2"),
    ("attacks: [{pgd: {eps: [0.1, 0.1]}}]", "attacks[0].pgd.eps", "lists 0.1 twice"),
    ("attacks: [{gaussian: {sigma: [0.1, x]}}]", "attacks[0].gaussian.sigma", "sigma[1] is 'x'"),
    (
        "attacks: [{fgsm: {eps: [0.1, 0.2], sweep_eps: 0.3}}]",
        "attacks[0].fgsm.sweep_eps",
        "not one of the listed eps (0.1, 0.2)",
    ),
    ("attacks: [{fgsm: {eps: 0.1, sweep_eps: 0.1}}]", "attacks[0].fgsm.sweep_eps", "as a list"),
    (
        "checks: {min_adversarial_accuracy: {eps: 0.1}}",
        "checks.min_adversarial_accuracy",
        "a list of {eps, value}",
    ),
    (
        "checks: {min_adversarial_accuracy: [{eps: 0.3, value: 0.5}]}",
        "checks.min_adversarial_accuracy",
        "eps 0.3, which no attack uses",
    ),
    (
        "checks: {min_adversarial_accuracy: [{eps: 0.1, value: 0.5}, {eps: 0.1, value: 0.4}]}",
        "checks.min_adversarial_accuracy",
        "eps 0.1 more than once",
    ),
    (
        "checks: {min_adversarial_accuracy: [{eps: 0.1, value: 1.5}]}",
        "checks.min_adversarial_accuracy[0].value",
        "must be at most 1",
    ),
    ("checks: {min_adversarial_accuracy: []}", "checks.min_adversarial_accuracy", "at least 1"),
    (
        "checks: {min_adversarial_accuracy: [{eps: 0.1, vlaue: 0.5}]}",
        "checks.min_adversarial_accuracy[0].vlaue",
        "did you mean 'value'?",
    ),
]


@pytest.mark.parametrize(("snippet", "key", "problem"), BAD_SHAPES)
def test_bad_shapes_are_spec_errors_naming_the_key(snippet: str, key: str, problem: str) -> None:
    data = digits_spec()
    data.update(yaml.safe_load(snippet))
    text = yaml.safe_dump(data, sort_keys=False)
    with pytest.raises(SpecError) as caught:
        parse_spec(text, path=Path("audit.yaml"))
    message = str(caught.value)
    assert message.startswith("audit.yaml:") and f": {key}: " in message, message
    assert problem in message, message


# --------------------------------------------------------------------------- the plot
def curve(label: str, values: list[float], accuracy: list[float], **kw: Any) -> EpsCurve:
    fields: dict[str, Any] = {"kind": label, "parameter": "eps", "norm": "linf"} | kw
    return EpsCurve(
        label=label,
        values=values,
        attacks=[f"{label}_{v:g}" for v in values],
        accuracy=accuracy,
        sweep_attack=f"{label}_{values[0]:g}",
        **fields,
    )


CURVES = [
    curve("fgsm", [0.05, 0.1, 0.2], [0.9, 0.5, 0.1], accuracy_ci=[[0.8, 0.95]] * 3),
    curve("pgd-linf(steps=10)", [0.05, 0.1], [0.85, 0.3]),
    curve("apgd-l2(ce, steps=100)", [0.5, 1.0, 2.0], [0.7, 0.4, 0.05], norm="l2"),
    curve("gaussian", [0.1, 0.3], [0.95, 0.6], parameter="sigma", norm=""),
]


def test_the_plot_has_one_series_per_attack_through_its_measured_points() -> None:
    fig = eps_curve_figure(CURVES, clean_accuracy=0.98)
    panels = {ax.get_title(loc="left"): ax for ax in fig.axes}
    assert sorted(panels) == [
        "accuracy against noise σ",
        "accuracy against ε (L2)",
        "accuracy against ε (L∞)",
    ]
    expected = {
        "accuracy against ε (L∞)": CURVES[:2],
        "accuracy against ε (L2)": CURVES[2:3],
        "accuracy against noise σ": CURVES[3:],
    }
    for title, members in expected.items():
        ax = panels[title]
        series = {line.get_label(): line for line in ax.get_lines() if line.get_marker() == "o"}
        assert sorted(series) == sorted(c.label for c in members)
        for c in members:
            assert list(series[c.label].get_xdata()) == c.values
            assert list(series[c.label].get_ydata()) == c.accuracy
        # A band only where the curve has intervals.
        assert len(ax.collections) == sum(c.accuracy_ci is not None for c in members)


def minimal_model(**kw: Any) -> ModelResult:
    fields: dict[str, Any] = {
        "name": "m",
        "checkpoint_sha256": "0" * 64,
        "n_examples": 100,
        "clean_accuracy": 0.98,
        "attacks": [],
        "sweeps": [],
        "lipschitz": None,
        "remediation": None,
        "checks": [],
    } | kw
    return ModelResult(**fields)


def test_the_report_draws_the_curves_inline_and_lists_their_points() -> None:
    html = report_html(AuditResult(meta={}, models=[minimal_model(eps_curves=CURVES)]))
    section = html.split('<section id="eps-curves">', 1)[1].split("</section>", 1)[0]
    assert '<svg xmlns="http://www.w3.org/2000/svg"' in section and 'id="svg-eps-m1"' in section
    assert "http" not in section.replace("http://www.w3.org/", "")  # nothing to fetch
    assert "ε 0.1: 50.0% [80.0%, 95.0%]" in section  # the table gives each point's number
    assert "ε 0.05 (fgsm_0.05)" in section  # where its sweeps ran
    plain = report_html(AuditResult(meta={}, models=[minimal_model()]))
    assert "No ε curves: give an attack's eps" in plain


# --------------------------------------------------------------------------- indicators
def test_eps_not_monotone_reads_the_curve_when_one_is_given() -> None:
    x = 0.3 + 0.4 * torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    model = Periodic(period=0.1)  # FGSM at half a period flips it, at a whole one does not
    with torch.no_grad():
        y = model(x).argmax(1)
    runner = SanityRunner(model, SimpleNamespace(x=x, y=y, batch_size=16), (0.0, 1.0), 0)
    limit = SANITY_LIMITS["eps_not_monotone"]
    alone = runner.measure("eps_not_monotone", FGSMSpec(eps=0.05), limit)
    assert alone.passed  # eps/2 = 0.025 does not see the rise
    points = [FGSMSpec(eps=0.05), FGSMSpec(eps=0.1)]
    along = runner.measure("eps_not_monotone", FGSMSpec(eps=0.05), limit, points)
    assert not along.passed and along.measured == 1.0
    assert "from eps=0.05 to eps=0.1" in along.detail and len(along.examples) == 40


def test_the_audit_indicator_uses_the_curve_the_attack_table_measured(tmp_path: Path) -> None:
    session = session_for(
        tmp_path,
        "s",
        attacks=[{"fgsm": {"eps": FGSM_CURVE}}],
        checks={"attack_sanity": True},
    )
    reading = session.attack_indicator("eps_not_monotone", "fgsm_eps0.05", 0.01)
    curves = session.eps_curves()
    assert curves is not None
    accuracy = curves[0].accuracy
    assert reading.measured == pytest.approx(max(b - a for a, b in pairwise(accuracy)))
    assert reading.passed and "along the eps curve" in reading.detail


def test_the_indicator_section_says_what_each_measures_which_examples_and_what_to_do() -> None:
    fired = CheckResult(
        id="pgd_linf_eps0.1_steps10-masked_gradients",
        passed=False,
        measured=0.5,
        limit=0.05,
        detail="input gradient … zero",
        check="masked_gradients",
        examples=[3, 7, 11],
        examples_count=3,
    )
    quiet = CheckResult(
        id="unstable_predictions",
        passed=True,
        measured=0.0,
        limit=0.0,
        detail="two forward passes agree",
        check="unstable_predictions",
        examples=[],
        examples_count=0,
    )
    other = CheckResult(id="min_clean_accuracy", passed=True, measured=0.9, limit=0.5, detail="")
    html = report_html(AuditResult(meta={}, models=[minimal_model(checks=[fired, quiet, other])]))
    section = html.split('<section id="sanity">', 1)[1].split("</section>", 1)[0]
    masked = section.split('id="sanity-masked_gradients"', 1)[1]
    assert "Masked gradients" in masked and "When it fires:</strong> Gradients are masked" in masked
    assert "<code>pgd_linf_eps0.1_steps10</code>" in masked and "3, 7, 11" in masked
    assert "50.0%" in masked and "≤ 5.0%" in masked
    assert 'id="sanity-unstable_predictions"' in section
    assert "min_clean_accuracy" not in section
    plain = report_html(AuditResult(meta={}, models=[minimal_model(checks=[other])]))
    assert "Attack-failure indicators: not run" in plain


def test_the_terminal_counts_quiet_and_fired_indicators() -> None:
    checks = [
        CheckResult("unstable_predictions", True, 0.0, 0.0, "", check="unstable_predictions"),
        CheckResult("fgsm_eps0.1-masked_gradients", False, 1.0, 0.05, "", check="masked_gradients"),
        CheckResult("min_clean_accuracy", True, 0.9, 0.5, "", check="min_clean_accuracy"),
    ]
    text = text_summary(AuditResult(meta={}, models=[minimal_model(checks=checks)]))
    assert "   attack-failure indicators: 1 quiet, 1 fired (fgsm_eps0.1-masked_gradients)" in text


def test_results_json_keeps_each_indicator_s_examples(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        filtering=ONE_FILTER,
        attacks=[{"fgsm": {"eps": [0.05, 0.1]}}],
        checks={"attack_sanity": True},
    )
    result, _, _ = run_audit(load_spec(path))
    data = json.loads(json.dumps(result_to_dict(result)))
    indicators = [c for c in data["models"][0]["checks"] if c["check"] in SANITY_LIMITS]
    assert {c["id"] for c in indicators} == {
        "unstable_predictions",
        "fgsm_eps0.05-masked_gradients",
        "fgsm_eps0.05-eps_not_monotone",
    }
    for check in indicators:
        assert check["examples_count"] == len(check["examples"])  # fewer than 100 here
    assert [c["values"] for c in data["models"][0]["eps_curves"]] == [[0.05, 0.1]]


def test_the_plugin_report_holds_the_curve_its_items_measured(tmp_path: Path) -> None:
    """The pytest plugin assembles results.json from its items' payloads: an item on a curve's
    sweep point measures every point, so the report has the same curve as a whole run."""
    from .plugin_items import assembled_from_items

    path = write_spec(tmp_path, filtering=ONE_FILTER, attacks=[{"fgsm": {"eps": FGSM_CURVE}}])
    spec = load_spec(path)
    session = AuditSession(spec)
    assembled = assembled_from_items(session)
    (model,) = assembled.models
    whole, _, _ = run_audit(load_spec(path))
    assert model.eps_curves == whole.models[0].eps_curves
    assert [a.id for a in model.attacks] == [f"fgsm_eps{e:g}" for e in FGSM_CURVE]
