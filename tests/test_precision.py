"""compute.precision: bf16 where the hardware has it, its error calibrated in the run, and
fp32 confirmation of exactly the sweeps that lie within that error of a boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from inferlink_audit import devices
from inferlink_audit.audit import AuditSession
from inferlink_audit.cli import main
from inferlink_audit.errors import DeviceError, SpecError
from inferlink_audit.report import report_html
from inferlink_audit.results import AuditResult, ModelResult, SweepResult, result_to_dict
from inferlink_audit.spec_loader import load_spec
from inferlink_audit.sweep import Evaluator, state_digest

from .specs import write_spec

needs_bf16 = pytest.mark.skipif(
    devices.bf16_unsupported_reason(torch.device("cpu")) is not None,
    reason="this CPU has no native bf16 (AMX or AVX-512 BF16)",
)

FILTERS = ["low_pass", "pulse"]
THRESHOLDS = 7  # odd: Simpson's weights are then all positive and sum to 1


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_cpu_bf16_flags_reads_the_kernels_flags(tmp_path: Path) -> None:
    with_bf16 = tmp_path / "with"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    without = tmp_path / "without"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert devices.cpu_bf16_flags(with_bf16) == ["avx512_bf16"]
    assert devices.cpu_bf16_flags(without) == []
    assert devices.cpu_bf16_flags(arm) == ["bf16"]
    assert devices.cpu_bf16_flags(tmp_path / "missing") == []


def test_bf16_refused_on_a_cpu_without_native_bf16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: [])
    path = write_spec(tmp_path, compute={"precision": "bf16"})
    session = AuditSession(load_spec(path))
    with pytest.raises(DeviceError) as info:
        session.prepared  # noqa: B018  (preparing the session checks the precision)
    message = str(info.value)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "precision" in text)
    assert message.startswith(f"{path}:{line}: compute.precision: bf16 is not run on device cpu")
    assert "neither AMX nor AVX-512 BF16" in message
    assert "Use compute.precision: fp32" in message


def test_confirm_without_bf16_is_a_spec_error(tmp_path: Path) -> None:
    path = write_spec(tmp_path, compute={"confirm": True})
    with pytest.raises(SpecError, match=r"compute.*confirm re-runs bf16 sweeps in fp32"):
        load_spec(path)


@dataclass
class Runs:
    exact: list[SweepResult]
    approximate: list[SweepResult]  # bf16, confirm: false
    confirmed: list[SweepResult]  # bf16 with confirm
    record: dict[str, Any]  # the confirmed run's results.json "compute"
    reruns: list[set[tuple[str, str | None]]]  # the scopes each fp32 re-run computed
    reference: tuple[float, float]  # fp32 unfiltered (clean, adversarial) accuracy
    result: AuditResult | None = None  # the confirmed run, for the report
    # Each fp32 evaluation of the confirmed run: (evaluator, the weights it evaluated).
    fp32_evaluations: list[tuple[int, str]] = field(default_factory=list)
    unfiltered: str = ""  # the digest of the unfiltered weights


def repeated_fp32_evaluations(evaluations: list[tuple[int, str]], unfiltered: str) -> list[str]:
    """The weights evaluated more than once by one fp32 evaluator: the unfiltered network
    alone, once more (the bf16 speed measurement), and no variant."""
    counts = Counter(evaluations)
    return [
        "unfiltered, timed" if (digest == unfiltered and count == 2) else f"{digest} x{count}"
        for (_, digest), count in counts.items()
        if count > 1
    ]


def _sweeps(session: AuditSession) -> list[SweepResult]:
    return [s for f in FILTERS for s in session.sweeps(f, "fgsm_eps0.1")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The digits example (its model and 360-image test split) at 7 thresholds, three ways."""
    folder = tmp_path_factory.mktemp("precision")
    common: dict[str, Any] = {
        "data": {
            "source": "sklearn_digits",
            "batch_size": 360,
            "normalize": {"mean": [0.5], "std": [0.5]},
        },
        "filtering": {"thresholds": THRESHOLDS, "filters": FILTERS},
    }
    exact = AuditSession(load_spec(write_spec(folder, "exact.yaml", **common)))
    approximate = AuditSession(
        load_spec(
            write_spec(
                folder, "bf16.yaml", compute={"precision": "bf16", "confirm": False}, **common
            )
        )
    )
    confirmed = AuditSession(
        load_spec(write_spec(folder, "confirm.yaml", compute={"precision": "bf16"}, **common))
    )
    reruns: list[set[tuple[str, str | None]]] = []
    compute = confirmed._compute_sweeps

    def spy(filter_name: Any, attack_id: str, precision: Any = "fp32", only: Any = None) -> Any:
        if only is not None:
            reruns.append(set(only))
        return compute(filter_name, attack_id, precision, only)

    confirmed._compute_sweeps = spy  # type: ignore[method-assign]
    fp32_evaluations: list[tuple[int, str]] = []
    evaluate = Evaluator.evaluate

    def counted(self: Evaluator) -> tuple[float, float]:
        if self.precision == "fp32":
            fp32_evaluations.append((id(self), state_digest(self.model)))
        return evaluate(self)

    exact_sweeps, approximate_sweeps = _sweeps(exact), _sweeps(approximate)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Evaluator, "evaluate", counted)
        confirmed_sweeps = _sweeps(confirmed)
    out = Runs(exact_sweeps, approximate_sweeps, confirmed_sweeps, {}, reruns, (0.0, 0.0))
    out.fp32_evaluations = fp32_evaluations
    out.unfiltered = state_digest(confirmed.prepared.loaded.module)
    out.record = confirmed.compute_record() or {}
    out.reference = exact._evaluator("fgsm_eps0.1")[1]
    model = ModelResult(
        name="digits",
        checkpoint_sha256="",
        n_examples=360,
        clean_accuracy=confirmed.clean_accuracy(),
        attacks=[confirmed.attack_result("fgsm_eps0.1")],
        sweeps=out.confirmed,
        lipschitz=None,
        remediation=None,
        checks=[],
        compute=out.record,
    )
    out.result = AuditResult(meta=confirmed.meta(0.0), models=[model])
    return out


