"""One small abstraction over the devices an audit can run on: cpu, cuda, xla and mps.

The rest of the library asks this module for a ``torch.device``, a readable name for the
report, a synchronisation point for timings, and reproducible settings; it never tests
for a backend itself. ``torch_xla`` is optional and imported only when a spec asks for XLA.
"""

from __future__ import annotations

import os
import random
import re
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DeviceError, ResourceError

__all__ = [
    "bf16_unsupported_reason",
    "cpu_bf16_flags",
    "cuda_device_count",
    "describe_device",
    "deterministic_settings",
    "generator_device",
    "inference_mode",
    "is_out_of_memory",
    "mark_step",
    "out_of_memory_error",
    "peak_memory_mb",
    "resolve_device",
    "seed_everything",
    "synchronize",
    "worker_device_name",
]

_NAME_RE = re.compile(r"^(?P<kind>auto|cpu|cuda|xla|mps)(?::(?P<index>\d+))?$")
# cuBLAS needs a fixed workspace to be deterministic (the value PyTorch's docs recommend).
_CUBLAS_WORKSPACE = ":4096:8"


def cuda_device_count() -> int:
    """How many CUDA devices this process can use (0 without CUDA).

    The one place that counts GPUs, so a test can replace it to simulate several on a CPU.
    """
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_device_name(name: str, worker: int | None, count: int | None = None) -> str:
    """The device name parallel worker ``worker`` (0, 1, ...) uses for a spec's ``name``.

    With ``auto`` or ``cuda`` (no index) and ``count`` GPUs (default: ``cuda_device_count()``),
    worker i uses ``cuda:(i mod count)``, so N pytest-xdist workers spread over the GPUs
    instead of all sharing the first. An explicit index, another kind, no worker or no GPU
    leave ``name`` as it is.
    """
    if worker is None or name.strip().lower() not in ("auto", "cuda"):
        return name
    count = cuda_device_count() if count is None else count
    return f"cuda:{worker % count}" if count > 0 else name


def resolve_device(name: str, *, worker: int | None = None) -> torch.device:
    """Turn a spec's ``device:`` value into a ``torch.device`` that exists on this machine.

    ``auto`` picks CUDA when it is available and the CPU otherwise; every other name must
    exist, so an audit never silently runs somewhere other than where the spec asked. On
    parallel worker ``worker``, ``auto`` and ``cuda`` mean ``worker_device_name``'s GPU.
    """
    wanted = worker_device_name(name, worker)
    if wanted == name:
        return _resolve_name(name)
    try:
        return _resolve_name(wanted)
    except DeviceError as exc:
        raise DeviceError(
            f"device {name!r} on parallel worker {worker} is {wanted}: {exc}"
        ) from exc


def _resolve_name(name: str) -> torch.device:
    text = name.strip().lower()
    match = _NAME_RE.match(text)
    if match is None or (match["index"] is not None and match["kind"] in ("auto", "cpu", "mps")):
        raise DeviceError(
            f"device {name!r} is not a device name: use auto, cpu, cuda, cuda:N, xla, xla:N or mps."
        )
    kind, index = match["kind"], match["index"]
    if kind == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        return _resolve_cuda(name, None if index is None else int(index))
    if kind == "xla":
        return _resolve_xla(name, None if index is None else int(index))
    if not torch.backends.mps.is_available():
        raise DeviceError(
            f"device {name!r}: Apple's MPS backend is not available on this machine (it needs "
            "macOS on Apple silicon and a PyTorch built with MPS); use device: cpu or auto."
        )
    return torch.device("mps")


