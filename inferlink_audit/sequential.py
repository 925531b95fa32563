"""Sequential evaluation (``statistics.sequential``; docs/method.md §8): stop evaluating a
sweep once everything that reads it is decided.

The test set is cut into blocks of consecutive examples, and the blocks are put in one order
drawn from the spec's seed (the last, shorter block, if any, last). Round r evaluates the
next ``round`` examples of that order on every sweep still open; a round's batches are cut
at block starts (``EvalData.batch_starts``), so every example is attacked with exactly the
random draws it gets in a full run. After each round, the sweeps' bootstrap draws are
recomputed on the examples seen so far and a sweep closes when both its labels, its targeted
flag and every check reading it are decided.

Repeated looks at growing data would make a fixed-confidence rule stop on noise more often
than 1 − c; each look is therefore made at c' = 1 − (1 − c)/R, R the number of rounds the test
set allows (Bonferroni over the looks), so the chance that any look is wrong stays within
1 − c. The intervals a sequential run reports are at c'. A sweep still open when the data run
out has used the whole test set, in which case it is exactly the full run's sweep: its bits
are put back in the test set's order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .checks import SWEEP_CHECKS, PlannedCheck, evaluate_check
from .results import SequentialRecord, SweepOutcomes, SweepResult
from .scores import score_curves
from .statistics import Sampling, SweepDraws, wilson_interval
from .sweep import EvalData

# Keeps the block order's random stream apart from the bootstrap's and the attacks'.
ORDER_STREAM = 0x5E9


def look_confidence(confidence: float, rounds: int) -> float:
    """The confidence of each look so that all ``rounds`` looks together hold ``confidence``."""
    return 1.0 - (1.0 - confidence) / max(1, rounds)


@dataclass(frozen=True)
class RoundPlan:
    """Which examples each round evaluates: whole blocks, in a seeded order."""

    n: int
    block: int
    blocks_per_round: int
    order: tuple[int, ...]  # block numbers in evaluation order

    @classmethod
    def of(cls, n: int, round_size: int, block: int, batch_size: int, seed: int) -> RoundPlan:
        """Blocks of ``block`` examples (at most ``batch_size``, at most ``round_size``), the
        full ones permuted by ``seed``, the shorter last one kept last so that a round's
        batches, cut every ``block`` examples, never span two blocks."""
        block = max(1, min(block, batch_size, round_size, n))
        full = n // block
        rng = np.random.default_rng([seed, ORDER_STREAM])
        order = [int(b) for b in rng.permutation(full)]
        if n % block:
            order.append(full)
        return cls(n, block, math.ceil(round_size / block), tuple(order))

    @property
    def rounds(self) -> int:
        return math.ceil(len(self.order) / self.blocks_per_round)

    def _blocks(self, first: int, last: int) -> tuple[int, ...]:
        k = self.blocks_per_round
        return self.order[first * k : last * k]

    def _starts(self, blocks: Sequence[int]) -> list[int]:
        return [b * self.block for b in blocks]

    def indices(self, rounds: int, first: int = 0) -> np.ndarray:
        """Test-set indices of the examples of rounds ``first .. rounds - 1``, in order."""
        spans = [
            np.arange(start, min(start + self.block, self.n))
            for start in self._starts(self._blocks(first, rounds))
        ]
        return np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)

    def data(self, full: EvalData, r: int) -> EvalData:
        """Round ``r``'s examples of ``full``, batched a block at a time at their places."""
        index = torch.as_tensor(self.indices(r + 1, r), device=full.x.device)
        starts = self._starts(self._blocks(r, r + 1))
        x, y = full.x.index_select(0, index), full.y.index_select(0, index)
        return EvalData(x, y, self.block, batch_starts=starts)


# --------------------------------------------------------------------------- merging rounds
def _bits(outcomes: SweepOutcomes) -> list[np.ndarray]:
    return [
        outcomes.unpacked(outcomes.clean),
        outcomes.unpacked(outcomes.adversarial),
        outcomes.unpacked(outcomes.unfiltered_clean),
        outcomes.unpacked(outcomes.unfiltered_adversarial),
    ]