@needs_bf16
def test_bf16_scores_within_the_calibrated_margin_of_fp32(runs: Runs) -> None:
    """Every score and antifragile area of a bf16 sweep is within its propagated margin of
    fp32's (the decisions' quantities; single points may exceed d, see docs/method.md §10)."""
    margin = runs.record["calibration"]["accuracy_margin"]
    psi_c0, psi_a0 = runs.reference
    # Odd thresholds: Simpson's weights sum to 1, so a score moves by at most d / ψ⁰.
    mc, ma = margin / psi_c0, margin / psi_a0
    changed = False
    for exact, approximate in zip(runs.exact, runs.approximate, strict=True):
        pairs = [
            (exact.scores.clean, approximate.scores.clean, mc),
            (exact.antifragile_area.clean, approximate.antifragile_area.clean, mc),
            (exact.scores.adversarial, approximate.scores.adversarial, ma),
            (exact.antifragile_area.adversarial, approximate.antifragile_area.adversarial, ma),
            (exact.scores.difference, approximate.scores.difference, mc + ma),
        ]
        for a, b, bound in pairs:
            assert abs(a - b) <= bound + 1e-12
        changed = changed or exact.adversarial_accuracy != approximate.adversarial_accuracy
    assert changed  # bf16 did change some prediction, so the comparison means something


