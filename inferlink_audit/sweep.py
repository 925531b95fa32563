"""The sweep engine (docs/method.md §3; README, "How the engine computes
it"): responses of a network to one filter over one scope.

Unlike the reference notebooks (a deep copy and a state_dict reload per threshold), the
engine points the live model's parameters at a working copy of the scope and back: each
threshold zeroes a run of the scope's sorted values (see ``filters``), so moving from one
threshold to the next writes only the difference between the two runs, and the model's own
storage is never written. Thresholds whose run equals one already evaluated reuse that
result, a variant met again under another filter or scope comes from the evaluator's memo,
and an empty run reuses the unfiltered network's result, which is computed once. The test set
stays on the device, parameters stop requiring gradients during the sweep, and under FGSM one
forward pass gives both the clean prediction and the gradient.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attacks import FGSM, Attack, AttackOutput
from .devices import inference_mode, mark_step
from .errors import IntegrityError
from .filters import FilterName, SortedScope, pulse_half_width, threshold_grid
from .prefix import NetworkSplitter, SplitNetwork, live_bytes, release_freed_memory

if TYPE_CHECKING:
    from .distributed import Ranks

Bits = tuple[np.ndarray, np.ndarray]  # (clean, adversarial) correctness, ``np.packbits``-packed

# Variants that zero at most this many elements are recognised across scopes by the elements
# they zero (a scope's extreme thresholds often zero the same few weights); larger ones by their
# run of the scope's sorted values.
MEMO_MAX_ELEMENTS = 1 << 16


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No weight gradients during sweeps: attacks need only the gradient w.r.t. the input."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class EvalData:
    """The test set, resident on the device, cut into fixed batches."""

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    # Where each batch starts in the whole test set when these examples are only part of it (a
    # torchrun rank's share, a round of sequential evaluation), so that an attack's random
    # draws follow the example and not its place in the part. None: the whole set, in order.
    batch_starts: list[int] | None = None

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def offset(self, index: int) -> int:
        """Position in the whole test set of the first example of batch ``index``."""
        if self.batch_starts is not None:
            return self.batch_starts[index]
        return index * self.batch_size

    def batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for index, start in enumerate(range(0, self.n, self.batch_size)):
            stop = start + self.batch_size
            yield index, self.x[start:stop], self.y[start:stop]

    def attacked(
        self, attack: Attack, model: nn.Module
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, AttackOutput]]:
        """Every batch with ``attack``'s output on it, each example at its place in the data
        (so the attack's random draws do not depend on the batch size)."""
        for index, xb, yb in self.batches():
            yield index, xb, yb, attack(model, xb, yb, offset=self.offset(index))


def _input_gradient(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor | None:
    """∇ₓ of the summed cross-entropy of ``run`` at ``x`` (None where it does not reach x)."""
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(run(leaf), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return grad


def _correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    return int((logits.argmax(dim=1) == y).sum().item())


def saved_tensors_of(fn: Callable[[], Any]) -> tuple[Any, list[torch.Tensor]]:
    """Run ``fn`` and return what autograd saves for its backward pass (detached tensors
    sharing the saved storages)."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Returning ``t`` itself would close a cycle through C++ (an op's output holds its
        # grad_fn, which would hold the output) that Python's gc cannot see: every graph built
        # here would then live until the process ends. A detached alias keeps only the storage.
        alias = t.detach()
        saved.append(alias)
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def saved_bytes_of(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` and count the bytes autograd saves for its backward pass, each storage once."""
    out, saved = saved_tensors_of(fn)
    return out, StorageCount().add(saved)


class StorageCount:
    """Bytes of the distinct storages behind some tensors: a storage shared by several of them
    (views, a live value autograd also saves, a skip tensor read twice) counts once, and one in
    ``owned`` (parameters, buffers, the test set: held by the process anyway) counts zero."""

    def __init__(self, owned: Iterable[torch.Tensor] = ()) -> None:
        self.seen = {_storage_key(t) for t in owned}
        self.bytes = 0

    def add(self, tensors: Iterable[Any]) -> int:
        for t in tensors:
            if not isinstance(t, torch.Tensor):  # a live int (a ViT's batch size) holds no storage
                continue
            key = _storage_key(t)
            if key not in self.seen:
                self.seen.add(key)
                self.bytes += _storage_bytes(t)
        return self.bytes


# XLA tensors have no storage pointer ("Attempted to access the data pointer on an invalid
# python storage"): there each tensor counts as its own storage, an overestimate.
def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    if t.device.type == "xla":
        return (str(t.device), id(t))
    return (str(t.device), t.untyped_storage().data_ptr())


def _storage_bytes(t: torch.Tensor) -> int:
    if t.device.type == "xla":
        return t.numel() * t.element_size()
    return int(t.untyped_storage().nbytes())


@dataclass
class _PrefixCache:
    """What one local scope reuses across its thresholds: the prefix's outputs, per batch.

    ``fixed`` holds (clean live values, adversarial live values) when the adversarial inputs
    do not depend on the filtered network; ``graphs`` holds (input leaf, live values with
    their autograd graph kept) for FGSM crafted against each filtered network.
    """

    suffix: nn.Module
    fixed: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] | None = None
    graphs: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] | None = None
    # What the graphs' backward passes read (detached aliases): it is most of their memory.
    saved: list[torch.Tensor] = field(default_factory=list)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor whose storage this cache keeps alive."""
        for clean, adversarial in self.fixed or ():
            yield from clean
            yield from adversarial
        for leaf, live in self.graphs or ():
            yield leaf
            yield from live
        yield from self.saved


@dataclass
class BatchedSuffix:
    """Several filtered variants of one layer per pass (``filtering.fast``): the suffix runs
    under ``torch.func.vmap`` over stacked copies of the layer's weights, on cached inputs."""

    suffix: nn.Module
    names: list[str]  # the scope tensors' names inside ``suffix``
    fixed: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]
    labels: list[torch.Tensor]
    n: int
    chunk: int  # variants per pass, bounded by the memory budget

    def __call__(self, stacks: list[torch.Tensor]) -> list[tuple[float, float]]:
        count = stacks[0].shape[0]
        clean = torch.zeros(count, dtype=torch.long)
        adversarial = torch.zeros(count, dtype=torch.long)

        def logits(live: tuple[torch.Tensor, ...]) -> torch.Tensor:
            def one(*weights: torch.Tensor) -> torch.Tensor:
                params = dict(zip(self.names, weights, strict=True))
                return torch.func.functional_call(self.suffix, params, live)

            return torch.func.vmap(one)(*stacks)

        with torch.no_grad():
            for (live_clean, live_adv), yb in zip(self.fixed, self.labels, strict=True):
                clean += (logits(live_clean).argmax(-1) == yb).sum(1).cpu()
                adversarial += (logits(live_adv).argmax(-1) == yb).sum(1).cpu()
        return [(int(c) / self.n, int(a) / self.n) for c, a in zip(clean, adversarial, strict=True)]