def merge_rounds(parts: Sequence[SweepResult], plan: RoundPlan, tolerance: float) -> SweepResult:
    """One sweep from its first ``len(parts)`` rounds: bits side by side (in the test set's
    order once every example is in, so the sweep is then the full run's, bit for bit) and
    accuracies, scores and labels recomputed from them as the full run computes them."""
    pieces = [_bits(p.outcomes) for p in parts if p.outcomes is not None]
    if len(pieces) != len(parts):
        raise ValueError("sequential rounds need per-example outcomes")
    joined = [np.concatenate([piece[i] for piece in pieces], axis=-1) for i in range(4)]
    m = joined[0].shape[-1]
    if m == plan.n:
        where = plan.indices(len(parts))
        for i, bits in enumerate(joined):
            ordered = np.zeros_like(bits)
            ordered[..., where] = bits
            joined[i] = ordered
    clean, adversarial, clean0, adversarial0 = joined
    clean_accuracy = [int(c) / m for c in clean.sum(axis=1)]
    adversarial_accuracy = [int(a) / m for a in adversarial.sum(axis=1)]
    first = parts[0]
    scored = score_curves(
        clean_accuracy,
        adversarial_accuracy,
        first.removed_fraction,
        clean_reference=int(clean0.sum()) / m,
        adversarial_reference=int(adversarial0.sum()) / m,
        tolerance=tolerance,
    )
    inert = set(first.inert_thresholds).intersection(*(p.inert_thresholds for p in parts))
    packed = [np.packbits(bits, axis=-1) for bits in joined]
    return replace(
        first,
        clean_accuracy=clean_accuracy,
        adversarial_accuracy=adversarial_accuracy,
        **scored.as_fields(),
        inert_thresholds=[a for a in first.inert_thresholds if a in inert],
        outcomes=SweepOutcomes(m, *packed),
        statistics=None,
    )


# --------------------------------------------------------------------------- deciding
def accuracy_decided(correct: int, used: int, limit: float, look: float) -> bool:
    """A minimum on an accuracy is decided: its Wilson interval at the look confidence lies
    wholly at or above ``limit``, or wholly below it."""
    lo, hi = wilson_interval(correct, used, look)
    return bool(lo >= limit or hi < limit)


def labels_decided(draws: SweepDraws, look: float) -> bool:
    """Both labels and the targeted flag are decided at the look confidence ``look``: the
    same in all but a (1 − look)/2 share of the resamples (the one-sided tail a central
    interval at ``look`` leaves on each side, as a check's certainty uses it)."""
    tail = (1.0 - look) / 2.0
    for codes in draws.labels.values():
        share = np.bincount(codes.astype(np.int64), minlength=3) / max(1, len(codes))
        if share.max() < 1.0 - tail:
            return False
    targeted = float(np.mean(draws.targeted)) if len(draws.targeted) else 0.0
    return targeted <= tail or targeted >= 1.0 - tail


def normaliser_certain(sweep: SweepResult, n: int) -> bool:
    """The look's normaliser (§4: ψa⁰, else ψc⁰ when ψa⁰ = 0, else raw accuracies) is the one
    the whole test set of ``n`` examples gives.

    A count seen on a subset is a lower bound of the whole set's, so ψa⁰ > 0 on the examples
    seen (its Wilson interval then excludes 0 at any confidence) makes the whole set's ψa⁰ > 0
    for certain. ψa⁰ = 0 (or ψc⁰ = 0) on a subset decides nothing: the examples not yet seen
    may hold a correct one, and a curve normalised by ψc⁰ instead of a small ψa⁰ is another
    curve, with other labels. Such a sweep is decided only on the whole test set.
    """
    seen = sweep.outcomes.n if sweep.outcomes is not None else n
    return sweep.adversarial_normalised_by == "adversarial" or seen >= n


Settled = Callable[[list[SweepResult]], list[bool]]


def run_in_rounds(
    keys: Sequence[Hashable],
    plan: RoundPlan,
    evaluate_round: Callable[[int, list[Hashable]], dict[Hashable, SweepResult]],
    merge: Callable[[list[SweepResult]], SweepResult],
    settled: Settled,
    parts: dict[Hashable, list[SweepResult]] | None = None,
    reopen: Sequence[Hashable] | None = None,
) -> list[SweepResult]:
    """The sweeps ``keys``, each evaluated round by round until ``settled`` says everything
    reading it is decided or the rounds run out; each gets its ``SequentialRecord``.

    ``evaluate_round(r, due)`` gives round r's sweeps (their outcomes on that round's
    examples) for the keys ``due``; ``settled(sweeps)`` looks at the merged sweeps (all keys,
    in order) and says which are decided. Every look is one of at most ``plan.rounds``. A
    closed sweep never reopens, so each quantity is looked at no more often than the
    correction allows for.

    ``parts`` (filled in place) holds each key's rounds so far: a caller may replace some of
    them (bf16 rounds confirmed in fp32) and go on with ``reopen``, the keys to look at again
    on what they have and evaluate further if still undecided; the others stay closed.
    """
    parts = {} if parts is None else parts
    for key in keys:
        parts.setdefault(key, [])
    merged = {key: merge(parts[key]) for key in keys if parts[key]}
    status = [False] * len(keys)
    if len(merged) == len(keys):
        status = settled([merged[key] for key in keys])
    candidates = set(keys if reopen is None else reopen)
    # A key not reopened that stopped before the last round closed decided and stays so (the
    # others' replaced rounds may change a check it reads, but it is not looked at again).
    status = [
        done or (k not in candidates and 0 < len(parts[k]) < plan.rounds)
        for k, done in zip(keys, status, strict=True)
    ]
    open_keys = [
        k
        for k, done in zip(keys, status, strict=True)
        if k in candidates and not done and len(parts[k]) < plan.rounds
    ]
    start = min((len(parts[k]) for k in open_keys), default=plan.rounds)
    for r in range(start, plan.rounds):
        due = [k for k in open_keys if len(parts[k]) == r]
        if not due:
            continue
        for key, part in evaluate_round(r, due).items():
            parts[key].append(part)
        merged.update({key: merge(parts[key]) for key in due})
        looked = settled([merged[key] for key in keys])
        # A closed sweep keeps the decision it closed on: a later look at the others can make
        # a check it reads uncertain again, but it is not evaluated further.
        status = [
            now if k in open_keys else then
            for k, now, then in zip(keys, looked, status, strict=True)
        ]
        open_keys = [k for k, done in zip(keys, status, strict=True) if k in open_keys and not done]
        if not open_keys:
            break
    out = []
    for key, done in zip(keys, status, strict=True):
        sweep = merged[key]
        examples = sweep.outcomes.n if sweep.outcomes is not None else plan.n
        record = SequentialRecord(examples, len(parts[key]), examples < plan.n, bool(done))
        out.append(replace(sweep, sequential=record))
    return out