@needs_bf16
def test_calibration_pairs_are_fp32_and_bf16_values_of_one_variant(runs: Runs) -> None:
    calibration = runs.record["calibration"]
    pairs = calibration["pairs"]
    assert pairs[0] == {
        "where": "unfiltered fgsm_eps0.1",
        "fp32": list(runs.reference),
        "bf16": pairs[0]["bf16"],
    }
    by_where = {
        f"{s.filter} {s.attack} {s.layer or 'global'}": (exact, s)
        for exact, s in zip(runs.exact, runs.approximate, strict=True)
    }
    for pair in pairs[1:]:
        where, k = pair["where"].rsplit(" threshold ", 1)
        exact, approximate = by_where[where]
        index = int(k)
        assert pair["fp32"] == [exact.clean_accuracy[index], exact.adversarial_accuracy[index]]
        assert pair["bf16"] == [
            approximate.clean_accuracy[index],
            approximate.adversarial_accuracy[index],
        ]
    assert len(pairs) == 1 + len(runs.exact)
    deltas = [max(abs(a - b) for a, b in zip(p["fp32"], p["bf16"], strict=True)) for p in pairs]
    assert calibration["accuracy_margin"] == pytest.approx(2 * max(max(deltas), 1 / 360))


def _near(sweep: SweepResult, margin: float, reference: tuple[float, float]) -> bool:
    """Independently of precision.py: any label or targeted quantity within its margin."""
    tau = 0.05
    mc, ma = margin / reference[0], margin / reference[1]
    return (
        abs(sweep.antifragile_area.clean - tau) <= mc
        or abs(sweep.scores.clean + tau) <= mc
        or abs(sweep.antifragile_area.adversarial - tau) <= ma
        or abs(sweep.scores.adversarial + tau) <= ma
        or abs(sweep.scores.difference + tau) <= mc + ma
    )


def _margins_in_effect(runs: Runs) -> list[float]:
    """Per sweep, 2·max(|Δ|, 1/n) over its own filter's group's pairs and the unfiltered
    network's (one attack here): what ran before the group does not enter its margin."""
    pairs = runs.record["calibration"]["pairs"]
    out = []
    for s in runs.approximate:
        deltas = [
            max(abs(a - b) for a, b in zip(p["fp32"], p["bf16"], strict=True))
            for p in pairs
            if p["where"].startswith("unfiltered") or p["where"].split()[0] == s.filter
        ]
        out.append(2 * max(max(deltas), 1 / 360))
    return out


@needs_bf16
def test_confirm_reruns_exactly_the_sweeps_within_the_margin(runs: Runs) -> None:
    margins = _margins_in_effect(runs)
    assert [r["accuracy_margin"] for r in runs.record["sweeps"]] == pytest.approx(margins)
    near = [_near(s, m, runs.reference) for s, m in zip(runs.approximate, margins, strict=True)]
    assert any(near) and not all(near)  # the case holds both kinds of sweep
    expected = {
        f: {
            (s.scope, s.layer)
            for s, n in zip(runs.approximate, near, strict=True)
            if n and s.filter == f
        }
        for f in FILTERS
    }
    assert runs.reruns == [expected[f] for f in FILTERS if expected[f]]
    for exact, approximate, final, n in zip(
        runs.exact, runs.approximate, runs.confirmed, near, strict=True
    ):
        kept = exact if n else approximate
        assert (final.clean_accuracy, final.adversarial_accuracy) == (
            kept.clean_accuracy,
            kept.adversarial_accuracy,
        )
        assert (final.labels, final.targeted) == (kept.labels, kept.targeted)
    record = runs.record["sweeps"]
    assert [r["confirmed"] for r in record] == near
    # A confirmed sweep reports how far bf16 was from fp32 at its every threshold.
    checked = []
    for r, exact, approximate in zip(record, runs.exact, runs.approximate, strict=True):
        if r["confirmed"]:
            largest = max(
                abs(a - b)
                for pair in (
                    (exact.clean_accuracy, approximate.clean_accuracy),
                    (exact.adversarial_accuracy, approximate.adversarial_accuracy),
                )
                for a, b in zip(*pair, strict=True)
            )
            assert r["fp32_max_abs_accuracy_difference"] == largest
            checked.append(largest)
        else:
            assert "fp32_max_abs_accuracy_difference" not in r
    assert runs.record["confirmed_max_abs_accuracy_difference"] == max(checked)
    assert [r["precision"] for r in record] == ["fp32" if n else "bf16" for n in near]
    assert runs.record["confirmed"] == sum(near)
    assert runs.record["memory_format"] == "channels_last"


