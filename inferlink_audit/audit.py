"""One audit, computed lazily: the model, the unfiltered baselines, attacks and sweeps.

``AuditSession`` is what both front ends drive. The command line asks for everything at
once (``run``); the pytest plugin asks, item by item, for just what each check needs. Each
piece of work (an attack on the unfiltered network, the sweeps of one filter under one attack)
is computed once per session, and through an optional cache once per checkpoint and spec.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch

from . import __version__
from .attack_builder import build_attack
from .attack_sanity import Indicator, SanityRunner
from .attacks import Attack
from .batching import auto_batch_size
from .cache import tensors_sha256
from .checks import PlannedCheck, evaluate_check, find_baseline_model, is_check, plan_checks
from .compare import TransferModel, label_consistency, transferability
from .data import Dataset, data_key, load_dataset, validate_dataset
from .devices import (
    bf16_unsupported_reason,
    describe_device,
    deterministic_settings,
    inference_mode,
    out_of_memory_as_error,
    peak_memory_mb,
    resolve_device,
    seed_everything,
    synchronize,
)
from .errors import AuditError, DeviceError, SpecError
from .filters import FilterName, SortedScope
from .layers import AnalysedLayer, select_layers
from .models import LoadedModel, check_batch, load_model
from .precision import (
    Calibration,
    PairedVariant,
    ScoreMargins,
    calibration_from_json,
    calibration_index,
    compute_summary,
    largest_difference,
    near_boundary,
    score_margins,
)
from .prefix import NetworkSplitter
from .progress import Progress, current_progress, progress_step, tracked
from .remediation import safe_file_stem, selective_retrain
from .results import (
    AttackResult,
    AuditResult,
    CheckResult,
    EpsCurve,
    LipschitzResult,
    ModelResult,
    SweepOutcomes,
    SweepResult,
    UnitSemanticsResult,
    read_results,
)
from .scores import Members, scope_members, score_curves
from .sequential import (
    RoundPlan,
    accuracy_decided,
    group_settled,
    look_confidence,
    merge_rounds,
    rounds_until,
    run_in_rounds,
)
from .spec import DEFAULT_FGSM_EPS, AttackSpec, AuditSpec, CurveSpec, FGSMSpec
from .spec_loader import load_spec, locate_message, located_errors
from .spectral import lipschitz_bounds
from .statistics import (
    Sampling,
    SweepDraws,
    accuracy_interval,
    bootstrap_sweep,
    resample_indices,
    resample_weights,
    sweep_statistics,
)
from .sweep import (
    Bits,
    EvalData,
    Evaluator,
    evaluate_variant,
    frozen_parameters,
    state_digest,
    sweep_scope,
    verify_unchanged,
)
from .units import LAYER_KEY, find_layer, unit_semantics

if TYPE_CHECKING:
    from .distributed import Ranks


class SweepCache(Protocol):
    """Where finished sweeps are kept between runs (the plugin backs it with a folder)."""

    def get(self, key: str) -> list[SweepResult] | None: ...

    def put(self, key: str, sweeps: list[SweepResult]) -> None: ...


@dataclass
class _Prepared:
    loaded: LoadedModel
    device: torch.device
    data: EvalData
    layers: list[AnalysedLayer]
    settings: dict[str, Any]
    digest: str  # of every parameter and buffer as loaded: checked after each piece of work
    batch_note: str  # where data.batch_size came from


class AuditSession:
    """Lazily computed measurements of one spec's model; every result is computed once."""

    def __init__(
        self,
        spec: AuditSpec,
        *,
        device: str | None = None,
        cache: SweepCache | None = None,
        on_variant: Callable[[str], None] | None = None,
        output_dir: Path | None = None,
        worker: int | None = None,
    ) -> None:
        self.spec = spec
        self.device_name = device or spec.device
        self.worker = worker  # a parallel worker's index: auto/cuda pick its GPU (devices)
        self.cache = cache
        self.on_variant = on_variant
        # Where long steps report (the CLI's bars, the pytest plugin's lines).
        self.progress: Progress | None = current_progress()
        self.started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        self.timings: dict[str, float] = {}
        self.computed_sweeps = 0  # sweeps computed here (not taken from the cache)
        self._attacks: dict[str, AttackResult] = {}
        self._attack_correct: dict[str, torch.Tensor] = {}  # per example, for the indicators
        self._sweeps: dict[tuple[str, str], list[SweepResult]] = {}
        self._clean: float | None = None
        self._evaluators: dict[str, tuple[Evaluator, tuple[float, float]]] = {}
        self._remediation: dict[str, Any] | None = None
        self._units: UnitSemanticsResult | None = None
        self._transfer: list[dict[str, Any]] | None = None
        self._peers: list[AuditSession] | None = None
        self._orderings: dict[str | None, SortedScope] = {}  # by layer; None is the global scope
        self._unfiltered_outcomes: dict[str, Bits | None] = {}  # by attack
        self._calibration: Calibration | None = None  # compute.precision: bf16 with confirm
        self._bf16_speed: dict[str, Any] | None = None  # the unfiltered network timed in both
        self._precision_sweeps: list[dict[str, Any]] = []  # each bf16 sweep: confirmed or not
        self._draws: dict[tuple[str, str], list[SweepDraws]] = {}  # bootstrap, per sweep
        # Under torchrun: this process's rank, which evaluates a share of the test set.
        self.ranks: Ranks | None = None
        self.output_dir = output_dir  # where remediated checkpoints go (default: report.dir)
        # How a compared spec's session is obtained; the pytest plugin shares its own.
        self.peer_factory: Callable[[Path], AuditSession] = lambda path: AuditSession(
            load_spec(path),
            device=device,
            cache=cache,
            on_variant=on_variant,
            output_dir=output_dir,
        )

    # ----------------------------------------------------------------- preparation
    @cached_property
    def prepared(self) -> _Prepared:
        """The model on its device with the test data, checked on a first batch, and the
        layers to analyse. Every user-caused error names the spec's file, line and key."""
        t0 = time.perf_counter()
        seed_everything(self.spec.seed)
        device, settings = self._device()
        dataset = self._dataset()
        loaded = self._model(dataset)
        data, batch_note = self._on_device(loaded, dataset, device)
        layers = self._layers(loaded)
        self._check_analysis(loaded)
        self.timings["prepare"] = time.perf_counter() - t0
        return _Prepared(
            loaded, device, data, layers, settings, state_digest(loaded.module), batch_note
        )

    def _device(self) -> tuple[torch.device, dict[str, Any]]:
        """The device asked for (on the command line, else in the spec), made deterministic."""
        spec = self.spec
        with located_errors(spec, ("device",) if self.device_name == spec.device else ()):
            device = resolve_device(self.device_name, worker=self.worker)
            self._check_precision(device)
        return device, deterministic_settings(device)

    def _check_precision(self, device: torch.device) -> None:
        """``compute.precision: bf16`` only where the device multiplies bf16 natively."""
        if self.spec.compute.precision != "bf16":
            return
        reason = bf16_unsupported_reason(device)
        if reason is not None:
            raise DeviceError(
                f"bf16 is not run on device {describe_device(device)}: {reason}. Use "
                "compute.precision: fp32 (exact, the default) here, or run on a CUDA GPU with "
                "bf16 or a CPU with AMX or AVX-512 BF16.",
                key=("compute", "precision"),
            )

    def _dataset(self) -> Dataset:
        with located_errors(self.spec, data_key(self.spec.data)):
            return load_dataset(self.spec.data)

    def _model(self, dataset: Dataset) -> LoadedModel:
        """The network loaded and probed on the first example, and the data checked against it."""
        spec = self.spec
        # Model and checkpoint errors name their key; the data's do not know the spec.
        with located_errors(spec, data_key(spec.data)):
            loaded = load_model(
                spec.model,
                spec.data,
                spec_dir=spec.spec_dir,
                example_input=dataset.x[:1],
            )
            validate_dataset(
                dataset,
                num_outputs=loaded.num_outputs,
                input_range=spec.data.input_range,
                where=dataset.description,
            )
        return loaded

    def _on_device(
        self, loaded: LoadedModel, dataset: Dataset, device: torch.device
    ) -> tuple[EvalData, str]:
        """Model and data moved to ``device`` and the batch size chosen, checked on a first
        batch; running out of memory names data.batch_size."""
        spec = self.spec
        oom = out_of_memory_as_error(
            batch_size=spec.data.batch_size,
            device=describe_device(device),
            where=locate_message(spec, ("data", "batch_size"), "").rstrip(": "),
            examples=len(dataset),
        )
        with oom, located_errors(spec, data_key(spec.data)):
            loaded.module.to(device).eval()
            x, y = dataset.x.to(device), dataset.y.to(device)
            batch_size, batch_note = self._batch_size(loaded, x, y)
            data = EvalData(x, y, batch_size)
            first = min(batch_size, data.n)
            check_batch(loaded.module, data.x[:first], data.y[:first], loaded.num_outputs)
        return data, batch_note

    def _batch_size(self, loaded: LoadedModel, x: torch.Tensor, y: torch.Tensor) -> tuple[int, str]:
        """The spec's batch size, or for ``auto`` the largest that fits (measured), and where
        it came from."""
        batch_size = self.spec.data.batch_size
        if isinstance(batch_size, int):
            return batch_size, "from the spec"
        # One example first, so a model that fails on any batch says so before it is measured.
        check_batch(loaded.module, x[:1], y[:1], loaded.num_outputs)
        with frozen_parameters(loaded.module):
            choice = auto_batch_size(loaded.module, x, y, self.spec.data.input_range)
        return choice.batch_size, choice.describe()

    def _layers(self, loaded: LoadedModel) -> list[AnalysedLayer]:
        with located_errors(self.spec, ("filtering", "layers")):
            return select_layers(loaded.inner, self.spec.filtering.layers)

    def _check_analysis(self, loaded: LoadedModel) -> None:
        """An ``analysis.units.layer`` the model does not have fails before any work runs."""
        units = self.spec.analysis.units
        if units is not None:
            with located_errors(self.spec, LAYER_KEY):
                find_layer(loaded.inner, units.layer)

    @cached_property
    def splitter(self) -> NetworkSplitter:
        """The user's network traced once, to cut it before each analysed layer."""
        loaded = self.prepared.loaded
        return NetworkSplitter(loaded.inner, loaded.module.normalize)

    @cached_property
    def share(self) -> EvalData:
        """The examples this process evaluates: the test set, or under torchrun its rank's
        share (accuracies are computed from every rank's outcomes, gathered)."""
        data = self.prepared.data
        if self.ranks is None:
            return data
        size = self.ranks.agreed_batch_size(data.batch_size)
        return self.ranks.share(replace(data, batch_size=size))

    def _variant_hook(self, where: str) -> Callable[[], None] | None:
        """What a sweep calls after each variant: ``on_variant`` and the progress step."""
        on_variant, progress = self.on_variant, self.progress
        if on_variant is None and progress is None:
            return None

        def done() -> None:
            if on_variant is not None:
                on_variant(where)
            if progress is not None:
                progress.advance()

        return done

    def _variants_planned(self) -> int:
        """Variants of one filter and attack at most (one per threshold and scope)."""
        filtering = self.spec.filtering
        scopes = len(self.prepared.layers) * ("local" in filtering.scopes)
        return (scopes + ("global" in filtering.scopes)) * filtering.thresholds

    def _attack(self, attack_id: str) -> Attack:
        data = self.spec.data
        return build_attack(self.spec.attack(attack_id), data.input_range, self.spec.seed)

    # ----------------------------------------------------------------- unfiltered network
    def clean_accuracy(self) -> float:
        if self._clean is None:
            p = self.prepared
            correct = 0
            with inference_mode(p.device):
                # the rounds read ``correct`` as it stands when each round ends
                for _, xb, yb in self._clean_batches(lambda: correct):  # noqa: B023
                    correct += int((p.loaded.module(xb).argmax(1) == yb).sum())
            if self.ranks is not None:
                correct = int(self.ranks.gather(np.array([correct]))[0].sum())
            self._clean = correct / self.examples_used(None)
        return self._clean

    def attack_result(self, attack_id: str) -> AttackResult:
        """The attack on the unfiltered network: accuracy, success rate and distortion.

        Distortion is averaged over the successful examples (correct before the attack, wrong
        after it), as Szegedy et al. report it: an attack that leaves an example unchanged or
        perturbs one it cannot flip does not make its typical distortion look smaller.
        """
        if attack_id not in self._attacks:
            t0 = time.perf_counter()
            p = self.prepared
            attack = self._attack(attack_id)
            model = p.loaded.module
            correct = flipped = clean_correct = 0
            rms: list[torch.Tensor] = []
            linf: list[torch.Tensor] = []
            l2: list[torch.Tensor] = []
            still_correct: list[torch.Tensor] = []
            with frozen_parameters(model):
                batches = tracked(
                    self.progress,
                    self._attacked_batches(attack_id, attack, model, lambda: correct),
                    f"attack {attack_id}",
                    -(-p.data.n // p.data.batch_size),
                    "batch",
                    p.data.n,
                )
                for _, xb, yb, out in batches:
                    x_adv = out.adversarial
                    with inference_mode(p.device):
                        # FGSM, PGD and L-BFGS already ran the clean forward pass
                        clean_logits = out.clean_logits
                        if clean_logits is None:
                            clean_logits = model(xb)
                        clean_ok = clean_logits.argmax(1) == yb
                        adv_ok = model(x_adv).argmax(1) == yb
                    correct += int(adv_ok.sum())
                    still_correct.append(adv_ok)
                    clean_correct += int(clean_ok.sum())
                    success = clean_ok & ~adv_ok
                    flipped += int(success.sum())
                    diff = (x_adv - xb)[success].flatten(1).double()
                    rms.append(diff.pow(2).mean(1).sqrt().cpu())
                    linf.append(diff.abs().amax(1).cpu())
                    l2.append(diff.norm(dim=1).cpu())
            rms, linf, l2, still_correct = self._in_test_order(rms, linf, l2, still_correct)
            still = torch.cat(still_correct)
            if self.ranks is not None:  # every rank's counts, outcomes and distortions, in order
                counts, outcomes, *values = self.ranks.gather(
                    np.array([correct, clean_correct, flipped]),
                    still.cpu().numpy(),
                    *(torch.cat(d).numpy() for d in (rms, linf, l2)),
                )
                correct, clean_correct, flipped = (int(c) for c in counts.reshape(-1, 3).sum(0))
                rms, linf, l2 = ([torch.from_numpy(v)] for v in values)
                still = torch.from_numpy(outcomes).to(still.device)
            spec = self.spec.attack(attack_id)
            self._attack_correct[attack_id] = still
            self._attacks[attack_id] = AttackResult(
                id=attack_id,
                kind=spec.kind,
                params=spec.model_dump(mode="json"),
                accuracy=correct / self.examples_used(attack_id),
                success_rate=flipped / clean_correct if clean_correct else 0.0,
                distortion_rms=float(torch.cat(rms).mean()),
                distortion_linf=float(torch.cat(linf).mean()),
                distortion_l2=float(torch.cat(l2).mean()),  # NaN when nothing succeeded
                successes=flipped,
                distortion_over="successful",
            )
            verify_unchanged(p.loaded.module, p.digest, f"attack {attack_id}")
            self.timings[f"attack {attack_id}"] = time.perf_counter() - t0
        return self._attacks[attack_id]

    # ----------------------------------------------------------------- attack sanity
    @cached_property
    def _sanity(self) -> SanityRunner:
        p = self.prepared
        return SanityRunner(p.loaded.module, p.data, self.spec.data.input_range, self.spec.seed)

    def attack_indicator(self, name: str, attack_id: str | None, limit: float) -> Indicator:
        """An attack-failure indicator on the unfiltered network (attack_sanity.py)."""
        t0 = time.perf_counter()
        p = self.prepared
        spec = None if attack_id is None else self.spec.attack(attack_id)
        curve = self.curve_points(attack_id) if name == "eps_not_monotone" else []
        for point in curve:  # the attack table's outcomes: no attack runs twice
            self.attack_result(point.id)
            self._sanity.remember(point, self._attack_correct[point.id])
        with frozen_parameters(p.loaded.module):
            reading = self._sanity.measure(name, spec, limit, curve)
        verify_unchanged(p.loaded.module, p.digest, f"indicator {name}")
        key = f"indicator {name}" + (f" {attack_id}" if attack_id else "")
        self.timings[key] = time.perf_counter() - t0
        return reading

    # ----------------------------------------------------------------- ε curves
    def curve_points(self, attack_id: str | None) -> list[AttackSpec]:
        """The attack at every listed ε, ascending, when ``attack_id`` is the sweep point of
        an entry that lists several; else none."""
        curve = None if attack_id is None else self.spec.curve_of(attack_id)
        return [] if curve is None else sorted(curve.points(), key=lambda p: p.budget)

    def eps_curves(self) -> list[EpsCurve] | None:
        """Accuracy against ε (σ for noise) of each entry that lists several, each point the
        attack table's own measurement; None when no entry lists several."""
        if not self.spec.curves:
            return None
        return [self._eps_curve(curve) for curve in self.spec.curves]

    def computed_eps_curves(self) -> list[EpsCurve] | None:
        """The ε curves whose every point is measured already (no new work: the plugin
        reports what its items computed)."""
        done = [c for c in self.spec.curves if all(p.id in self._attacks for p in c.points())]
        return [self._eps_curve(c) for c in done] or None

    def _eps_curve(self, curve: CurveSpec) -> EpsCurve:
        points = sorted(curve.points(), key=lambda p: p.budget)
        results = [self.with_interval(self.attack_result(p.id)) for p in points]
        intervals = [r.accuracy_ci for r in results if r.accuracy_ci is not None]
        return EpsCurve(
            label=curve.curve_label,
            kind=curve.kind,
            parameter=curve.budget_key,
            norm=getattr(curve, "norm", "") or ("linf" if isinstance(curve, FGSMSpec) else ""),
            values=[p.budget for p in points],
            attacks=[p.id for p in points],
            accuracy=[r.accuracy for r in results],
            sweep_attack=curve.at(curve.budget).id,
            accuracy_ci=intervals if len(intervals) == len(results) else None,
        )

    # ----------------------------------------------------------------- unit semantics
    def unit_semantics(self) -> UnitSemanticsResult | None:
        """``analysis.units`` (Szegedy et al. §3; units.py) when the spec asks, computed once."""
        units = self.spec.analysis.units
        if units is None:
            return None
        if self._units is None:
            t0 = time.perf_counter()
            p = self.prepared
            with located_errors(self.spec, LAYER_KEY), frozen_parameters(p.loaded.module):
                self._units = unit_semantics(
                    p.loaded.module,
                    p.loaded.inner,
                    units.layer,
                    p.data.x,
                    p.data.y,
                    batch_size=p.data.batch_size,
                    units=units.units,
                    directions=units.directions,
                    k=units.k,
                    seed=self.spec.seed,
                    input_range=self.spec.data.input_range,
                )
            verify_unchanged(p.loaded.module, p.digest, "unit semantics")
            self.timings["unit semantics"] = time.perf_counter() - t0
        return self._units

    @property
    def computed_units(self) -> UnitSemanticsResult | None:
        return self._units

    # ----------------------------------------------------------------- remediation
    def remediation(self) -> dict[str, Any] | None:
        """Selective retraining (§1.7) when the spec asks for it, computed once."""
        remediation = self.spec.remediation
        if remediation is None:
            return None
        if self._remediation is None:
            t0 = time.perf_counter()
            p, spec = self.prepared, self.spec
            settings = remediation.selective_retrain
            assert spec.data.train is not None  # the spec validator guarantees it
            train_set = load_dataset(spec.data.train)
            validate_dataset(
                train_set,
                num_outputs=p.loaded.num_outputs,
                input_range=spec.data.input_range,
                where=train_set.description,
            )
            train = EvalData(train_set.x.to(p.device), train_set.y.to(p.device), p.data.batch_size)
            fragile: set[str] = set()
            for f in spec.filtering.filters:
                for a in spec.attack_specs:
                    fragile |= {
                        s.layer or ""
                        for s in self.sweeps(f, a.id)
                        if s.scope == "local" and getattr(s.labels, settings.response) == "fragile"
                    }
            names = [layer.name for layer in p.layers]
            fgsm = next((a for a in spec.attack_specs if isinstance(a, FGSMSpec)), None)
            mix = build_attack(
                fgsm or FGSMSpec(eps=DEFAULT_FGSM_EPS), spec.data.input_range, spec.seed
            )
            relative = f"remediated/{safe_file_stem(spec.name)}.safetensors"
            self._remediation = selective_retrain(
                p.loaded.module,
                inner_prefix="model.",
                fragile_layers=[n for n in names if n in fragile],
                trained_layers=[n for n in names if n not in fragile],
                test=p.data,
                train=train,
                attack=self._attack(spec.attack_specs[0].id),
                mix_attack=mix,
                settings=settings,
                seed=spec.seed,
                checkpoint_path=Path(self.output_dir or spec.report.dir) / relative,
                checkpoint_name=relative,
                progress=self.progress,
            )
            verify_unchanged(p.loaded.module, p.digest, "remediation")
            self.timings["remediation"] = time.perf_counter() - t0
        return self._remediation

    # ----------------------------------------------------------------- compare
    def peers(self) -> list[AuditSession]:
        """Sessions of the specs in ``compare:``, in order (created once)."""
        if self._peers is None:
            self._peers = [self.peer_factory(path) for path in self.spec.compare]
            names = [self.spec.name, *(peer.spec.name for peer in self._peers)]
            if len(set(names)) != len(names):
                raise SpecError(
                    f"{self.spec.source_path}: compare: the compared specs must have different "
                    f"names, got {names}; rename one of them."
                )
        return self._peers

    def transfer_model(self) -> TransferModel:
        """What transferability needs of this model: its network, test set and attacks."""
        p = self.prepared
        attacks = {a.id: self._attack(a.id) for a in self.spec.attack_specs}
        return TransferModel(
            self.spec.name, p.loaded.module, p.data.x, p.data.y, p.data.batch_size, attacks
        )

    def transfer(self) -> list[dict[str, Any]]:
        """Transferability between this model and the compared ones (computed once)."""
        if self._transfer is None:
            self._transfer = transferability([s.transfer_model() for s in [self, *self.peers()]])
        return self._transfer

    # ----------------------------------------------------------------- what was computed
    @property
    def is_prepared(self) -> bool:
        """Whether the model and data are loaded (``prepared`` is a cached property)."""
        return "prepared" in vars(self)

    @property
    def computed_remediation(self) -> dict[str, Any] | None:
        return self._remediation

    @property
    def computed_transfer(self) -> list[dict[str, Any]] | None:
        return self._transfer

    # ----------------------------------------------------------------- spectral analysis
    @cached_property
    def lipschitz(self) -> LipschitzResult:
        """Upper Lipschitz bounds of the analysed layers and of the whole network (§1.6)."""
        t0 = time.perf_counter()
        p = self.prepared
        normalize = self.spec.data.normalize
        result = lipschitz_bounds(
            p.loaded.inner,
            p.loaded.module.normalize(p.data.x[:1]),
            layers=[layer.name for layer in p.layers],
            input_scale=1.0 / min(normalize.std) if normalize is not None else 1.0,
            progress=self.progress,
        )
        self.timings["lipschitz"] = time.perf_counter() - t0
        return result

    # ----------------------------------------------------------------- sweeps
    @cached_property
    def data_sha256(self) -> str:
        """SHA-256 of the test tensors as loaded: a regenerated data file is new data."""
        return tensors_sha256(self.prepared.data.x, self.prepared.data.y)

    def cache_key(self, filter_name: str, attack_id: str) -> str:
        """Identifies a sweep's inputs: checkpoint, model source, data content, everything in
        the spec that changes it, versions."""
        spec = self.spec
        relevant = {
            "version": __version__,
            "torch": torch.__version__,
            "checkpoint": self.prepared.loaded.checkpoint_sha256,
            "model_source": self.prepared.loaded.source_sha256,
            "data_content": self.data_sha256,
            "model": spec.model.model_dump(mode="json"),
            "data": spec.data.model_dump(mode="json"),
            "filtering": spec.filtering.model_dump(mode="json"),
            "attack": spec.attack(attack_id).model_dump(mode="json") | {"id": attack_id},
            "seed": spec.seed,
            "device": self.prepared.device.type,
            "filter": filter_name,
        }
        if spec.compute.precision != "fp32":  # fp32 keeps the keys of earlier versions
            relevant["compute"] = spec.compute.model_dump(mode="json")
        if self._plan is not None:  # where a sequential sweep stops depends on all of these
            relevant["sequential"] = {
                "statistics": None if spec.statistics is None else spec.statistics.model_dump(),
                "checks": spec.checks.model_dump(mode="json"),
                "baseline": None if spec.baseline is None else str(spec.baseline),
            }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()

    def sweeps(self, filter_name: str, attack_id: str) -> list[SweepResult]:
        """Local sweeps (one per layer, in model order) then the global one, as the spec asks."""
        key = (filter_name, attack_id)
        if key not in self._sweeps:
            cached = None
            if self.cache is not None:
                cached = self.cache.get(self.cache_key(filter_name, attack_id))
            needs_outcomes = self.spec.statistics is not None
            if cached is not None and needs_outcomes and any(s.outcomes is None for s in cached):
                cached = None  # an entry written before outcomes were kept
            bf16 = self.spec.compute.precision != "fp32"
            if cached is not None and bf16:
                record = getattr(self.cache, "get_record", lambda key: None)(
                    self.cache_key(filter_name, attack_id)
                )
                if record is None:
                    cached = None  # no compute record: recomputed rather than reported without
                else:
                    self._restore_compute(record)
            if self.ranks is not None and not self.ranks.all_true(cached is not None):
                cached = None  # every rank computes the sweep, or none does
            if cached is None:
                t0 = time.perf_counter()
                label, planned = f"sweep {filter_name} {attack_id}", self._variants_planned()
                unit, n = "variant", self.prepared.data.n
                if self._plan is not None:  # each round evaluates a variant again, on new examples
                    planned, unit = planned * self._plan.rounds, "variant round"
                with progress_step(self.progress, label, planned, unit, n):
                    cached = self._in_rounds(filter_name, attack_id, self._compute_in_precision)
                where = f"sweeps of {filter_name} under {attack_id}"
                verify_unchanged(self.prepared.loaded.module, self.prepared.digest, where)
                self.timings[f"sweep {filter_name} {attack_id}"] = time.perf_counter() - t0
                self.computed_sweeps += 1
                if self.cache is not None and (self.ranks is None or self.ranks.rank == 0):
                    self.cache.put(self.cache_key(filter_name, attack_id), cached)
                    if bf16 and hasattr(self.cache, "put_record"):
                        record = self.group_compute_record(filter_name, attack_id)
                        self.cache.put_record(self.cache_key(filter_name, attack_id), record)
            self._sweeps[key] = self._with_statistics(key, cached)
        return self._sweeps[key]

    # ----------------------------------------------------------------- statistics
    @cached_property
    def _resample_weights(self) -> Any:
        """One seeded resample of the examples, shared by every sweep (a paired bootstrap)."""
        assert self.spec.statistics is not None
        n, resamples = self.prepared.data.n, self.spec.statistics.resamples
        return resample_weights(resample_indices(n, resamples, self.spec.seed))

    def _with_statistics(
        self, key: tuple[str, str], sweeps: list[SweepResult]
    ) -> list[SweepResult]:
        """The sweeps with their intervals and label probabilities, when the spec asks."""
        stats = self.spec.statistics
        if stats is None or any(s.outcomes is None for s in sweeps):
            return sweeps
        t0 = time.perf_counter()
        tolerance = self.spec.filtering.tolerance
        draws = [
            bootstrap_sweep(s.outcomes, s.removed_fraction, self._weights(s.outcomes.n), tolerance)
            for s in sweeps
            if s.outcomes is not None
        ]
        self._draws[key] = draws
        out = [
            replace(s, statistics=sweep_statistics(s.outcomes, d, self.confidence))
            for s, d in zip(sweeps, draws, strict=True)
            if s.outcomes is not None
        ]
        self.timings["statistics"] = self.timings.get("statistics", 0.0) + (
            time.perf_counter() - t0
        )
        return out

    def sweep_draws(self, filter_name: str, attack_id: str) -> list[SweepDraws]:
        """Each sweep's bootstrap draws, aligned with ``sweeps(filter_name, attack_id)``."""
        sweeps = self.sweeps(filter_name, attack_id)
        draws = self._draws.get((filter_name, attack_id))
        if draws is None:
            raise AuditError(
                f"statistics: the sweeps of {filter_name} under {attack_id} kept no per-example "
                "outcomes (filtering.fast's batched passes do not), so they have no intervals"
            )
        assert len(draws) == len(sweeps)
        return draws

    def clean_accuracy_interval(self) -> list[float] | None:
        """Wilson interval of the unfiltered clean accuracy; None without ``statistics:``."""
        stats = self.spec.statistics
        if stats is None:
            return None
        return accuracy_interval(self.clean_accuracy(), self.examples_used(None), self.confidence)

    def with_interval(self, attack: AttackResult) -> AttackResult:
        """``attack`` with the Wilson interval of its accuracy, when the spec asks for them."""
        stats = self.spec.statistics
        if stats is None:
            return attack
        n = self.examples_used(attack.id)
        return replace(attack, accuracy_ci=accuracy_interval(attack.accuracy, n, self.confidence))

    def sampling(self) -> Sampling | None:
        """What the checks need for intervals and decisions; None without ``statistics:``."""
        stats = self.spec.statistics
        if stats is None:
            return None
        return Sampling(
            self.confidence,
            stats.decide,
            self.prepared.data.n,
            self.sweep_draws,
            examples=self.examples_used if self._plan is not None else None,
        )

    # ----------------------------------------------------------------- sequential evaluation
    _round_open: set[str | None] | None = None  # in a round: the sweeps (by layer) still open

    @cached_property
    def _plan(self) -> RoundPlan | None:
        """The rounds of ``statistics.sequential`` (None without it)."""
        stats = self.spec.statistics
        if stats is None or stats.sequential is None:
            return None
        if getattr(self, "ranks", None) is not None:
            raise AuditError(
                f"{self.spec.source_path or self.spec.name}: statistics.sequential does not run "
                "under torchrun yet: run the audit in one process, or remove the key"
            )
        data, sequential = self.prepared.data, stats.sequential
        return RoundPlan.of(
            data.n, sequential.round, sequential.block, data.batch_size, self.spec.seed
        )

    @property
    def confidence(self) -> float:
        """The confidence of every interval: the spec's, or in a sequential run the per-look
        confidence that keeps all looks together at the spec's (docs/method.md §8)."""
        stats = self.spec.statistics
        assert stats is not None
        plan = self._plan
        return stats.confidence if plan is None else look_confidence(stats.confidence, plan.rounds)

    def _weights(self, n: int) -> Any:
        """Bootstrap weights for sweeps measured on ``n`` examples: the whole test set's
        shared resample, or one shared by every sweep that stopped at ``n``."""
        if n == self.prepared.data.n:
            return self._resample_weights
        if n not in self._partial_weights:
            assert self.spec.statistics is not None
            indices = resample_indices(n, self.spec.statistics.resamples, self.spec.seed)
            self._partial_weights[n] = resample_weights(indices)
        return self._partial_weights[n]

    @cached_property
    def _partial_weights(self) -> dict[int, Any]:
        return {}

    @cached_property
    def _examples(self) -> dict[str | None, int]:
        return {}

    @cached_property
    def _round_states(self) -> dict[int, tuple[dict[str, Any], dict[str, Any]]]:
        return {}

    def examples_used(self, attack_id: str | None) -> int:
        """Examples an unfiltered accuracy was measured on (None: the clean accuracy)."""
        return self._examples.get(attack_id, self.prepared.data.n)

    @contextmanager
    def _round(self, r: int, open_keys: list[str | None]) -> Iterator[None]:
        """Inside, the session evaluates round ``r``'s examples only (its own evaluators,
        kept for the other filters' rounds), and only the sweeps ``open_keys``."""
        assert self._plan is not None
        p = self.prepared
        full, share = p.data, self.__dict__.get("share")
        saved = (self._evaluators, self._unfiltered_outcomes)
        self._evaluators, self._unfiltered_outcomes = self._round_states.setdefault(r, ({}, {}))
        p.data = self.__dict__["share"] = self._plan.data(full, r)
        self._round_open = set(open_keys)
        try:
            yield
        finally:
            p.data = full
            self.__dict__.pop("share")
            if share is not None:
                self.__dict__["share"] = share
            self._evaluators, self._unfiltered_outcomes = saved
            self._round_open = None

    def _in_rounds(
        self,
        filter_name: str,
        attack_id: str,
        compute: Callable[[FilterName, str], list[SweepResult]],
    ) -> list[SweepResult]:
        """``compute``'s sweeps on the whole test set, or with ``statistics.sequential`` round
        by round until each is decided (sequential.py)."""
        plan = self._plan
        if plan is None:
            return compute(filter_name, attack_id)  # type: ignore[arg-type]
        keys: list[str | None] = []
        if "local" in self.spec.filtering.scopes:
            keys += [layer.name for layer in self.prepared.layers]
        if "global" in self.spec.filtering.scopes:
            keys.append(None)
        tolerance = self.spec.filtering.tolerance
        precision = self.spec.compute.precision
        confirm = precision != "fp32" and self.spec.compute.confirms
        if confirm:  # rounds in bf16 alone; each sweep is confirmed once, when it closes

            def compute(f: FilterName, a: str) -> list[SweepResult]:
                t0 = time.perf_counter()
                out = self._compute_sweeps(f, a, precision)
                self.timings["bf16"] = self.timings.get("bf16", 0.0) + time.perf_counter() - t0
                return out

        def rounds_of(
            compute: Callable[[FilterName, str], list[SweepResult]],
        ) -> Callable[[int, list[Any]], dict[Any, SweepResult]]:
            def evaluate_round(r: int, open_keys: list[Any]) -> dict[Any, SweepResult]:
                with self._round(r, open_keys):
                    return {s.layer: s for s in compute(filter_name, attack_id)}  # type: ignore[arg-type]

            return evaluate_round

        def draws_of(sweep: SweepResult) -> SweepDraws:
            assert sweep.outcomes is not None
            weights = self._weights(sweep.outcomes.n)
            return bootstrap_sweep(sweep.outcomes, sweep.removed_fraction, weights, tolerance)

        sampling = self.sampling()
        assert sampling is not None
        group = (filter_name, attack_id)
        settled = group_settled(self, group, plan_checks(self.spec), sampling, draws_of)

        def merge(parts: list[SweepResult]) -> SweepResult:
            return merge_rounds(parts, plan, tolerance)

        parts: dict[Any, list[SweepResult]] = {}
        sweeps = run_in_rounds(keys, plan, rounds_of(compute), merge, settled, parts)
        if not confirm:
            return sweeps
        t0 = time.perf_counter()
        near = self._confirm_rounds(filter_name, attack_id, sweeps, parts, merge)  # type: ignore[arg-type]
        self.timings["confirm"] = self.timings.get("confirm", 0.0) + time.perf_counter() - t0
        if not near:
            return sweeps
        # A confirmed sweep is looked at again in fp32; still undecided, it goes on in fp32.
        fp32 = rounds_of(lambda f, a: self._compute_sweeps(f, a, "fp32"))
        return run_in_rounds(keys, plan, fp32, merge, settled, parts, reopen=near)

    def _confirm_rounds(
        self,
        filter_name: FilterName,
        attack_id: str,
        sweeps: list[SweepResult],
        parts: dict[str | None, list[SweepResult]],
        merge: Callable[[list[SweepResult]], SweepResult],
    ) -> list[str | None]:
        """Confirm sequential bf16 sweeps once each, on the examples each used: calibrate on
        them (the unfiltered network over the group's rounds, each sweep's variant nearest
        half removed over its own), and re-run in fp32, round by round, the sweeps within the
        margin of a boundary; their ``parts`` become the fp32 rounds. Returns those keys."""
        assert self._plan is not None
        n = self._plan.n
        if self._calibration is None:
            self._calibration = Calibration(n)
        used = {s.layer: len(parts[s.layer]) for s in sweeps}
        self._calibrate_rounds(filter_name, attack_id, sweeps, used)
        group = self._calibration.of_group(filter_name, attack_id)
        near: list[str | None] = []
        for s in sweeps:
            assert s.outcomes is not None
            m = s.outcomes.n
            reference = (
                float(s.outcomes.unpacked(s.outcomes.unfiltered_clean).sum()) / m,
                float(s.outcomes.unpacked(s.outcomes.unfiltered_adversarial).sum()) / m,
            )
            if self._near_boundary(s, group.margin_for(m), reference, m):
                near.append(s.layer)
        records = self._precision_sweeps[-len(sweeps) :]
        fp32: dict[str | None, list[SweepResult]] = {key: [] for key in near}
        label = f"confirm {filter_name} {attack_id} in fp32"
        total = sum(used[key] for key in near) * self.spec.filtering.thresholds
        with progress_step(self.progress, label, total, "variant round", n):
            for r in range(max((used[key] for key in near), default=0)):
                due = [key for key in near if used[key] > r]
                with self._round(r, due):
                    for out in self._compute_sweeps(filter_name, attack_id, "fp32"):
                        fp32[out.layer].append(out)
        for s, record in zip(sweeps, records, strict=True):
            if s.layer in fp32:
                parts[s.layer] = fp32[s.layer]
                checked = largest_difference(s, merge(fp32[s.layer]))
                record["fp32_max_abs_accuracy_difference"] = checked
        return near

    def _calibrate_rounds(
        self,
        filter_name: FilterName,
        attack_id: str,
        sweeps: list[SweepResult],
        used: dict[str | None, int],
    ) -> None:
        """``_calibrate`` for sweeps evaluated in rounds: each pair on the rounds it used."""
        assert self._calibration is not None
        pairs, filtering = self._calibration.pairs, self.spec.filtering
        rounds = max(used.values(), default=0)
        if rounds and not any(p.where == f"unfiltered {attack_id}" for p in pairs):
            counts, m = np.zeros((2, 2)), 0
            for r in range(rounds):
                with self._round(r, []):
                    size = self.prepared.data.n
                    both = (self._evaluator(attack_id)[1], self._evaluator(attack_id, "bf16")[1])
                    counts += np.round(np.asarray(both) * size)
                    m += size
            (c32, a32), (c16, a16) = (counts / m).tolist()
            pairs.append(PairedVariant(f"unfiltered {attack_id}", (c32, a32), (c16, a16)))
        for s in sweeps:
            k = calibration_index(s)
            if k is None:
                continue
            correct, m = np.zeros(2), 0
            for r in range(used[s.layer]):
                with self._round(r, [s.layer]), frozen_parameters(self.prepared.loaded.module):
                    tensors = self._scope_tensors(s.layer)
                    variant = evaluate_variant(
                        tensors, self._ordering(s.layer, tensors), filter_name, s.thresholds[k],
                        self._evaluator(attack_id)[0], thresholds=filtering.thresholds,
                        values=filtering.values,
                        value_range=filtering.range if s.scope == "global" else None,
                    )  # fmt: skip
                    correct += np.round(np.asarray(variant) * self.prepared.data.n)
                    m += self.prepared.data.n
            where = f"{filter_name} {attack_id} {s.layer or 'global'} threshold {k}"
            fp32 = (float(correct[0] / m), float(correct[1] / m))
            pairs.append(
                PairedVariant(where, fp32, (s.clean_accuracy[k], s.adversarial_accuracy[k]))
            )

    def _unfiltered_parts(self, attack_id: str | None, correct: Callable[[], int]) -> Any:
        """The data an unfiltered accuracy is measured on: the whole (share of the) test set,
        or with ``statistics.sequential`` and a check on that accuracy, rounds until the check
        is certain at the look confidence."""
        checks = self.spec.checks
        limit = (
            checks.min_clean_accuracy
            if attack_id is None
            else checks.min_adversarial_limit(self.spec.attack(attack_id))
        )
        plan = self._plan
        # eps_not_monotone compares an ε curve's points example by example: all examples
        on_curve = attack_id is not None and any(
            attack_id in {p.id for p in c.points()} for c in self.spec.curves
        )
        if plan is None or limit is None or on_curve:
            self._examples[attack_id] = self.prepared.data.n
            yield getattr(self, "share", self.prepared.data)
            return

        def decided(used: int) -> bool:
            self._examples[attack_id] = used
            return accuracy_decided(correct(), used, limit, self.confidence)

        yield from rounds_until(plan, self.prepared.data, decided)

    def _clean_batches(self, correct: Callable[[], int]) -> Any:
        for data in self._unfiltered_parts(None, correct):
            yield from data.batches()

    def _attacked_batches(
        self, attack_id: str, attack: Attack, model: torch.nn.Module, correct: Callable[[], int]
    ) -> Any:
        self._starts_seen: list[int] = []
        for data in self._unfiltered_parts(attack_id, correct):
            for index, *rest in data.attacked(attack, model):
                self._starts_seen.append(data.offset(index))
                yield index, *rest

    def _in_test_order(self, *per_batch: list[torch.Tensor]) -> Any:
        """Per-batch values put back in the test set's order (rounds visit blocks out of
        order), so that their means are summed as in the full run, bit for bit."""
        order = np.argsort(self._starts_seen, kind="stable")
        return [[values[i] for i in order] for values in per_batch]

    def examples_deciding(self, planned: PlannedCheck) -> str | None:
        """In a sequential run, the examples a check was decided on ("128", or "192–360" across
        the sweeps it reads); None otherwise."""
        plan = self._plan
        if plan is None or not is_check(planned):
            return None
        if planned.check in ("min_clean_accuracy", "min_adversarial_accuracy"):
            return str(self.examples_used(planned.attack))
        if planned.filter is None or planned.attack is None:
            return None
        used = [
            s.sequential.examples
            for s in self.sweeps(planned.filter, planned.attack)
            if s.sequential is not None
        ]
        if not used:
            return None
        lo, hi = min(used), max(used)
        return f"{lo}" if lo == hi else f"{lo}–{hi}"

    def _noted(self, planned: PlannedCheck, result: CheckResult) -> CheckResult:
        """In a sequential run, the check's detail says how many examples decided it."""
        used = self.examples_deciding(planned)
        if used is None:
            return result
        n = self.prepared.data.n
        note = f"sequential: decided on {used} of {n} examples"
        if planned.filter is not None:
            note = f"sequential: sweeps on {used} of {n} examples"
        return replace(result, detail=f"{result.detail}; {note}")

    def statistics_record(self) -> dict[str, Any] | None:
        """``statistics`` of results.json: the spec's settings, and in a sequential run the
        rounds, the per-look confidence and the examples each unfiltered accuracy used."""
        stats = self.spec.statistics
        if stats is None:
            return None
        record = stats.model_dump(mode="json", exclude_none=True)
        plan = self._plan
        if plan is not None:
            record["sequential"] |= {
                "block": plan.block,
                "rounds": plan.rounds,
                "look_confidence": self.confidence,
                # Measured here (the plugin merges what each worker measured).
                "examples": {key or "clean_accuracy": used for key, used in self._examples.items()},
            }
        return record

    def _evaluator(
        self, attack_id: str, precision: Literal["fp32", "bf16"] = "fp32"
    ) -> tuple[Evaluator, tuple[float, float]]:
        """The attack's evaluator and the unfiltered network's (clean, adversarial) accuracy.

        The unfiltered network goes through the same evaluation path as every variant, once
        per attack, so thresholds that zero nothing reuse a result computed like the others.
        A bf16 evaluator's own unfiltered result only calibrates (``precision.py``): the
        sweeps take fp32's.
        """
        key = attack_id if precision == "fp32" else f"{attack_id} {precision}"
        if key not in self._evaluators:
            p = self.prepared
            source = self.spec.filtering.adversarial_source
            evaluator = Evaluator(
                p.loaded.module,
                self.share,
                self._attack(attack_id),
                source,
                splitter=self.splitter,
                prefix_budget=self.spec.filtering.prefix_cache_mb << 20,
                fast=self.spec.filtering.fast,
                precision=precision,
                channels_last=precision != "fp32"
                and self.spec.compute.channels_last(self.prepared.data.x.dim()),
            )
            evaluator.ranks = self.ranks
            self._evaluators[key] = (evaluator, evaluator.evaluate())
            if precision == "fp32":
                self._unfiltered_outcomes[attack_id] = evaluator.last_outcomes
            elif self._bf16_speed is None:
                self._bf16_speed = self._time_precisions(attack_id, evaluator)
        return self._evaluators[key]

    def _time_precisions(self, attack_id: str, approximate: Evaluator) -> dict[str, Any]:
        """bf16 is fast only where the kernels are (large convolutions, matrix units): a small
        or depthwise network can run slower in it. One more evaluation of the unfiltered
        network in each precision, both warm, says which is faster on this model and device
        (results.json ``meta.bf16_speed``; the summary and report warn when bf16 was slower)."""
        exact = self._evaluator(attack_id)[0]
        seconds = []
        for evaluator in (exact, approximate):
            t0 = time.perf_counter()
            evaluator.evaluate()
            synchronize(self.prepared.device)
            seconds.append(time.perf_counter() - t0)
        fp32, bf16 = (round(s, 6) for s in seconds)
        return {
            "attack": attack_id,
            "examples": self.share.n,
            "fp32_seconds": fp32,
            "bf16_seconds": bf16,
            "speedup": float(f"{fp32 / max(bf16, 1e-6):.4g}"),  # four significant digits
        }

    # ----------------------------------------------------------------- precision
    def _compute_in_precision(self, filter_name: FilterName, attack_id: str) -> list[SweepResult]:
        """The sweeps in ``compute.precision``; under bf16 with ``confirm``, every sweep within
        the calibrated margin of a boundary re-run in fp32 (``precision.py``)."""
        compute = self.spec.compute
        if compute.precision == "fp32":
            return self._compute_sweeps(filter_name, attack_id)
        t0 = time.perf_counter()
        sweeps = self._compute_sweeps(filter_name, attack_id, compute.precision)
        self.timings["bf16"] = self.timings.get("bf16", 0.0) + time.perf_counter() - t0
        if not compute.confirms:
            return sweeps
        t0 = time.perf_counter()
        self._calibrate(filter_name, attack_id, sweeps)
        assert self._calibration is not None
        margin = self._calibration.of_group(filter_name, attack_id).margin
        reference = self._evaluator(attack_id)[1]
        near = [
            (s.scope, s.layer)
            for s in sweeps
            if self._near_boundary(s, margin, reference, self.prepared.data.n)
        ]
        if near:
            label = f"confirm {filter_name} {attack_id} in fp32"
            total = len(near) * self.spec.filtering.thresholds
            with progress_step(self.progress, label, total, "variant", self.prepared.data.n):
                exact = self._compute_sweeps(filter_name, attack_id, "fp32", only=set(near))
            by_scope = {(s.scope, s.layer): s for s in exact}
            # A confirmed sweep checks the margin at every threshold, at no extra cost.
            records = self._precision_sweeps[-len(sweeps) :]
            for s, record in zip(sweeps, records, strict=True):
                if (s.scope, s.layer) in by_scope:
                    checked = largest_difference(s, by_scope[(s.scope, s.layer)])
                    record["fp32_max_abs_accuracy_difference"] = checked
            sweeps = [by_scope.get((s.scope, s.layer), s) for s in sweeps]
        self.timings["confirm"] = self.timings.get("confirm", 0.0) + time.perf_counter() - t0
        return sweeps

    def _near_boundary(
        self, sweep: SweepResult, margin: float, reference: tuple[float, float], examples: int
    ) -> bool:
        """Whether a bf16 sweep lies within ``margin`` (in accuracy, propagated to its scores
        through ``reference``, the fp32 unfiltered accuracies) of a boundary its labels,
        targeted flag or a check compare with; its record in ``compute.sweeps`` says why."""
        margins = score_margins(sweep, margin, reference)
        reasons = near_boundary(
            sweep, margins, self.spec.filtering.tolerance, self._score_drop_values(sweep, margins)
        )
        self._precision_sweeps.append(
            {
                "filter": sweep.filter,
                "attack": sweep.attack,
                "scope": sweep.scope,
                "layer": sweep.layer,
                "examples": examples,
                "precision": "fp32" if reasons else "bf16",
                "confirmed": bool(reasons),
                "reasons": reasons,
                "accuracy_margin": margin,
                "score_margins": asdict(margins),
            }
        )
        return bool(reasons)

    def _calibrate(
        self, filter_name: FilterName, attack_id: str, sweeps: list[SweepResult]
    ) -> None:
        """Add to the run's calibration the variants of ``sweeps`` evaluated in both
        precisions: the unfiltered network (once per attack) and, per sweep, the variant
        nearest half the scope removed."""
        n = self.prepared.data.n
        if self._calibration is None:
            self._calibration = Calibration(n)
        pairs = self._calibration.pairs
        if not any(p.where == f"unfiltered {attack_id}" for p in pairs):
            exact = self._evaluator(attack_id)[1]
            approximate = self._evaluator(attack_id, self.spec.compute.precision)[1]
            pairs.append(PairedVariant(f"unfiltered {attack_id}", exact, approximate))
        evaluator = self._evaluator(attack_id)[0]
        filtering = self.spec.filtering
        with frozen_parameters(self.prepared.loaded.module):
            for s in sweeps:
                k = calibration_index(s)
                if k is None:
                    continue
                tensors = self._scope_tensors(s.layer)
                ordering = self._ordering(s.layer, tensors)
                value_range = filtering.range if s.scope == "global" else None
                exact = evaluate_variant(
                    tensors, ordering, filter_name, s.thresholds[k], evaluator,
                    thresholds=filtering.thresholds, values=filtering.values,
                    value_range=value_range,
                )  # fmt: skip
                where = f"{filter_name} {attack_id} {s.layer or 'global'} threshold {k}"
                approximate = (s.clean_accuracy[k], s.adversarial_accuracy[k])
                pairs.append(PairedVariant(where, exact, approximate))

    def _scope_tensors(self, layer_name: str | None) -> list[torch.Tensor]:
        """The tensors one sweep filters: one layer's, or every analysed layer's (global)."""
        layers = [layer for layer in self.prepared.layers if layer_name in (None, layer.name)]
        return list({id(t): t for layer in layers for t in layer.parameters}.values())

    def _score_drop_values(
        self, sweep: SweepResult, margins: ScoreMargins
    ) -> list[tuple[str, float, float, float]]:
        """``max_score_drop``'s value for each score of ``sweep`` against its limit."""
        limit = self.spec.checks.max_score_drop
        if limit is None or self.spec.baseline is None:
            return []
        old = next(
            (
                b
                for b in self.baseline_model().sweeps
                if (b.scope, b.layer, b.filter, b.attack)
                == (sweep.scope, sweep.layer, sweep.filter, sweep.attack)
            ),
            None,
        )
        if old is None:
            return []
        return [
            (
                f"{response} score drop",
                getattr(old.scores, response) - getattr(sweep.scores, response),
                float(limit),
                getattr(margins, response),
            )
            for response in ("clean", "adversarial", "difference")
        ]

    def compute_record(self) -> dict[str, Any] | None:
        """results.json's ``compute``: precision, calibration, and each bf16 sweep's fate;
        None for fp32 (the results are then exactly what they always were)."""
        compute = self.spec.compute
        if compute.precision == "fp32":
            return None
        return compute_summary(self.compute_head(), self._calibration, self._precision_sweeps)

    def compute_head(self) -> dict[str, Any]:
        """The ``compute`` record's settings: precision, memory format, confirmation."""
        compute, n_dims = self.spec.compute, self.prepared.data.x.dim()
        return {
            "precision": compute.precision,
            "memory_format": "channels_last" if compute.channels_last(n_dims) else "contiguous",
            "confirm": compute.confirms,
        }

    def group_compute_record(self, filter_name: str, attack_id: str) -> dict[str, Any]:
        """What one (filter, attack) group added to the ``compute`` record: its sweeps' records
        and the calibration pairs measured on them (kept with its cached sweeps, carried by
        the pytest plugin's items)."""
        calibration = self._calibration or Calibration(self.prepared.data.n)
        pairs = calibration.of_group(filter_name, attack_id).pairs
        return {
            "sweeps": [
                r
                for r in self._precision_sweeps
                if (r["filter"], r["attack"]) == (filter_name, attack_id)
            ],
            "pairs": [
                {"where": p.where, "fp32": list(p.fp32), "bf16": list(p.bf16)} for p in pairs
            ],
        }

    def _restore_compute(self, record: dict[str, Any]) -> None:
        """A cached group's ``compute`` records back in this session's."""
        self._precision_sweeps.extend(record["sweeps"])
        if self.spec.compute.confirms:
            if self._calibration is None:
                self._calibration = Calibration(self.prepared.data.n)
            known = {p.where for p in self._calibration.pairs}
            restored = calibration_from_json(self.prepared.data.n, {"pairs": record["pairs"]})
            self._calibration.pairs += [p for p in restored.pairs if p.where not in known]

    def _ordering(self, scope: str | None, tensors: list[torch.Tensor]) -> SortedScope:
        """A scope's sorted values, computed once for every filter and attack (the weights
        cannot change between sweeps: the model's digest is verified after each)."""
        if scope not in self._orderings:
            self._orderings[scope] = SortedScope.of(tensors, self.spec.filtering.values)
        return self._orderings[scope]

    def _compute_sweeps(
        self,
        filter_name: FilterName,
        attack_id: str,
        precision: Literal["fp32", "bf16"] = "fp32",
        only: set[tuple[str, str | None]] | None = None,
    ) -> list[SweepResult]:
        """The sweeps of ``filter_name`` under ``attack_id`` in ``precision`` (``only``: just
        those (scope, layer))."""
        p = self.prepared
        filtering = self.spec.filtering
        model = p.loaded.module
        results: list[SweepResult] = []
        with frozen_parameters(model):
            evaluator, unfiltered = self._evaluator(attack_id)
            if precision != "fp32":
                evaluator = self._evaluator(attack_id, precision)[0]
            scopes: list[tuple[str, str | None, list[AnalysedLayer]]] = []
            if "local" in filtering.scopes:
                scopes += [("local", layer.name, [layer]) for layer in p.layers]
            if "global" in filtering.scopes:
                scopes.append(("global", None, p.layers))
            for scope, layer_name, layers in scopes:
                if self._round_open is not None and layer_name not in self._round_open:
                    continue  # a sequential sweep already decided
                if only is not None and (scope, layer_name) not in only:
                    continue
                # A tensor tied into several layers is one tensor of the scope, counted once.
                tensors = list({id(t): t for layer in layers for t in layer.parameters}.values())
                where = f"{filter_name} {attack_id} {layer_name or 'global'}"
                focus = (
                    evaluator.focus(layer_name, tensors)
                    if layer_name is not None
                    else nullcontext()
                )
                with focus:
                    curves = sweep_scope(
                        tensors,
                        filter_name,
                        thresholds=filtering.thresholds,
                        values=filtering.values,
                        evaluator=evaluator,
                        unfiltered=unfiltered,
                        value_range=filtering.range if scope == "global" else None,
                        ordering=self._ordering(layer_name, tensors),
                        on_variant=self._variant_hook(where),
                        unfiltered_outcomes=self._unfiltered_outcomes.get(attack_id),
                    )
                scored = score_curves(
                    curves.clean_accuracy,
                    curves.adversarial_accuracy,
                    curves.removed_fraction,
                    clean_reference=unfiltered[0],
                    adversarial_reference=unfiltered[1],
                    tolerance=filtering.tolerance,
                )
                results.append(
                    SweepResult(
                        scope=scope,
                        layer=layer_name,
                        filter=filter_name,
                        attack=attack_id,
                        numel=curves.numel,
                        thresholds=curves.thresholds,
                        removed_fraction=curves.removed_fraction,
                        clean_accuracy=curves.clean_accuracy,
                        adversarial_accuracy=curves.adversarial_accuracy,
                        **scored.as_fields(),
                        layers=[layer.name for layer in layers] if scope == "global" else [],
                        evaluated_variants=curves.evaluated_variants,
                        inert_thresholds=curves.inert_thresholds,
                        outcomes=self._outcomes_of(curves, attack_id),
                    )
                )
        return results

    def _outcomes_of(self, curves: Any, attack_id: str) -> SweepOutcomes | None:
        """The sweep's per-example outcomes, packed, with the unfiltered network's."""
        unfiltered = self._unfiltered_outcomes.get(attack_id)
        if curves.outcomes is None or unfiltered is None:
            return None
        return SweepOutcomes(
            self.prepared.data.n,
            np.stack([clean for clean, _ in curves.outcomes]),
            np.stack([adversarial for _, adversarial in curves.outcomes]),
            unfiltered[0],
            unfiltered[1],
        )

    # ----------------------------------------------------------------- regression checks
    def scope_members(self) -> Members:
        """Each analysed layer's tensors by name, so a tied tensor counts once (method §4)."""
        p = self.prepared
        return scope_members(p.loaded.inner, p.layers)

    def baseline_model(self) -> ModelResult:
        """This model's entry in the released results that the regression checks compare with."""
        assert self.spec.baseline is not None  # the spec validator guarantees it
        return find_baseline_model(
            read_results(self.spec.baseline),
            self.spec.name,
            baseline=self.spec.baseline,
            spec=self.spec.source_path,
            line=self.spec.line_of("baseline"),
        )

    # ----------------------------------------------------------------- the whole audit
    def evaluate(self, planned: PlannedCheck) -> CheckResult:
        return self._noted(planned, evaluate_check(planned, self))

    def model_result(self, checks: list[CheckResult]) -> ModelResult:
        """Everything the spec asks for, computing what no item has computed yet."""
        spec = self.spec
        attacks = [self.attack_result(a.id) for a in spec.attack_points]
        sweeps = [
            s
            for f in spec.filtering.filters
            for a in spec.attack_specs
            for s in self.sweeps(f, a.id)
        ]
        p = self.prepared
        attacks = [self.with_interval(a) for a in attacks]
        return ModelResult(
            name=spec.name,
            checkpoint_sha256=p.loaded.checkpoint_sha256,
            n_examples=p.data.n,
            clean_accuracy=self.clean_accuracy(),
            attacks=attacks,
            sweeps=sweeps,
            lipschitz=self.lipschitz,
            remediation=self.remediation(),
            checks=checks,
            spec_path=str(spec.source_path or ""),
            layers=[
                {"name": layer.name, "type": layer.type, "numel": layer.numel} for layer in p.layers
            ],
            tolerance=spec.filtering.tolerance,
            values=spec.filtering.values,
            adversarial_source=spec.filtering.adversarial_source,
            clean_accuracy_ci=self.clean_accuracy_interval(),
            statistics=self.statistics_record(),
            eps_curves=self.eps_curves(),
            compute=self.compute_record(),
            units=self.unit_semantics(),
        )

    def meta(self, seconds: float) -> dict[str, Any]:
        p = self.prepared
        return {
            "version": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
            "device": describe_device(p.device),
            "torch_threads": torch.get_num_threads(),
            "batch_size": f"{p.data.batch_size} ({p.batch_note})",
            "seed": self.spec.seed,
            "spec": str(self.spec.source_path or ""),
            "spec_sha256": self.spec.sha256,
            "started": self.started,
            "seconds": round(seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "deterministic": p.settings,
            "peak_memory_mb": peak_memory_mb(p.device),
            "definitions": "docs/method.md §4: r = ψ/ψ⁰, b = 1 − ρ, Simpson over α̂ = k/(n−1)",
            **({} if self.ranks is None else {"torchrun_ranks": self.ranks.world}),
            **({} if self._bf16_speed is None else {"bf16_speed": self._bf16_speed}),
        }


def run_audit(
    spec: AuditSpec,
    *,
    device: str | None = None,
    cache: SweepCache | None = None,
    on_variant: Callable[[str], None] | None = None,
    output_dir: Path | None = None,
    ranks: Ranks | None = None,
) -> tuple[AuditResult, list[PlannedCheck], AuditSession]:
    """The whole audit of one spec: every check evaluated and every sweep computed (under
    torchrun, ``ranks``: each process evaluates its share of the test set)."""
    t0 = time.perf_counter()
    if ranks is not None:
        from .distributed import refuse_unsplittable

        refuse_unsplittable(spec)
    main = AuditSession(
        spec, device=device, cache=cache, on_variant=on_variant, output_dir=output_dir
    )
    main.ranks = ranks
    sessions = [main, *main.peers()]
    planned = plan_checks(spec)
    models = []
    for session in sessions:
        plan = planned if session is main else plan_checks(session.spec)
        checks = [session.evaluate(p) for p in plan if is_check(p)]
        models.append(session.model_result(checks))
    meta = main.meta(time.perf_counter() - t0)
    consistency = None
    if len(sessions) > 1:
        consistency = {**label_consistency(models), "transfer": main.transfer()}
    result = AuditResult(meta=meta, models=models, consistency=consistency)
    return result, planned, sessions[0]