# --------------------------------------------------------------------------- a group's looks
REGRESSION_CHECKS = ("no_new_fragile_layers", "max_score_drop")  # read every scope


class _GroupView:
    """The session's measurements with one (filter, attack) group's sweeps replaced by the
    merged sweeps of the current look, and the checks' confidence set to the look's."""

    def __init__(
        self,
        measurements: Any,
        group: tuple[str, str],
        sweeps: list[SweepResult],
        draws: list[SweepDraws],
        sampling: Sampling,
    ) -> None:
        self._measurements, self._group, self._sweeps = measurements, group, sweeps
        self._sampling = replace(sampling, draws=self._draws_of)
        self._draws = draws

    def _draws_of(self, filter_name: str, attack_id: str) -> list[SweepDraws]:
        if (filter_name, attack_id) == self._group:
            return self._draws
        return self._sampling_of_session.draws(filter_name, attack_id)

    @property
    def _sampling_of_session(self) -> Sampling:
        sampling = self._measurements.sampling()
        assert sampling is not None
        return sampling

    def sweeps(self, filter_name: str, attack_id: str) -> list[SweepResult]:
        if (filter_name, attack_id) == self._group:
            return self._sweeps
        return self._measurements.sweeps(filter_name, attack_id)

    def sampling(self) -> Sampling:
        return self._sampling

    def __getattr__(self, name: str) -> Any:
        return getattr(self._measurements, name)


def group_settled(
    measurements: Any,
    group: tuple[str, str],
    checks: Sequence[PlannedCheck],
    sampling: Sampling,
    draws_of: Callable[[SweepResult], SweepDraws],
) -> Settled:
    """The ``settled`` of one (filter, attack) group: a sweep is decided when its normaliser
    is the whole test set's (``normaliser_certain``), its labels and targeted flag are
    decided (``labels_decided``) and every check that reads it is certain at the look
    confidence (``sampling.confidence``). Local sweeps are read by every sweep check,
    the global one by the regression checks only."""
    mine = [c for c in checks if (c.filter, c.attack) == group and c.check in SWEEP_CHECKS]

    def settled(sweeps: list[SweepResult]) -> list[bool]:
        draws = [draws_of(s) for s in sweeps]
        view = _GroupView(measurements, group, sweeps, draws, sampling)
        # A check reading a sweep whose normaliser is not yet the whole set's is not decided.
        unsure = {s.scope for s in sweeps if not normaliser_certain(s, sampling.n)}
        open_checks = [
            c
            for c in mine
            if "local" in unsure
            or (unsure and c.check in REGRESSION_CHECKS)
            or evaluate_check(c, view).certain is False
        ]
        status = []
        for sweep, d in zip(sweeps, draws, strict=True):
            readers = [
                c for c in open_checks if sweep.scope == "local" or c.check in REGRESSION_CHECKS
            ]
            status.append(
                not readers
                and normaliser_certain(sweep, sampling.n)
                and labels_decided(d, sampling.confidence)
            )
        return status

    return settled


def rounds_until(
    plan: RoundPlan, full: EvalData, decided: Callable[[int], bool]
) -> Iterator[EvalData]:
    """Round after round of ``full``, until ``decided(examples used)`` holds after one."""
    used = 0
    for r in range(plan.rounds):
        data = plan.data(full, r)
        yield data
        used += data.n
        if decided(used):
            return