@needs_bf16
def test_confirm_evaluates_no_variant_twice_in_fp32(runs: Runs) -> None:
    """A confirmed sweep's fp32 re-run takes its calibration variant (already evaluated in
    fp32) from the memo: no fp32 evaluation is of weights already evaluated in fp32, except
    the unfiltered network's second one, which times fp32 against bf16."""
    assert repeated_fp32_evaluations(runs.fp32_evaluations, runs.unfiltered) == [
        "unfiltered, timed"
    ]
    assert runs.record["confirmed"]  # some sweep was re-run, its calibration variant with it


@needs_bf16
def test_final_labels_after_confirm_equal_exact_fp32(runs: Runs) -> None:
    assert [(s.labels, s.targeted) for s in runs.confirmed] == [
        (s.labels, s.targeted) for s in runs.exact
    ]


@needs_bf16
def test_report_and_results_json_say_which_sweeps_were_confirmed(runs: Runs) -> None:
    assert runs.result is not None
    record = result_to_dict(runs.result)["models"][0]["compute"]
    assert record["precision"] == "bf16" and record["confirm"] is True
    assert record["calibration"]["variants"] == 1 + len(runs.exact)
    html = report_html(runs.result)
    section = html[html.index('<section id="precision') :]
    section = section[: section.index("</section>")]
    confirmed = sum(r["confirmed"] for r in record["sweeps"])
    margin = record["calibration"]["accuracy_margin"]
    assert f"{confirmed} of {len(record['sweeps'])} sweep evaluations" in section
    assert f"d is at most {margin:.4f}" in section
    for r in record["sweeps"]:  # each sweep's own margin, in its row
        assert f'<td class="num">{r["accuracy_margin"]:.4f}</td>' in section
    assert section.count("(confirmed)") == confirmed
    assert section.count("no boundary within the margin") == len(record["sweeps"]) - confirmed


# --------------------------------------------------------------------------- sequential
SEQ_DATA = {
    "source": "sklearn_digits",
    "batch_size": 360,
    "normalize": {"mean": [0.5], "std": [0.5]},
}
SEQ_CHECKS = {"max_fragile_fraction": {"value": 0.40}, "max_targeted_layers": 4}
SEQUENTIAL = {"resamples": 200, "sequential": {"round": 64}}


