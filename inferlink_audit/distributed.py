"""Data-parallel evaluation under ``torchrun`` (README, "Several processes").

``torchrun --nproc-per-node N -m inferlink_audit run spec.yaml`` starts N copies of the
command. Each joins one ``torch.distributed`` process group (gloo on the CPU, NCCL when the
audit runs on CUDA), evaluates a contiguous share of the test set, and receives every other
rank's per-example outcomes, so that every accuracy is computed from the whole set's outcomes,
as one process computes it. Nothing else is scheduled here: torchrun starts, watches and stops
the processes.

A share is whole batches of the one-process run when there are at least as many batches as
ranks (each forward pass then sees the very tensors one process gives it), and equal parts of
the examples otherwise; the batches of a share keep their place in the whole set
(``EvalData.batch_starts``), so attack draws follow the example.

This module imports ``torch.distributed`` only when a process group is joined: a run outside
torchrun never touches it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from .errors import AuditError, SpecError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .spec import AuditSpec


class _Examples(Protocol):
    """What a share is cut from (``sweep.EvalData``, not imported: sweep imports this)."""

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int

    @property
    def n(self) -> int: ...


_Data = TypeVar("_Data", bound=_Examples)

# What torchrun (and torch.distributed's env:// rendezvous) sets in every process it starts.
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by torchrun (its rendezvous variables are set)."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def environment_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun); needs no process group."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def share_bounds(n: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Each rank's contiguous share ``[start, stop)`` of ``n`` examples.

    Whole batches of ``batch_size`` when there are at least ``world`` of them (ranks differ by
    at most one batch), else equal parts of the examples (differing by at most one example).
    """
    if n < world:
        raise AuditError(
            f"torchrun: {world} ranks for {n} test examples; start at most {n} processes "
            "(--nproc-per-node) or evaluate more examples (data.limit)."
        )
    batches = -(-n // batch_size)
    if batches >= world:
        cuts = [min(n, (k * batches // world) * batch_size) for k in range(world + 1)]
    else:
        cuts = [k * n // world for k in range(world + 1)]
    return list(itertools.pairwise(cuts))


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks, its share of the examples, and the exchanges
    that make every rank see the whole set's outcomes and take the same decisions."""

    rank: int
    world: int
    local_rank: int

    def share(self, data: _Data) -> _Data:
        """This rank's part of ``data`` (a ``sweep.EvalData``): views of its examples, batches at
        their whole-set positions. ``data.batch_size`` must be the same on every rank."""
        start, stop = share_bounds(data.n, data.batch_size, self.world)[self.rank]
        starts = list(range(start, stop, data.batch_size))
        part = {"x": data.x[start:stop], "y": data.y[start:stop], "batch_starts": starts}
        return cast(_Data, replace(cast(Any, data), **part))

    def gather(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Each 1-D array concatenated over the ranks in rank order, on every rank (booleans
        travel as packed bits)."""
        import numpy as np
        import torch.distributed as dist

        local = [_pack(np.asarray(a)) for a in arrays]
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, local)
        return [
            np.concatenate([_unpack(parts[i]) for parts in everyone]) for i in range(len(arrays))
        ]

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank: one decision for all of them."""
        import numpy as np

        (flags,) = self.gather(np.array([flag]))
        return bool(flags.all())

    def agreed_batch_size(self, batch_size: int) -> int:
        """The smallest rank's batch size (``batch_size: auto`` is measured on each rank)."""
        import numpy as np

        (sizes,) = self.gather(np.array([batch_size], dtype=np.int64))
        return int(sizes.min())

    def device_name(self, name: str) -> str:
        """``auto`` or ``cuda`` on a machine with GPUs means this rank's GPU,
        ``cuda:(local rank mod count)``; any other name is kept."""
        import torch

        if name.strip().lower() not in ("auto", "cuda") or not torch.cuda.is_available():
            return name
        return f"cuda:{self.local_rank % torch.cuda.device_count()}"

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def join(device_name: str) -> Ranks:
    """Join torchrun's process group: NCCL when the audit runs on CUDA, gloo otherwise."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ranks = Ranks(rank, world, int(os.environ["LOCAL_RANK"]))
    device = ranks.device_name(device_name).strip().lower()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))  # where NCCL's exchanges run
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return ranks


def refuse_unsplittable(spec: AuditSpec) -> None:
    """Remediation, ``compare:`` and sequential rounds are refused under torchrun: they train
    or attack other models on data a share does not hold, or stop on a look at part of the
    set, and would repeat on every rank."""
    from .spec_loader import locate_message

    sequential = spec.statistics is not None and spec.statistics.sequential is not None
    refused: list[tuple[tuple[str, ...], bool, str]] = [
        (
            ("remediation",),
            spec.remediation is not None,
            "selective retraining trains on the whole training split",
        ),
        (
            ("compare",),
            bool(spec.compare),
            "transferability attacks every compared model on the whole test set",
        ),
        (
            ("statistics", "sequential"),
            sequential,
            "sequential rounds look at part of the test set at a time",
        ),
    ]
    for key, present, what in refused:
        if present:
            raise SpecError(
                locate_message(
                    spec,
                    key,
                    f"{what}, so it does not run under torchrun; run this spec in one "
                    f"process (inferlink-audit run), or remove {key[-1]}: from a spec for "
                    "torchrun.",
                )
            )


def _pack(array: np.ndarray) -> tuple[str, Any, int]:
    import numpy as np

    if array.dtype == np.bool_:
        return ("bits", np.packbits(array), len(array))
    return ("raw", array, len(array))


def _unpack(part: Sequence[Any]) -> np.ndarray:
    import numpy as np

    kind, payload, count = part
    if kind == "bits":
        return np.unpackbits(payload, count=count).astype(bool)
    return np.asarray(payload)
