"""The HTML report: sections, escaping, self-containment, numbers, size, atomic writes.

``build_result`` constructs a realistic synthetic AuditResult by hand (no torch), so these
tests pin the report's contract without running an audit. The HTML is parsed with the
standard library's ``html.parser`` into a tiny tree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from inferlink_audit import plots
from inferlink_audit.report import TEMPLATE_NAME, render_report, report_html, templates_root
from inferlink_audit.results import (
    AttackResult,
    AuditResult,
    CheckResult,
    Labels,
    LipschitzLayer,
    LipschitzResult,
    ModelResult,
    Scores,
    SweepResult,
    result_from_dict,
    result_to_dict,
)

HOSTILE = "<script>alert(1)</script>"
FILTERS = ("low_pass", "high_pass", "pulse")
TAU = 0.05
N_THRESHOLDS = 25
CLEAN_ACCURACY = 0.9722
FGSM_ACCURACY = 0.3141


# --------------------------------------------------------------------------- fixture builder
def _profile(kind: str, alpha_hat: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """A normalised response of a given character, as a function of the removed fraction."""
    if kind == "fragile":
        return (1.0 - rho) ** 2.5
    if kind == "antifragile":
        return np.minimum(1.0 + 0.25 * np.sin(np.pi * alpha_hat), 1.0 + 0.3 * (1.0 - rho))
    return 1.0 - 0.5 * rho


def _removed_fraction(filter_name: str, alpha_hat: np.ndarray) -> np.ndarray:
    if filter_name == "pulse":
        # A band around the threshold: most weights sit near zero, mid-sweep.
        return 0.02 + 0.3 * np.exp(-(((alpha_hat - 0.5) / 0.15) ** 2))
    return alpha_hat**1.2


def _label(r: np.ndarray, baseline: np.ndarray, x: np.ndarray) -> tuple[str, float, float]:
    """DESIGN §1.4 (trapezoid instead of Simpson: the report never recomputes, any rule does)."""
    phi = float(np.trapezoid(r - baseline, x))
    area = float(np.trapezoid(np.maximum(0.0, r - 1.0), x))
    if area > TAU:
        return "antifragile", phi, area
    if phi < -TAU:
        return "fragile", phi, area
    return "robust", phi, area


def _sweep(
    scope: str,
    layer: str | None,
    filter_name: str,
    attack: AttackResult,
    numel: int,
    clean_kind: str,
    adv_kind: str,
    layers: list[str] | None = None,
) -> SweepResult:
    x = np.linspace(0.0, 1.0, N_THRESHOLDS)
    rho = _removed_fraction(filter_name, x)
    baseline = 1.0 - rho
    rc = _profile(clean_kind, x, rho)
    ra = _profile(adv_kind, x, rho)
    by_clean = attack.accuracy == 0.0
    psi_a0 = CLEAN_ACCURACY if by_clean else attack.accuracy
    clean = np.clip(rc * CLEAN_ACCURACY, 0.0, 1.0)
    adversarial = np.clip(ra * psi_a0 * (0.2 if by_clean else 1.0), 0.0, 1.0)
    lc, pc, ac = _label(clean / CLEAN_ACCURACY, baseline, x)
    la, pa, aa = _label(adversarial / psi_a0, baseline, x)
    thresholds = np.linspace(-0.4, 0.45, N_THRESHOLDS)
    if filter_name == "low_pass":
        thresholds = thresholds[::-1]
    return SweepResult(
        scope=scope,
        layer=layer,
        filter=filter_name,
        attack=attack.id,
        numel=numel,
        thresholds=[round(float(t), 6) for t in thresholds],
        removed_fraction=[round(float(v), 6) for v in rho],
        clean_accuracy=[round(float(v), 6) for v in clean],
        adversarial_accuracy=[round(float(v), 6) for v in adversarial],
        scores=Scores(clean=pc, adversarial=pa, difference=pa - pc),
        labels=Labels(clean=lc, adversarial=la),
        targeted=(pa - pc) < -TAU,
        antifragile_area=Scores(clean=ac, adversarial=aa, difference=0.0),
        adversarial_normalised_by="clean" if by_clean else "adversarial",
        layers=layers or [],
        evaluated_variants=N_THRESHOLDS - 3,
    )


def build_result(
    *,
    n_layers: int = 3,
    two_attacks: bool = True,
    failing: bool = True,
    lipschitz: bool = False,
    remediation: bool = False,
    name: str = "digits-cnn",
) -> AuditResult:
    """A synthetic audit of a small CNN: a hostile layer name, 3 filters, local + global."""
    base = [("conv1", "Conv2d", 144), (HOSTILE, "Conv2d", 4608), ("fc", "Linear", 1290)]
    layers = [
        {"name": n, "type": t, "numel": k}
        for n, t, k in (
            base[:n_layers]
            if n_layers <= 3
            else base + [(f"blocks.{i}.conv", "Conv2d", 2304) for i in range(n_layers - 3)]
        )
    ]
    attacks = [
        AttackResult(
            id="fgsm_eps0.1",
            kind="fgsm",
            params={"eps": 0.1},
            accuracy=FGSM_ACCURACY,
            success_rate=0.6769,
            distortion_rms=0.0873,
            distortion_linf=0.1,
            distortion_l2=2.7934,
        )
    ]
    if two_attacks:
        attacks.append(
            AttackResult(
                id="pgd_eps0.3",
                kind="pgd",
                params={"eps": 0.3, "steps": 10, "step_size": 0.05, "norm": "linf"},
                accuracy=0.0,
                success_rate=1.0,
                distortion_rms=0.2411,
                distortion_linf=0.3,
                distortion_l2=7.7152,
            )
        )
    # conv1 takes filtering in its stride, the hostile layer breaks under attack, and fc
    # gains from it under attack (clean accuracy sits near 1, no room to gain there).
    kinds = [("robust", "robust"), ("robust", "fragile"), ("fragile", "antifragile")]
    sweeps = []
    for attack in attacks:
        for f in FILTERS:
            sweeps.append(
                _sweep(
                    "global",
                    None,
                    f,
                    attack,
                    sum(layer["numel"] for layer in layers),
                    "robust",
                    "fragile",
                    layers=[layer["name"] for layer in layers],
                )
            )
            for i, layer in enumerate(layers):
                clean_kind, adv_kind = kinds[i % len(kinds)]
                sweeps.append(
                    _sweep("local", layer["name"], f, attack, layer["numel"], clean_kind, adv_kind)
                )
    checks = [
        CheckResult(
            id="min_clean_accuracy",
            passed=True,
            measured=CLEAN_ACCURACY,
            limit=0.9,
            detail="clean accuracy 97.2% >= min 90.0%",
            check="min_clean_accuracy",
            line=20,
        ),
        CheckResult(
            id="fgsm_eps0.1-min_adversarial_accuracy",
            passed=True,
            measured=FGSM_ACCURACY,
            limit=0.3,
            detail="fgsm(eps=0.1): adversarial accuracy 31.4% >= min 30.0%",
            check="min_adversarial_accuracy",
            line=21,
        ),
        CheckResult(
            id="low_pass-fgsm_eps0.1-max_fragile_fraction",
            passed=not failing,
            measured=0.47 if failing else 0.12,
            limit=0.4,
            detail=(
                f"low_pass fgsm(eps=0.1): fragile fraction 0.47 > max 0.40 ({HOSTILE})"
                if failing
                else "low_pass fgsm(eps=0.1): fragile fraction 0.12 <= max 0.40"
            ),
            check="max_fragile_fraction",
            line=22,
            layers=[HOSTILE] if failing else [],
        ),
        CheckResult(
            id="low_pass-fgsm_eps0.1-max_targeted_layers",
            passed=True,
            measured=1.0,
            limit=2.0,
            detail="low_pass fgsm(eps=0.1): 1 targeted layer <= max 2",
            check="max_targeted_layers",
            line=23,
        ),
    ]
    model = ModelResult(
        name=name,
        checkpoint_sha256="3f" * 32,
        n_examples=512,
        clean_accuracy=CLEAN_ACCURACY,
        attacks=attacks,
        sweeps=sweeps,
        lipschitz=LipschitzResult(
            layers=[LipschitzLayer(layer["name"], 3.25 + i) for i, layer in enumerate(layers)],
            network_upper_bound=812.4,
        )
        if lipschitz
        else None,
        remediation={
            "frozen_layers": [HOSTILE],
            "trained_layers": ["conv1", "fc"],
            "checkpoint": "remediated/digits-cnn.safetensors",
            "selective": {
                "clean_before": 0.9722,
                "clean_after": 0.9611,
                "adversarial_before": 0.3141,
                "adversarial_after": 0.4017,
            },
            "control": {
                "clean_before": 0.9722,
                "clean_after": 0.9688,
                "adversarial_before": 0.3141,
                "adversarial_after": 0.3502,
            },
        }
        if remediation
        else None,
        checks=checks,
        spec_path="audits/release.yaml",
        layers=layers,
        tolerance=TAU,
        values="signed",
        adversarial_source="filtered",
    )
    meta = {
        "version": "0.1.0",
        "torch": "2.14.1",
        "device": "cpu",
        "seed": 0,
        "spec_sha256": "ab" * 32,
        "started": "2025-11-22T13:05:00+00:00",
        "seconds": 12.3,
        "timings": {"attacks": 1.21, "sweeps": 9.84},
        "deterministic": {"use_deterministic_algorithms": True, "cudnn_benchmark": False},
    }
    return AuditResult(meta=meta, models=[model])


# --------------------------------------------------------------------------- tiny HTML tree
class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], pos: int) -> None:
        self.tag = tag
        self.attrs = attrs
        self.pos = pos
        self.children: list[Node | str] = []

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str, cls: str | None = None) -> list[Node]:
        return [
            n
            for n in self.iter()
            if n.tag == tag and (cls is None or cls in (n.attrs.get("class") or "").split())
        ]

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def by_id(self, ident: str) -> Node:
        hits = [n for n in self.iter() if n.attrs.get("id") == ident]
        assert len(hits) == 1, f"{len(hits)} elements with id {ident!r}"
        return hits[0]


_VOID = {"meta", "link", "br", "hr", "img", "input", "col", "source", "wbr", "area", "base"}


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, 0)
        self.stack = [self.root]
        self.count = 0

    def _new(self, tag: str, attrs: list[tuple[str, str | None]]) -> Node:
        self.count += 1
        node = Node(tag, dict(attrs), self.count)
        self.stack[-1].children.append(node)
        return node

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = self._new(tag, attrs)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._new(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def norm(text: str) -> str:
    return " ".join(text.split())


def cells(row: Node) -> list[str]:
    return [norm(c.text()) for c in row.iter() if c.tag in ("td", "th")]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def failing_html() -> str:
    return report_html(build_result())


@pytest.fixture(scope="module")
def failing_doc(failing_html: str) -> Node:
    return parse(failing_html)


# --------------------------------------------------------------------------- tests
def test_templates_are_found() -> None:
    root = templates_root()
    assert root.joinpath(TEMPLATE_NAME).is_file()
    assert root.joinpath("report.css").is_file()


SECTIONS = [
    "summary",
    "checks",
    "labels",
    "targeted",
    "curves",
    "attacks",
    "lipschitz",
    "remediation",
    "metadata",
    "footer",
]


def test_all_sections_present_in_order(failing_doc: Node) -> None:
    positions = [failing_doc.by_id(ident).pos for ident in SECTIONS]
    assert positions == sorted(positions)


def test_an_inline_svg_per_plotted_scope(failing_doc: Node) -> None:
    details = failing_doc.by_id("curves").find_all("details", "scope")
    # global first, then the three layers in model order
    summaries = [norm(d.find_all("summary")[0].text()) for d in details]
    assert len(details) == 4
    assert summaries[0].startswith("global")
    assert summaries[1].startswith("conv1")
    assert summaries[2].startswith(HOSTILE)
    assert summaries[3].startswith("fc")
    for d in details:
        assert len(d.find_all("svg", "plot")) == 1
    assert "open" in details[0].attrs and all("open" not in d.attrs for d in details[1:])
    toc_links = [
        a.attrs["href"] for a in failing_doc.by_id("curves").find_all("nav")[0].find_all("a")
    ]
    assert toc_links == ["#" + d.attrs["id"] for d in details]


def test_ids_are_unique(failing_doc: Node) -> None:
    ids = [n.attrs["id"] for n in failing_doc.iter() if n.attrs.get("id")]
    assert len(ids) == len(set(ids))


def test_no_external_resources(failing_html: str, failing_doc: Node) -> None:
    assert not failing_doc.find_all("link")
    assert not failing_doc.find_all("img")
    assert not failing_doc.find_all("iframe")
    for node in failing_doc.iter():
        assert "src" not in node.attrs, node.tag
        for name in ("href", "xlink:href"):
            value = node.attrs.get(name) or ""
            assert not re.match(r"^\s*(https?:|//|file:|data:)", value), (node.tag, value)
    lowered = failing_html.lower()
    assert "@import" not in lowered
    assert "url(http" not in lowered and "url(//" not in lowered
    assert "@font-face" not in lowered


def test_hostile_layer_name_is_escaped_everywhere(failing_html: str, failing_doc: Node) -> None:
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in failing_html
    scripts = failing_doc.find_all("script")
    assert len(scripts) == 1  # our own optional helper, nothing injected
    assert "alert" not in scripts[0].text()
    assert "src" not in scripts[0].attrs
    for svg in failing_doc.find_all("svg"):
        assert not svg.find_all("script")
    # The name reached the plot too (suptitle), as text.
    svg_titles = [norm(t.text()) for t in failing_doc.find_all("text")]
    assert HOSTILE in svg_titles


def test_verdict_fail_when_a_check_fails(failing_doc: Node) -> None:
    header = failing_doc.by_id("summary")
    verdict = header.find_all("div", "verdict")[0]
    assert "FAIL" in verdict.text() and "fail" in verdict.attrs["class"].split()
    assert "3 of 4 checks passed, 1 failed" in norm(header.text())


def test_verdict_pass_when_all_checks_pass() -> None:
    doc = parse(report_html(build_result(failing=False, two_attacks=False)))
    verdict = doc.by_id("summary").find_all("div", "verdict")[0]
    assert "PASS" in verdict.text() and "FAIL" not in verdict.text()
    assert "4 of 4 checks passed, 0 failed" in norm(doc.by_id("summary").text())
    assert doc.find_all("title")[0].text().startswith("PASS")


def test_failing_check_listed_first_with_measured_and_limit(failing_doc: Node) -> None:
    rows = failing_doc.by_id("checks").find_all("tbody")[0].find_all("tr")
    cells = [norm(td.text()) for td in rows[0].find_all("td")]
    assert cells[0] == "✗ FAIL"
    assert cells[1] == "low_pass-fgsm_eps0.1-max_fragile_fraction"
    assert cells[2] == "0.470"
    assert cells[3] == "≤ 0.400"
    assert HOSTILE in cells[5]
    others = [norm(r.find_all("td")[1].text()) for r in rows[1:]]
    assert others == [
        "min_clean_accuracy",
        "fgsm_eps0.1-min_adversarial_accuracy",
        "low_pass-fgsm_eps0.1-max_targeted_layers",
    ]
    # Accuracy checks in percent, counts as integers.
    assert [norm(td.text()) for td in rows[1].find_all("td")][2:4] == ["97.2%", "≥ 90.0%"]
    assert [norm(td.text()) for td in rows[3].find_all("td")][2:4] == ["1", "≤ 2"]


def test_numbers_come_from_the_result(failing_doc: Node) -> None:
    result = build_result()
    model = result.models[0]
    assert "97.2%" in failing_doc.by_id("summary").text()
    attack_rows = failing_doc.by_id("attacks").find_all("tbody")[0].find_all("tr")
    fgsm = cells(attack_rows[0])
    assert fgsm == ["fgsm_eps0.1", "fgsm", "eps=0.1", "31.4%", "67.7%", "0.0873", "0.1", "2.793"]
    # Heat map: one row per layer (plus global), cell text = initial + score.
    heat = failing_doc.by_id("labels").find_all("table", "heat")[0]
    body_rows = heat.find_all("tbody")[0].find_all("tr")
    assert [norm(r.find_all("th")[0].text()) for r in body_rows] == [
        "global (all layers)",
        "conv1",
        HOSTILE,
        "fc",
    ]
    hostile_cells = body_rows[2].find_all("td", "cell")
    n_cols = 2 * len(FILTERS) * len(model.attacks)
    assert len(hostile_cells) == n_cols
    sweep = next(
        s
        for s in model.sweeps
        if s.layer == HOSTILE and s.filter == "low_pass" and s.attack == "fgsm_eps0.1"
    )
    clean_cell, adv_cell = hostile_cells[0], hostile_cells[1]
    assert f"lab-{sweep.labels.clean}" in clean_cell.attrs["class"]
    assert norm(clean_cell.text()).startswith(sweep.labels.clean[0].upper())
    assert f"{sweep.scores.clean:+.3f}" in clean_cell.text()
    assert sweep.labels.adversarial == "fragile"
    assert "lab-fragile" in adv_cell.attrs["class"]
    assert f"{sweep.scores.adversarial:+.3f}" in adv_cell.text()
    # Targeted layers: the hostile layer under low_pass/fgsm, with its φΔ.
    targeted = failing_doc.by_id("targeted").find_all("tbody")[0].find_all("tr")
    first = norm(targeted[0].text())
    assert sweep.targeted
    assert HOSTILE in first and f"{sweep.scores.difference:+.3f}" in first


def test_labels_read_in_greyscale(failing_doc: Node) -> None:
    """Colour is never the only signal: each cell has the initial, the word and the score."""
    heat_cells = failing_doc.by_id("labels").find_all("td", "cell")
    assert heat_cells
    for cell in heat_cells:
        label = next(c[4:] for c in cell.attrs["class"].split() if c.startswith("lab-"))
        initial = cell.find_all("span", "ini")[0].text()
        assert initial == {"fragile": "F", "robust": "R", "antifragile": "A"}[label]
        assert label in cell.find_all("span", "sr-only")[0].text()
        assert re.search(r"[+-]\d\.\d{3}", cell.text())
    labels = {c.attrs["class"].split()[-1] for c in heat_cells}
    assert labels == {"lab-fragile", "lab-robust", "lab-antifragile"}


def test_adversarial_normalised_by_clean_is_said(failing_doc: Node) -> None:
    curves = norm(failing_doc.by_id("curves").text())
    assert "pgd_eps0.3: ψa⁰ = 0, so the adversarial curve is normalised by the clean" in curves
    assert any("ra = ψa/ψc⁰ (ψa⁰ = 0)" in norm(t.text()) for t in failing_doc.find_all("text"))


def test_null_lipschitz_and_remediation_say_not_run(failing_doc: Node) -> None:
    assert norm(failing_doc.by_id("lipschitz").text()).endswith("Lipschitz analysis: not run.")
    assert norm(failing_doc.by_id("remediation").text()).endswith("Remediation: not run.")


def test_lipschitz_and_remediation_tables_when_present() -> None:
    doc = parse(report_html(build_result(lipschitz=True, remediation=True, two_attacks=False)))
    lip = doc.by_id("lipschitz").find_all("table")[0]
    assert cells(lip.find_all("tbody")[0].find_all("tr")[1]) == [HOSTILE, "4.25"]
    assert cells(lip.find_all("tfoot")[0]) == ["network", "812.4"]
    rem = doc.by_id("remediation")
    rows = rem.find_all("table")[0].find_all("tbody")[0].find_all("tr")
    assert cells(rows[0]) == [
        "selective (fragile layers frozen)",
        "97.2%",
        "96.1%",
        "31.4%",
        "40.2%",
    ]
    assert cells(rows[1]) == ["control (all layers trained)", "97.2%", "96.9%", "31.4%", "35.0%"]
    assert "remediated/digits-cnn.safetensors" in rem.text()


def test_metadata_lists_every_meta_key_and_definitions(failing_doc: Node) -> None:
    meta = norm(failing_doc.by_id("metadata").text())
    for text in ("0.1.0", "2.14.1", "cpu", "ab" * 32, "2025-11-22T13:05:00+00:00", "12.3 s"):
        assert text in meta
    nested = failing_doc.by_id("metadata").find_all("table", "nested")
    assert [[cells(r) for r in table.find_all("tr")] for table in nested] == [
        [["attacks", "1.21"], ["sweeps", "9.84"]],
        [["use_deterministic_algorithms", "true"], ["cudnn_benchmark", "false"]],
    ]
    assert "3f" * 32 in meta
    assert "τ = 0.05" in meta and "Values: signed" in meta
    assert "crafted against the filtered network" in meta


def test_several_models_and_consistency() -> None:
    first = build_result(two_attacks=False)
    second = build_result(two_attacks=False, failing=False, name="other")
    result = AuditResult(
        meta=first.meta,
        models=[first.models[0], second.models[0]],
        consistency={
            "agreement": 0.8333,
            "layers": [
                {
                    "layer": "conv1",
                    "filter": "low_pass",
                    "response": "adversarial",
                    "labels": {"digits-cnn": "fragile", "other": "robust"},
                }
            ],
        },
    )
    doc = parse(report_html(result))
    for ident in ("checks", "checks-2", "curves-2", "remediation-2", "consistency", "metadata"):
        doc.by_id(ident)
    assert "83.3%" in doc.by_id("consistency").text()
    assert "FAIL" in doc.by_id("summary").find_all("div", "verdict")[0].text()
    ids = [n.attrs["id"] for n in doc.iter() if n.attrs.get("id")]
    assert len(ids) == len(set(ids))


def test_missing_numbers_render_as_dashes() -> None:
    result = build_result(two_attacks=False)
    model = result.models[0]
    sweep = replace(model.sweeps[1], scores=Scores(math.nan, math.nan, math.nan))
    sweeps = [model.sweeps[0], sweep, *model.sweeps[2:]]
    broken = replace(result, models=[replace(model, sweeps=sweeps)])
    # Through JSON, as merge and baselines read it: NaN becomes null, then None.
    reread = result_from_dict(result_to_dict(broken))
    html = report_html(reread)
    assert "—" in norm(parse(html).by_id("labels").text())


def test_report_is_deterministic_and_survives_a_json_round_trip(failing_html: str) -> None:
    again = report_html(result_from_dict(result_to_dict(build_result())))
    assert again == failing_html


def test_render_report_writes_atomically(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out).mkdir()
    (out / "report.html").write_text("old")
    path = render_report(build_result(two_attacks=False), out)
    assert path == out / "report.html"
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]  # no temp file left
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert 'href="results.json"' in html


def test_results_link_uses_the_given_name(tmp_path: Path) -> None:
    html = render_report(build_result(two_attacks=False), tmp_path, results_name="run 1.json")
    assert 'href="run%201.json"' in html.read_text(encoding="utf-8")


def test_forty_layers_stay_small_and_navigable() -> None:
    html = report_html(build_result(n_layers=40, two_attacks=False))
    assert len(html.encode("utf-8")) < 5_000_000
    doc = parse(html)
    details = doc.by_id("curves").find_all("details", "scope")
    assert len(details) == 41
    assert len(doc.by_id("curves").find_all("nav")[0].find_all("a")) == 41
    assert len(doc.by_id("labels").find_all("tbody")[0].find_all("tr")) == 41


def test_response_curve_svg_is_small_prefixed_and_clean() -> None:
    before = dict(matplotlib.rcParams)
    result = build_result(two_attacks=False)
    model = result.models[0]
    sweeps = [s for s in model.sweeps if s.layer == HOSTILE]
    svg = plots.response_curves_svg(model, sweeps, title=HOSTILE, id_prefix="t1")
    assert dict(matplotlib.rcParams) == before  # no global state changed
    assert svg.startswith("<svg") and "<?xml" not in svg and "DOCTYPE" not in svg
    assert len(svg.encode("utf-8")) < 40_000
    assert "<script" not in svg and "&lt;script&gt;" in svg
    ids = re.findall(r'\bid="([^"]+)"', svg)
    assert ids and all(i == "t1" or i.startswith("t1-") for i in ids)
    refs = re.findall(r"url\(#([^)]+)\)|href=\"#([^\"]+)\"", svg)
    assert all((a or b).startswith("t1-") for a, b in refs)
    assert "<text" in svg and "<path d=" in svg  # text stays text (svg.fonttype none)
    other = plots.response_curves_svg(model, sweeps, title=HOSTILE, id_prefix="t2")
    assert not set(ids) & set(re.findall(r'\bid="([^"]+)"', other))


def test_normalisation_uses_the_unfiltered_accuracies() -> None:
    result = build_result()
    model = result.models[0]
    fgsm = next(s for s in model.sweeps if s.attack == "fgsm_eps0.1")
    curves = plots.normalise_sweep(model, fgsm)
    assert curves.alpha_hat[0] == 0.0 and curves.alpha_hat[-1] == 1.0
    np.testing.assert_allclose(curves.clean, np.array(fgsm.clean_accuracy) / CLEAN_ACCURACY)
    np.testing.assert_allclose(
        curves.adversarial, np.array(fgsm.adversarial_accuracy) / FGSM_ACCURACY
    )
    np.testing.assert_allclose(curves.baseline, 1.0 - np.array(fgsm.removed_fraction))
    assert not curves.adversarial_by_clean
    pgd = next(s for s in model.sweeps if s.attack == "pgd_eps0.3")
    curves = plots.normalise_sweep(model, pgd)
    assert curves.adversarial_by_clean
    np.testing.assert_allclose(
        curves.adversarial, np.array(pgd.adversarial_accuracy) / CLEAN_ACCURACY
    )


def test_a_bare_result_still_renders() -> None:
    """No checks, attacks or sweeps (a spec that only reports clean accuracy)."""
    model = replace(build_result().models[0], attacks=[], sweeps=[], checks=[], layers=[])
    doc = parse(report_html(AuditResult(meta={}, models=[model])))
    assert "PASS" in doc.by_id("summary").find_all("div", "verdict")[0].text()
    assert "asserts no checks" in norm(doc.by_id("summary").text())
    assert "not computed" in norm(doc.by_id("labels").text())
    assert not doc.find_all("svg")
    for ident in SECTIONS:
        doc.by_id(ident)


def test_a_damaged_sweep_does_not_break_the_report() -> None:
    """Lists of unequal length (a hand-edited results.json) draw their common part."""
    result = build_result(n_layers=1, two_attacks=False)
    model = result.models[0]
    short = replace(model.sweeps[1], clean_accuracy=model.sweeps[1].clean_accuracy[:-3])
    damaged = replace(result, models=[replace(model, sweeps=[model.sweeps[0], short])])
    assert parse(report_html(damaged)).by_id("curves").find_all("svg", "plot")