@needs_bf16
def test_sequential_bf16_confirms_each_sweep_once_on_the_examples_it_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds run in bf16 alone; when a sweep closes it is confirmed once: exactly the sweeps
    within their margin (computed here from the bf16 sweeps and the fp32 ψ⁰ of the examples
    each used) are re-run in fp32, on the rounds they used, and their final numbers are fp32's
    on those examples (checked against the exact run's per-example outcomes). No variant is
    evaluated twice in fp32 on one round (the calibration's come from the memo)."""

    def session(name: str, **extra: Any) -> AuditSession:
        filtering = {"thresholds": THRESHOLDS, "filters": ["low_pass"]}
        path = write_spec(
            tmp_path, name, data=SEQ_DATA, filtering=filtering, checks=SEQ_CHECKS, **extra
        )
        return AuditSession(load_spec(path))

    exact = session("exact.yaml", statistics={"resamples": 200})
    bf16 = session(
        "bf16.yaml", statistics=SEQUENTIAL, compute={"precision": "bf16", "confirm": False}
    )
    confirmed = session("confirm.yaml", statistics=SEQUENTIAL, compute={"precision": "bf16"})
    fp32_rounds: list[set[str | None]] = []
    compute = confirmed._compute_sweeps

    def spy(filter_name: Any, attack_id: str, precision: Any = "fp32", only: Any = None) -> Any:
        if precision == "fp32" and confirmed._round_open is not None:
            fp32_rounds.append(set(confirmed._round_open))
        return compute(filter_name, attack_id, precision, only)

    confirmed._compute_sweeps = spy  # type: ignore[method-assign]
    plain = bf16.sweeps("low_pass", "fgsm_eps0.1")
    full = exact.sweeps("low_pass", "fgsm_eps0.1")
    fp32_evaluations: list[tuple[int, str]] = []  # (a round's evaluator, the weights)
    evaluate = Evaluator.evaluate

    def counted(self: Evaluator) -> tuple[float, float]:
        if self.precision == "fp32":
            fp32_evaluations.append((id(self), state_digest(self.model)))
        return evaluate(self)

    monkeypatch.setattr(Evaluator, "evaluate", counted)
    final = confirmed.sweeps("low_pass", "fgsm_eps0.1")
    unfiltered = state_digest(confirmed.prepared.loaded.module)
    assert repeated_fp32_evaluations(fp32_evaluations, unfiltered) == ["unfiltered, timed"]
    record = confirmed.compute_record() or {}
    assert len(record["sweeps"]) == len(final)  # once per sweep, not per round
    plan = confirmed._plan
    assert plan is not None
    near = []
    for s, r in zip(plain, record["sweeps"], strict=True):
        assert s.outcomes is not None and s.sequential is not None
        m = s.outcomes.n
        assert r["examples"] == m
        deltas = [
            max(abs(a - b) for a, b in zip(p["fp32"], p["bf16"], strict=True))
            for p in record["calibration"]["pairs"]
        ]
        assert r["accuracy_margin"] == pytest.approx(2 * max(max(deltas), 1 / m))
        reference = (
            float(s.outcomes.unpacked(s.outcomes.unfiltered_clean).sum()) / m,
            float(s.outcomes.unpacked(s.outcomes.unfiltered_adversarial).sum()) / m,
        )
        near.append(_near(s, r["accuracy_margin"], reference))
    assert [r["confirmed"] for r in record["sweeps"]] == near
    assert any(near) and not all(near)
    rerun = {s.layer for s, n in zip(plain, near, strict=True) if n}
    assert set().union(*fp32_rounds) == rerun
    for s, f, b, n in zip(final, full, plain, near, strict=True):
        assert s.sequential is not None and b.sequential is not None
        if not n:
            assert s.clean_accuracy == b.clean_accuracy and s.labels == b.labels
            continue
        assert s.sequential.rounds >= b.sequential.rounds
        where = plan.indices(s.sequential.rounds)
        assert f.outcomes is not None
        clean = f.outcomes.unpacked(f.outcomes.clean)[:, where].sum(axis=1) / len(where)
        adversarial = f.outcomes.unpacked(f.outcomes.adversarial)[:, where].sum(axis=1)
        assert s.clean_accuracy == pytest.approx(clean.tolist(), abs=1e-12)
        assert s.adversarial_accuracy == pytest.approx(
            (adversarial / len(where)).tolist(), abs=1e-12
        )


# --------------------------------------------------------------------------- cache and shards
def _bf16_spec(folder: Path) -> Path:
    return write_spec(
        folder,
        data={"source": "sklearn_digits", "limit": 180, "batch_size": 180},
        filtering={"thresholds": THRESHOLDS, "filters": FILTERS},
        compute={"precision": "bf16"},
    )


def _by_sweep(record: dict[str, Any]) -> dict[str, Any]:
    """A ``compute`` record with its sweeps and pairs keyed, so order does not matter."""
    return record | {
        "sweeps": {(r["filter"], r["layer"]): r for r in record["sweeps"]},
        "calibration": record["calibration"]
        | {"pairs": {p["where"]: p for p in record["calibration"]["pairs"]}},
    }


@needs_bf16
def test_sweeps_read_from_the_cache_keep_their_compute_record(tmp_path: Path) -> None:
    """A second session reads bf16 sweeps from the sweep cache, computes none, and reports
    the same calibration and per-sweep confirmation as the session that computed them."""
    from inferlink_audit.cache import DiskSweepCache

    cache = DiskSweepCache(tmp_path / "cache")
    spec = load_spec(_bf16_spec(tmp_path))
    first = AuditSession(spec, cache=cache)
    computed = [s for f in FILTERS for s in first.sweeps(f, "fgsm_eps0.1")]
    second = AuditSession(spec, cache=cache)
    again = [s for f in FILTERS for s in second.sweeps(f, "fgsm_eps0.1")]
    assert second.computed_sweeps == 0 and again == computed
    assert second.compute_record() == first.compute_record()
    record = first.compute_record()
    assert record is not None and len(record["sweeps"]) == len(computed)


@needs_bf16
def test_merged_shards_keep_the_compute_record_of_a_serial_run(tmp_path: Path) -> None:
    from inferlink_audit.audit import run_audit
    from inferlink_audit.shards import Shard, merge_shards, run_shard

    spec = load_spec(_bf16_spec(tmp_path))
    serial, _, _ = run_audit(spec)
    shards = [run_shard(spec, Shard(i, 2)) for i in (1, 2)]
    assert all(s.models[0].sweeps for s in shards)  # both shards computed some groups
    merged = merge_shards([(tmp_path / f"{i}.json", s) for i, s in enumerate(shards, 1)])
    expected, joined = serial.models[0].compute, merged.models[0].compute
    assert expected is not None and joined is not None
    assert _by_sweep(joined) == _by_sweep(expected)


@needs_bf16
def test_a_confirmed_sweep_no_longer_decided_in_fp32_goes_on_in_fp32_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every sweep confirmed (forced), and the first look after confirmation finding every
    sweep that stopped early undecided (forced): each is evaluated in fp32 on its rounds,
    then goes on in fp32 rounds only; no bf16 round follows a confirmation."""
    from inferlink_audit import audit as audit_module

    monkeypatch.setattr(audit_module, "near_boundary", lambda *args: ["forced"])
    state = {"confirmed": False, "forced": False}
    group_settled = audit_module.group_settled

    def settled_after_confirm(*args: Any) -> Any:
        settled = group_settled(*args)

        def patched(sweeps: list[SweepResult]) -> list[bool]:
            status = settled(sweeps)
            if state["confirmed"] and not state["forced"]:
                state["forced"] = True
                early = [s.outcomes is not None and s.outcomes.n < 360 for s in sweeps]
                return [d and not e for d, e in zip(status, early, strict=True)]
            return status

        return patched

    monkeypatch.setattr(audit_module, "group_settled", settled_after_confirm)
    filtering = {"thresholds": 9, "filters": ["low_pass"]}  # conv1 stops after 3 rounds
    path = write_spec(
        tmp_path, data=SEQ_DATA, filtering=filtering, checks=SEQ_CHECKS,
        statistics=SEQUENTIAL, compute={"precision": "bf16"},
    )  # fmt: skip
    session = AuditSession(load_spec(path))
    confirm, compute = session._confirm_rounds, session._compute_sweeps
    calls: dict[str | None, list[tuple[str, bool]]] = {}

    def confirm_then_flag(*args: Any) -> Any:
        near = confirm(*args)
        state["confirmed"] = True
        return near

    def spy(filter_name: Any, attack_id: str, precision: Any = "fp32", only: Any = None) -> Any:
        for layer in session._round_open or ():
            calls.setdefault(layer, []).append((precision, state["confirmed"]))
        return compute(filter_name, attack_id, precision, only)

    session._confirm_rounds = confirm_then_flag  # type: ignore[method-assign]
    session._compute_sweeps = spy  # type: ignore[method-assign]
    sweeps = session.sweeps("low_pass", "fgsm_eps0.1")
    went_on = 0
    for s in sweeps:
        assert s.sequential is not None
        seen = calls[s.layer]
        used = seen.count(("bf16", False))  # its rounds when it closed in bf16
        more = s.sequential.rounds - used
        assert seen == [("bf16", False)] * used + [("fp32", False)] * used + [("fp32", True)] * more
        went_on += more > 0
    assert went_on  # some sweep went on after its confirmation


# --------------------------------------------------------------------------- the pytest plugin
FORCE_BF16 = (
    "from inferlink_audit import devices\n"
    "# This machine's CPU may lack native bf16: the tests need the path, not the speed.\n"
    "devices.cpu_bf16_flags = lambda *args: ['avx512_bf16']\n"
)


def test_the_plugin_reports_the_command_lines_compute_record_serial_and_under_xdist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16 audit under pytest says what its numbers are in: results.json's ``compute``
    (calibration, each sweep's margin and whether it was confirmed) equals the command
    line's, whichever xdist worker computed each group, since each group's margin comes
    from its own pairs."""
    write_spec(
        tmp_path,
        compute={"precision": "bf16"},
        filtering={"thresholds": 5, "filters": ["low_pass", "high_pass", "pulse"]},
    )
    (tmp_path / "conftest.py").write_text(FORCE_BF16)
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda *args: ["avx512_bf16"])
    assert main(
        ["run", str(tmp_path / "audit.yaml"), "--out", str(tmp_path / "cli"), "--quiet"]
    ) in (0, 1)
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())["models"][0]
    record = cli["compute"]
    assert record["precision"] == "bf16" and len(record["sweeps"]) == len(cli["sweeps"])
    confirmed = [s["confirmed"] for s in record["sweeps"]]
    assert any(confirmed) and not all(confirmed)  # both kinds of sweep, margins at work
    for workers in ([], ["-n", "2"]):
        out = f"pytest{len(workers)}"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *workers,
             "--inferlink-audit", "audit.yaml", "--inferlink-report", out],
            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode in (0, 1), done.stdout + done.stderr
        plugin = json.loads((tmp_path / out / "results.json").read_text())["models"][0]
        assert plugin["sweeps"] == cli["sweeps"], workers
        assert plugin["compute"] == record, workers
        html = (tmp_path / out / "report.html").read_text()
        assert '<section id="precision">' in html