class Evaluator:
    """Clean and adversarial accuracy of the network as its weights are *now*.

    ``filtered``: the attack is run against the current (filtered) network, white-box.
    ``original``: the adversarial inputs are crafted once on the unfiltered network and reused.
    An attack whose output does not depend on the network (noise) is always crafted once.

    Inside ``focus(layer)`` a local sweep reuses the unchanged prefix of the network, within
    ``prefix_budget`` bytes of cached activations; outside it, or when the network does not
    trace, every pass runs the whole network.
    """

    # Where ``fast`` batches thresholds with vmap: on CPU it measured slower than one variant
    # at a time (2x on ResNet-18's conv1), so there ``fast`` only turns the memo off. The
    # precision is ``precision``'s alone (``compute.precision``), with or without ``fast``.
    batching_devices: tuple[str, ...] = ("cuda", "xla")
    # Whether FGSM against each filtered network keeps the prefix's autograd graph. It saves
    # the prefix's forward pass per variant (measured on CPU, a 16/32/64-channel ResNet on
    # 32x32 inputs: 1.13x to 1.45x per variant past the first block) for about the memory of
    # training the prefix; off, the FGSM scopes run whole (the benchmark compares both).
    cache_graphs: bool = True

    def __init__(
        self,
        model: nn.Module,
        data: EvalData,
        attack: Attack,
        source: Literal["filtered", "original"],
        *,
        splitter: NetworkSplitter | None = None,
        prefix_budget: int = 0,
        fast: bool = False,
        precision: Literal["fp32", "bf16"] = "fp32",
        channels_last: bool = False,
    ) -> None:
        if channels_last:
            data = replace(data, x=data.x.contiguous(memory_format=torch.channels_last))
        self.model, self.data, self.attack = model, data, attack
        self.splitter, self.prefix_budget, self.fast = splitter, prefix_budget, fast
        self.precision = precision
        # Under torchrun ``data`` is this rank's share: outcomes are gathered from every rank.
        self.ranks: Ranks | None = None
        self.fixed_adversarial: list[torch.Tensor] | None = None
        if source == "original" or not attack.model_dependent:
            self.fixed_adversarial = [out.adversarial for *_, out in data.attacked(attack, model)]
        self._prefix: _PrefixCache | None = None
        self.prefix_hits = 0  # local scopes that reused their prefix (for the benchmark)
        # Variants already evaluated, by the elements they zero. Exact mode only: under
        # ``fast`` a variant's response depends on the path that computed it.
        self.memo: dict[Hashable, VariantResult] | None = None if fast else {}
        self.memo_hits = 0
        # Per-example outcomes (packed bits, clean and adversarial) of the last evaluation, for
        # the statistics (``statistics.py``).
        self.last_outcomes: Bits | None = None
        # The unfiltered network's clean logits per batch, kept to recognise a variant whose
        # logits stay bit-identical although it zeroes nonzero weights: a filter that did not
        # act (a bypassed layer, a weight rebuilt on every call) must be a finding, not a point.
        self.reference_logits = self._clean_logits()
        self.last_unchanged = False  # whether the last evaluation's logits equalled them all

    @contextmanager
    def focus(self, layer: str, tensors: Sequence[torch.Tensor] | None = None) -> Iterator[None]:
        """Reuse the network's prefix before the first reader of ``tensors`` (by default every
        tensor of the module ``layer``) while they change."""
        with self.autocast():
            self._prefix = self._build_prefix(layer, tensors)
        if self.ranks is not None and not self.ranks.all_true(self._prefix is not None):
            self._prefix = None  # every rank takes the same path
        if self._prefix is not None:
            self.prefix_hits += 1
        try:
            yield
        finally:
            held, self._prefix = self._prefix, None
            if held is not None:
                del held  # the cache's last reference: its tensors are freed here
                release_freed_memory()

    def _build_prefix(
        self, layer: str, tensors: Sequence[torch.Tensor] | None = None
    ) -> _PrefixCache | None:
        if self.splitter is None or self.prefix_budget <= 0:
            return None
        split = self.splitter.split(layer, tensors)
        if split is None or not self._reproduces(split):
            return None
        cache = _PrefixCache(split.suffix)
        count = StorageCount(self._owned_tensors())
        done = 0
        if self.fixed_adversarial is not None:
            cache.fixed = []
            for index, xb, _ in self.data.batches():
                with inference_mode(xb.device):
                    pair = (split.prefix(xb), split.prefix(self.fixed_adversarial[index]))
                cache.fixed.append(pair)
                done += len(xb)
                # Projected from the batches built so far: a cache that cannot fit is dropped
                # after its first batch, and at the last batch the projection is exact.
                if count.add([*pair[0], *pair[1]]) * self.data.n > self.prefix_budget * done:
                    return None
            return cache
        if not isinstance(self.attack, FGSM) or not self.cache_graphs:
            return None  # iterative attacks need whole-network gradients at perturbed inputs
        cache.graphs = []
        for _, xb, _ in self.data.batches():
            leaf = xb.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                live, saved = saved_tensors_of(partial(split.prefix, leaf))
            cache.graphs.append((leaf, live))
            cache.saved += saved
            done += len(xb)
            if count.add([leaf, *live, *saved]) * self.data.n > self.prefix_budget * done:
                return None
        return cache

    def _reproduces(self, split: SplitNetwork) -> bool:
        """Whether prefix then suffix give the whole network's clean logits bit for bit on the
        first batch. A trace records only tensor operations: what runs around them in forward()
        (a ``torch.autocast`` block, Python-side state) is not in the graph, and such a split
        would sweep another network; the scope then runs whole."""
        first = next(self.data.batches(), None)
        if first is None:  # an empty share (torchrun): nothing to reuse
            return False
        _, xb, _ = first
        with inference_mode(xb.device):
            logits = split.suffix(*split.prefix(xb))
        reference = self.reference_logits[0]
        same = (
            isinstance(logits, torch.Tensor)
            and logits.shape == reference.shape
            and logits.dtype == reference.dtype
            and bool((logits == reference).all())
        )
        if not same or self.fixed_adversarial is not None or not isinstance(self.attack, FGSM):
            return same  # only FGSM differentiates through a split (iterative attacks run whole)
        # FGSM against each filtered network differentiates through the split: its input
        # gradient must be the network's too (a torch.no_grad() block is not in a trace either).
        _, xb, yb = first
        whole = _input_gradient(self.model, xb, yb)
        halves = _input_gradient(lambda x: split.suffix(*split.prefix(x)), xb, yb)
        return whole is not None and halves is not None and torch.equal(whole, halves)

    def _owned_tensors(self) -> list[torch.Tensor]:
        """Tensors the process holds whether or not a prefix is cached: their storages are not
        the cache's (a live value may be the input itself, autograd saves weights)."""
        return [
            *self.model.parameters(),
            *self.model.buffers(),
            self.data.x,
            self.data.y,
            *(self.fixed_adversarial or ()),
        ]

    @property
    def prefix_cache_bytes(self) -> int:
        """Bytes the focused scope's prefix cache keeps alive, each storage counted once, from
        the cached tensors themselves; 0 outside ``focus``. Never above ``prefix_budget``."""
        if self._prefix is None:
            return 0
        return StorageCount(self._owned_tensors()).add(self._prefix.tensors())

    def batched_evaluation(self, tensors: list[torch.Tensor]) -> BatchedSuffix | None:
        """A vmapped evaluator for the scope ``tensors`` when ``fast``, on a device where it
        pays, and the inputs of the focused suffix are fixed (``adversarial_source: original``
        or noise); else None."""
        prefix = self._prefix
        if not self.fast or prefix is None or prefix.fixed is None or self.ranks is not None:
            return None
        if self.data.x.device.type not in self.batching_devices:
            return None
        if any(isinstance(m, nn.RNNBase) for m in prefix.suffix.modules()):
            return None  # vmap has no batching rule for LSTM/GRU/RNN (aten::lstm, _cudnn_rnn)
        by_identity = {id(p): name for name, p in prefix.suffix.named_parameters()}
        names = [by_identity.get(id(t)) for t in tensors]
        if any(name is None for name in names):
            return None
        per_batch = 2 * live_bytes(prefix.fixed[0][0]) + sum(
            t.numel() * t.element_size() for t in tensors
        )
        chunk = int(max(1, min(64, self.prefix_budget // max(1, 8 * per_batch))))
        labels = [yb for _, _, yb in self.data.batches()]
        return BatchedSuffix(prefix.suffix, names, prefix.fixed, labels, self.data.n, chunk)  # type: ignore[arg-type]

    def evaluate(self) -> tuple[float, float]:
        """(clean, adversarial) accuracy; sets ``last_unchanged`` when every clean logit is
        bit-identical to the unfiltered network's."""
        with self.autocast():
            return self._evaluate()

    def _clean_logits(self) -> list[torch.Tensor]:
        with self.autocast(), inference_mode(self.data.x.device):
            return [self.model(xb) for _, xb, _ in self.data.batches()]

    def _unchanged(self, index: int, logits: torch.Tensor) -> torch.Tensor:
        """Whether ``logits`` equal the unfiltered network's bit for bit, as a boolean on the
        device: read once per variant, so no batch waits for the host."""
        reference = self.reference_logits[index]
        if logits.dtype != reference.dtype or logits.shape != reference.shape:
            return torch.zeros((), dtype=torch.bool, device=logits.device)
        return (logits == reference).all()

    def autocast(self) -> Any:
        """bf16 autocast under ``precision: bf16`` (an approximation, off by default)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.data.x.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _evaluate(self) -> tuple[float, float]:
        clean_ok: list[torch.Tensor] = []
        adversarial_ok: list[torch.Tensor] = []
        identical: list[torch.Tensor] = []
        prefix = self._prefix
        for index, xb, yb in self.data.batches():
            mark_step(xb.device)  # XLA: one graph per batch (the first one also moves weights)
            if prefix is not None and prefix.fixed is not None:
                live_clean, live_adv = prefix.fixed[index]
                with inference_mode(xb.device):
                    logits = prefix.suffix(*live_clean)
                    identical.append(self._unchanged(index, logits))
                    clean_ok.append(logits.argmax(dim=1) == yb)
                    adversarial_ok.append(prefix.suffix(*live_adv).argmax(dim=1) == yb)
                continue
            if prefix is not None and prefix.graphs is not None:
                assert isinstance(self.attack, FGSM)
                leaf, live = prefix.graphs[index]
                with torch.enable_grad():
                    logits = prefix.suffix(*live)
                    loss = F.cross_entropy(logits, yb, reduction="sum")
                    (grad,) = torch.autograd.grad(loss, leaf, retain_graph=True)
                x_adv, clean_logits = self.attack.step(xb, grad), logits.detach()
            elif self.fixed_adversarial is None:
                out = self.attack(self.model, xb, yb, offset=self.data.offset(index))
                x_adv, clean_logits = out.adversarial, out.clean_logits
            else:
                x_adv, clean_logits = self.fixed_adversarial[index], None
            with inference_mode(xb.device):
                if clean_logits is None:
                    clean_logits = self.model(xb)
                identical.append(self._unchanged(index, clean_logits))
                clean_ok.append(clean_logits.argmax(dim=1) == yb)
                adversarial_ok.append(self.model(x_adv).argmax(dim=1) == yb)
        mark_step(self.data.x.device)
        clean_bits = torch.cat(clean_ok).cpu().numpy()
        adversarial_bits = torch.cat(adversarial_ok).cpu().numpy()
        unchanged = bool(torch.stack(identical).all()) if identical else True
        if self.ranks is not None:  # a rank's share: the whole set's outcomes from every rank
            clean_bits, adversarial_bits, same = self.ranks.gather(
                clean_bits, adversarial_bits, np.array([unchanged])
            )
            unchanged = bool(same.all())
        self.last_unchanged = unchanged
        self.last_outcomes = (np.packbits(clean_bits), np.packbits(adversarial_bits))
        n = len(clean_bits)
        return int(clean_bits.sum()) / n, int(adversarial_bits.sum()) / n


@dataclass
class Curves:
    """Raw responses of one scope to one filter, in sweep order."""

    thresholds: list[float]
    removed_fraction: list[float]
    clean_accuracy: list[float]
    adversarial_accuracy: list[float]
    evaluated_variants: int
    numel: int
    # Thresholds whose variant zeroed nonzero weights yet left every clean logit bit-identical
    # to the unfiltered network's: the filter did not act there (see ``Evaluator``).
    inert_thresholds: list[float] = field(default_factory=list)
    # Per threshold, the variant's packed per-example outcomes; None when some variant was
    # evaluated without them (``filtering.fast``'s batched passes).
    outcomes: list[Bits] | None = None


@dataclass
class ScopeWorkingCopy:
    """A scope's tensors while one sweep filters them.

    For the sweep, each tensor's ``.data`` points at a working copy and the originals are never
    written, so restoring the model means pointing ``.data`` back: bit-exact by construction.
    When the tensors share a dtype and device (the usual case) the working copies are slices
    of one flat buffer, so a threshold is one indexed write however many layers it spans.
    """

    tensors: list[torch.Tensor]
    originals: list[torch.Tensor] = field(init=False)  # the tensors' own data, untouched
    offsets: list[int] = field(init=False)
    flat: torch.Tensor | None = field(init=False, default=None)  # the shared working copy
    pristine: list[torch.Tensor] = field(init=False)  # unfiltered values of each working copy

    def __post_init__(self) -> None:
        self.offsets = [int(o) for o in np.cumsum([0] + [t.numel() for t in self.tensors])]
        self.originals = [t.data for t in self.tensors]
        first = self.tensors[0]
        if all(t.dtype == first.dtype and t.device == first.device for t in self.tensors):
            self.pristine = [torch.cat([t.detach().reshape(-1) for t in self.tensors])]
            self.flat = self.pristine[0].clone()
            spans = zip(self.offsets, self.offsets[1:], strict=False)
            for t, (lo, hi) in zip(self.tensors, spans, strict=False):
                t.data = self.flat[lo:hi].view(t.shape)
        else:
            self.pristine = [t.detach().reshape(-1).clone() for t in self.tensors]
            for t, values in zip(self.tensors, self.pristine, strict=True):
                t.data = values.clone().view(t.shape)

    def _split(
        self, flat_index: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.flat is not None:
            yield self.flat, self.pristine[0], flat_index
            return
        offsets = zip(self.offsets, self.offsets[1:], strict=False)
        for t, orig, (lo, hi) in zip(self.tensors, self.pristine, offsets, strict=True):
            local = flat_index[(flat_index >= lo) & (flat_index < hi)] - lo
            if local.numel():
                yield t.data.view(-1), orig, local

    def zero(self, flat_index: torch.Tensor) -> None:
        for flat, _, local in self._split(flat_index):
            flat[local] = 0

    def restore(self, flat_index: torch.Tensor) -> None:
        for flat, orig, local in self._split(flat_index):
            flat[local] = orig[local]

    def move(self, order: torch.Tensor, old: tuple[int, int] | None, new: tuple[int, int]) -> None:
        """From the variant that zeroes ``order[old]`` to the one that zeroes ``order[new]``,
        touching only their difference: along a low- or high-pass sweep the runs are nested,
        so each threshold zeroes just the weights it adds."""
        a0, a1 = old if old is not None else (new[0], new[0])
        b0, b1 = new
        for start, stop in ((a0, min(a1, b0)), (max(a0, b1), a1)):
            if stop > start:
                self.restore(order[start:stop])
        for start, stop in ((b0, min(b1, a0)), (max(b0, a1), b1)):
            if stop > start:
                self.zero(order[start:stop])

    def variant_key(self, order: torch.Tensor, start: int, stop: int, values: str) -> Hashable:
        """What identifies the variant that zeroes ``order[start:stop]``, so that a variant met
        again (under another filter, or in another scope) is not evaluated twice. Small runs
        (a scope's tails, where filters and scopes coincide) are named by the elements they
        zero; larger ones by their run of the sorted values, which filters of one scope share.
        """
        tensors = tuple(id(t) for t in self.tensors)
        if start == 0 and stop == self.offsets[-1]:
            return ("all", tensors)
        if stop - start > MEMO_MAX_ELEMENTS:
            return ("run", tensors, values, start, stop)
        index = torch.sort(order[start:stop].cpu()).values
        bounds = np.searchsorted(index.numpy(), self.offsets)
        return tuple(
            (id(t), index[lo:hi].sub(base).numpy().tobytes())
            for t, base, lo, hi in zip(self.tensors, self.offsets, bounds, bounds[1:], strict=False)
            if hi > lo
        )

    def stacked_variants(self, flat_indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per tensor, a stack of filtered copies (one per index set), for batched evaluation."""
        stacks = []
        for orig, lo, hi in zip(self.originals, self.offsets, self.offsets[1:], strict=False):
            variants = orig.unsqueeze(0).repeat(len(flat_indices), *([1] * orig.dim()))
            flat = variants.view(len(flat_indices), -1)
            for k, index in enumerate(flat_indices):
                local = index[(index >= lo) & (index < hi)] - lo
                flat[k, local] = 0
            stacks.append(variants)
        return stacks

    def restore_all(self) -> None:
        for t, orig in zip(self.tensors, self.originals, strict=True):
            t.data = orig


def state_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer, bit for bit: what "unchanged" means here."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=False).items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def verify_unchanged(model: nn.Module, expected: str, where: str) -> None:
    """Raise IntegrityError when the model differs from the digest taken before the audit."""
    if state_digest(model) != expected:
        raise IntegrityError(
            f"{where}: the model's parameters or buffers differ from what was loaded (checksum "
            "mismatch), so the results of this run are void. A model whose forward pass changes "
            "its own state causes this; otherwise please report it as a bug."
        )


@dataclass(frozen=True)
class VariantResult:
    """What one filtered variant gave: (clean, adversarial) accuracy, per-example outcomes
    (None where none were kept), and whether it was inert (changed no logit although it
    zeroed nonzero weights)."""

    response: tuple[float, float]
    outcomes: Bits | None = None
    inert: bool = False


Interval = tuple[int, int]  # a run ``order[start:stop]`` of the scope's sorted values


def sweep_scope(
    tensors: list[torch.Tensor],
    filter_name: FilterName,
    *,
    thresholds: int,
    values: Literal["signed", "magnitude"],
    evaluator: Evaluator,
    unfiltered: tuple[float, float],
    value_range: tuple[float, float] | None = None,
    ordering: SortedScope | None = None,
    on_variant: Callable[[], None] | None = None,
    unfiltered_outcomes: Bits | None = None,
) -> Curves:
    """Evaluate the network at every threshold of ``filter_name`` over the scope ``tensors``.

    ``unfiltered`` is the (clean, adversarial) accuracy of the unfiltered network, reused for
    every threshold that zeroes nothing (``unfiltered_outcomes``: its per-example outcomes).
    ``ordering`` is the scope's sorted values when the caller already has them (they do not
    depend on the filter or the attack). The tensors are restored bit-exactly before
    returning, also when an exception interrupts the sweep.
    """
    ordering = ordering or SortedScope.of(tensors, values)
    vmin, vmax = value_range or ordering.value_range
    grid = threshold_grid(vmin, vmax, thresholds, filter_name)
    delta = pulse_half_width(vmin, vmax, thresholds)
    order = ordering.order.to(tensors[0].device)
    intervals = [ordering.interval(filter_name, float(alpha), delta) for alpha in grid]
    distinct = list(dict.fromkeys(iv for iv in intervals if iv[1] > iv[0]))
    scope = ScopeWorkingCopy(tensors)
    try:
        batched = evaluator.batched_evaluation(tensors)
        if batched is not None:
            with evaluator.autocast():
                results = _evaluate_batched(batched, scope, order, distinct, on_variant)
        else:
            results = _evaluate_in_turn(
                evaluator, scope, ordering, order, distinct, values, on_variant
            )
    finally:
        scope.restore_all()
    unfiltered_result = VariantResult(unfiltered, unfiltered_outcomes)
    per_threshold = [results.get(iv, unfiltered_result) for iv in intervals]
    bits = [r.outcomes for r in per_threshold]
    return Curves(
        thresholds=[float(a) for a in grid],
        removed_fraction=[(stop - start) / ordering.numel for start, stop in intervals],
        clean_accuracy=[r.response[0] for r in per_threshold],
        adversarial_accuracy=[r.response[1] for r in per_threshold],
        evaluated_variants=len(results),
        numel=ordering.numel,
        inert_thresholds=[float(a) for a, r in zip(grid, per_threshold, strict=True) if r.inert],
        outcomes=None if any(b is None for b in bits) else [b for b in bits if b is not None],
    )


def _evaluate_in_turn(
    evaluator: Evaluator,
    scope: ScopeWorkingCopy,
    ordering: SortedScope,
    order: torch.Tensor,
    distinct: list[Interval],
    values: str,
    on_variant: Callable[[], None] | None,
) -> dict[Interval, VariantResult]:
    """One variant at a time, each moved to from the last, or taken from the memo."""
    results: dict[Interval, VariantResult] = {}
    applied: Interval | None = None
    memo = evaluator.memo
    for start, stop in distinct:
        # Keyed from the host copy of the order: no device read per variant (CUDA, XLA).
        key = scope.variant_key(ordering.order, start, stop, values) if memo is not None else None
        result = memo.get(key) if memo is not None else None
        if result is not None:
            evaluator.memo_hits += 1
        else:
            scope.move(order, applied, (start, stop))
            applied = (start, stop)
            result = _evaluated(evaluator, ordering, start, stop)
            if memo is not None:
                memo[key] = result
        results[(start, stop)] = result
        if on_variant is not None:
            on_variant()
    return results


def _evaluated(evaluator: Evaluator, ordering: SortedScope, start: int, stop: int) -> VariantResult:
    """Evaluate the variant now applied, which zeroes ``ordering``'s run ``[start, stop)``."""
    response = evaluator.evaluate()
    # Zeroing weights that are already 0.0 changes nothing by construction.
    zeros_only = ordering.sorted_values[start] == ordering.sorted_values[stop - 1] == 0
    inert = evaluator.last_unchanged and not zeros_only
    return VariantResult(response, evaluator.last_outcomes, inert)


def _evaluate_batched(
    batched: BatchedSuffix,
    scope: ScopeWorkingCopy,
    order: torch.Tensor,
    distinct: list[Interval],
    on_variant: Callable[[], None] | None,
) -> dict[Interval, VariantResult]:
    """Several variants per pass (``filtering.fast`` on CUDA/XLA): no outcomes are kept."""
    results: dict[Interval, VariantResult] = {}
    for chunk_start in range(0, len(distinct), batched.chunk):
        chunk = distinct[chunk_start : chunk_start + batched.chunk]
        stacks = scope.stacked_variants([order[a:b] for a, b in chunk])
        for iv, response in zip(chunk, batched(stacks), strict=True):
            results[iv] = VariantResult(response)
            if on_variant is not None:
                on_variant()
    return results


def evaluate_variant(
    tensors: list[torch.Tensor],
    ordering: SortedScope,
    filter_name: FilterName,
    alpha: float,
    evaluator: Evaluator,
    *,
    thresholds: int,
    values: Literal["signed", "magnitude"],
    value_range: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """(clean, adversarial) accuracy of the one variant of a sweep at threshold ``alpha``
    (``thresholds``, ``values`` and ``value_range`` as the sweep had them), evaluated on its
    own through ``evaluator``; the tensors are restored bit-exactly. For calibrating another
    precision. The variant goes through the evaluator's memo, so a sweep that later evaluates
    it in the same precision (an fp32 confirmation) takes it from there."""
    vmin, vmax = value_range or ordering.value_range
    start, stop = ordering.interval(
        filter_name, float(alpha), pulse_half_width(vmin, vmax, thresholds)
    )
    if stop <= start:
        return evaluator.evaluate()  # zeroes nothing: the unfiltered network
    scope = ScopeWorkingCopy(tensors)
    memo = evaluator.memo
    key = scope.variant_key(ordering.order, start, stop, values) if memo is not None else None
    try:
        result = memo.get(key) if memo is not None else None
        if result is not None:
            evaluator.memo_hits += 1
            return result.response
        scope.zero(ordering.order.to(tensors[0].device)[start:stop])
        result = _evaluated(evaluator, ordering, start, stop)
        if memo is not None:
            memo[key] = result
        return result.response
    finally:
        scope.restore_all()