def _resolve_cuda(name: str, index: int | None) -> torch.device:
    if not torch.cuda.is_available():
        built = torch.version.cuda
        why = (
            f"this PyTorch is built for CUDA {built} but finds no usable GPU (driver missing, or "
            "CUDA_VISIBLE_DEVICES hides them)"
            if built
            else "this PyTorch is a CPU-only build"
        )
        raise DeviceError(
            f"device {name!r}: CUDA is not available: {why}. "
            "Use device: cpu (or auto, which falls back to the CPU), or run on a machine with a "
            "GPU."
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if index is None else index
    if index >= count:
        present = ", ".join(f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(count))
        raise DeviceError(
            f"device {name!r}: there is no CUDA device {index}; this machine has {count}: "
            f"{present}. Pick one of those, or use device: cuda for the current one."
        )
    return torch.device("cuda", index)


def _resolve_xla(name: str, index: int | None) -> torch.device:
    try:
        import torch_xla  # noqa: F401  (optional dependency, only for XLA devices)
        import torch_xla.core.xla_model as xm
    except ImportError as exc:
        raise DeviceError(
            f"device {name!r} needs the optional package torch_xla, which is not importable here "
            f"({exc}). Install the torch_xla build that matches torch {torch.__version__} "
            "(pip install torch_xla), or use device: cpu or cuda."
        ) from exc
    try:
        # Newer torch_xla spells it torch_xla.device(n); older releases only xm.xla_device(n).
        make = getattr(sys.modules["torch_xla"], "device", None) or xm.xla_device
        device: torch.device = make(index) if index is not None else make()
    except Exception as exc:
        raise DeviceError(
            f"device {name!r}: torch_xla is installed but could not open the device ({exc}). "
            "Check the XLA runtime (PJRT_DEVICE, TPU or GPU visibility) or use device: cpu."
        ) from exc
    return device


def describe_device(device: torch.device) -> str:
    """A human name for reports: ``cpu``, ``cuda:0 (NVIDIA H100 80GB HBM3)``, ``xla:0 (TPU)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "xla":
        try:
            import torch_xla.core.xla_model as xm

            hardware = xm.xla_device_hw(device)
        except Exception:
            # The name is for the report only; a torch_xla without this helper is no error.
            return str(device)
        return f"{device} ({hardware})"
    return str(device)


# How allocators word "this did not fit": CUDA's caching allocator, the CPU's, MPS and XLA.
_OOM_MARKERS = (
    "out of memory",
    "defaultcpuallocator: can't allocate memory",
    "defaultcpuallocator: not enough memory",
    "resource_exhausted",
    "mps backend out of memory",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says that an allocation failed (on any device), not that code is wrong."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(marker in text for marker in _OOM_MARKERS)
    return False


@contextmanager
def out_of_memory_as_error(
    *, batch_size: int | str, device: str, where: str = "", examples: int | None = None
) -> Iterator[None]:
    """Turn an allocation failure inside the block into ``out_of_memory_error``'s paragraph."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory_error(
            exc, batch_size=batch_size, device=device, where=where, examples=examples
        ) from exc


def out_of_memory_error(
    exc: BaseException,
    *,
    batch_size: int | str,
    device: str,
    where: str = "",
    examples: int | None = None,
) -> ResourceError:
    """The one-paragraph error for a batch that does not fit: which size, and what to try.

    ``examples`` (the test set's size, when known) caps the batch actually used, so the size
    suggested is half of what really ran, not of a ``batch_size`` larger than the data.
    """
    prefix = f"{where}: " if where else ""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(first) > 200:
        first = first[:197] + "..."
    if isinstance(batch_size, str):  # "auto": the size it chose is in the run's metadata
        return ResourceError(
            f"{prefix}out of memory on device {device} with data.batch_size {batch_size} "
            f"({type(exc).__name__}: {first}); a later pass needed more memory than the probe "
            "batch showed: set data.batch_size to a number (start with 32) in the spec and run "
            "again."
        )
    used = batch_size if examples is None else max(1, min(batch_size, examples))
    size = f"data.batch_size {batch_size}" + (
        f" (batches of {used}, the whole test set)" if used != batch_size else ""
    )
    if used > 1:
        advice = f"set data.batch_size: {used // 2} (half of {used}) in the spec and run again"
    else:
        advice = "the model does not fit even one example; use a device with more memory"
    return ResourceError(
        f"{prefix}out of memory on device {device} with {size} "
        f"({type(exc).__name__}: {first}); {advice}. The test set itself is held on the "
        "device too: data.limit makes it smaller."
    )


# CPU flags (Linux /proc/cpuinfo) of instructions that multiply bf16 matrices natively: Intel
# AMX, AVX-512 BF16 (Cooper Lake, Sapphire Rapids, Zen 4) and Arm's BF16 extension. Without
# them oneDNN emulates bf16 through fp32 and autocast only adds conversions.
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The native bf16 instruction sets this CPU announces (empty where it announces none, or
    where there is no /proc/cpuinfo to read: such a CPU is treated as not running bf16 fast).

    torch's own ``get_cpu_capability()`` says ``AVX512`` whether or not the bf16 extension is
    there, so the kernel's flags are read instead. Tests patch this function.
    """
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [flag for flag in _BF16_CPU_FLAGS if flag in flags]


def bf16_unsupported_reason(device: torch.device) -> str | None:
    """Why ``device`` would not run bf16 faster than fp32, or None when it does.

    bf16 only pays where the hardware multiplies bf16 natively: a CUDA GPU with bf16 support
    (Ampere and later), or a CPU with AMX or AVX-512 BF16 (``cpu_bf16_flags``).
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return None
        return f"{describe_device(device)} has no native bf16 arithmetic (it needs Ampere or later)"
    if device.type == "cpu":
        if cpu_bf16_flags():
            return None
        return (
            "this CPU announces neither AMX nor AVX-512 BF16 (nor Arm BF16) in /proc/cpuinfo, "
            "so bf16 would be emulated in fp32 and slower"
        )
    return f"bf16 autocast is not supported by this project on {device.type} devices"