@pytest.mark.parametrize("slow", ["bf16", "fp32"])
def test_a_bf16_run_slower_than_fp32_says_so_in_the_summary_report_and_pytest_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], slow: str
) -> None:
    """The unfiltered network is timed once more in each precision; a bf16 run that measured
    slower warns (terminal, report, the plugin's findings), a faster one only records it."""
    from pytest_inferlink.ci import finding_lines

    from inferlink_audit.results import read_results

    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda *args: ["avx512_bf16"])
    evaluate = Evaluator.evaluate

    def delayed(self: Evaluator) -> tuple[float, float]:
        if self.precision == slow:
            time.sleep(0.2)  # far above either precision's time on 120 digits, even emulated
        return evaluate(self)

    monkeypatch.setattr(Evaluator, "evaluate", delayed)
    write_spec(
        tmp_path, compute={"precision": "bf16"}, filtering={"thresholds": 3, "filters": ["pulse"]}
    )
    main(["run", str(tmp_path / "audit.yaml"), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    result = read_results(tmp_path / "out" / "results.json")
    speed = result.meta["bf16_speed"]
    assert speed["examples"] == 120 and speed["attack"] == "fgsm_eps0.1"
    assert speed["speedup"] == pytest.approx(
        speed["fp32_seconds"] / speed["bf16_seconds"], rel=1e-3
    )
    html = (tmp_path / "out" / "report.html").read_text()
    if slow == "bf16":
        assert speed["speedup"] < 1.0
        warning = f"WARNING compute.precision: bf16 ran at {speed['speedup']:.2f}x fp32's speed"
        assert warning in printed
        assert "bf16 was slower than fp32." in html
        assert any(line.startswith(warning) for line in finding_lines(result))
    else:
        assert speed["speedup"] > 1.0
        assert "WARNING" not in printed and "bf16 was slower" not in html
        assert f"bf16 ran at {speed['speedup']:.2f}× fp32's speed" in html
        assert finding_lines(result) == []