CPU_BATCH_BUDGET = 1 << 30  # beyond this, larger CPU batches only cost memory, not time


def memory_budget(device: torch.device) -> int:
    """Bytes a test batch may use on ``device``: half of what is free on a CUDA device; on
    the CPU an eighth of the physical memory, at most ``CPU_BATCH_BUDGET``; elsewhere (XLA,
    MPS), where free memory cannot be queried, ``CPU_BATCH_BUDGET``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    if device.type == "cpu":
        try:
            physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return CPU_BATCH_BUDGET
        return int(min(CPU_BATCH_BUDGET, physical // 8))
    return CPU_BATCH_BUDGET


def peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    """The most memory this process has used so far, in MiB: ``process_rss`` (peak resident
    set, what a CI runner must have; None where ``resource`` does not exist, on Windows) and,
    on CUDA, ``device_allocated`` (peak bytes torch allocated on ``device``)."""
    try:
        import resource
    except ImportError:
        rss: float | None = None
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes.
        rss = round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)
    out: dict[str, float | None] = {"process_rss": rss}
    if device.type == "cuda":
        out["device_allocated"] = round(torch.cuda.max_memory_allocated(device) / (1 << 20), 1)
    return out


def synchronize(device: torch.device) -> None:
    """Wait until queued work on ``device`` has run, so wall-clock timings mean something.

    CUDA and MPS run kernels asynchronously; XLA records a lazy graph that only executes at
    a step boundary. On the CPU this does nothing.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.mark_step()
        xm.wait_device_ops()
    elif device.type == "mps":
        torch.mps.synchronize()


def mark_step(device: torch.device) -> None:
    """End a step of lazily recorded work on ``device`` without waiting for it.

    XLA records operations into a graph that runs at a step boundary; marking one per batch
    keeps each graph the same from variant to variant (compiled once, then reused) instead
    of one graph growing over a whole sweep. Elsewhere this does nothing.
    """
    if device.type == "xla":
        import torch_xla

        # torch_xla.sync() since 2.6 (xm.mark_step() is deprecated in its favour).
        sync = getattr(torch_xla, "sync", None)
        if sync is not None:
            sync()
        else:
            import torch_xla.core.xla_model as xm

            xm.mark_step()


def inference_mode(device: torch.device) -> AbstractContextManager[Any]:
    """``torch.inference_mode()``, except on XLA, whose lazy tensors cannot be inference
    tensors (a slice of the test set fails: "Cannot set version_counter for inference
    tensor"): there ``torch.no_grad()``, which records no graph either."""
    return torch.no_grad() if device.type == "xla" else torch.inference_mode()


def generator_device(device: torch.device) -> torch.device:
    """Where a ``torch.Generator`` draws random values for ``device``: the device itself,
    except XLA, which has no ``torch.Generator`` ("XLA device type not an accelerator"), so
    its draws are made on the CPU (the same values a CPU run draws) and moved."""
    return torch.device("cpu") if device.type == "xla" else device


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (every CUDA device too) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if "torch_xla" in sys.modules:
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(seed)


def _use_deterministic_algorithms() -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` without importing
    TorchInductor: the public function imports it only to set ``inductor.config.deterministic``
    (2.4 s of a 2.8 s start on the digits example), and the audit never compiles. When the
    process already has Inductor loaded (a user's compiled code), the public function runs.
    """
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_flag is None or "torch._inductor" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        set_flag(True, warn_only=True)


def deterministic_settings(device: torch.device) -> dict[str, Any]:
    """Ask torch for deterministic kernels where it has them; return what was set.

    ``warn_only=True``: an operation without a deterministic implementation warns instead of
    failing the audit, and the returned dict (recorded in the report's metadata) says that
    determinism was requested, not guaranteed.
    """
    _use_deterministic_algorithms()
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    settings: dict[str, Any] = {
        "use_deterministic_algorithms": True,
        "warn_only": True,
        "cudnn.deterministic": True,
        "cudnn.benchmark": False,
    }
    if device.type == "cuda":
        # Only honoured if cuBLAS has not been initialised yet in this process; an existing
        # user setting is respected.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
        settings["CUBLAS_WORKSPACE_CONFIG"] = os.environ["CUBLAS_WORKSPACE_CONFIG"]
        # cuDNN runs fp32 convolutions (and RNNs) in TF32 by default on Ampere and later, a
        # 10-bit mantissa: exact fp32 is the audit's definition, so every backend runs IEEE.
        torch.backends.fp32_precision = "ieee"  # type: ignore[attr-defined]
        settings["fp32_precision"] = "ieee"
    return settings
