"""Read a checkpoint without running code from it, and load it into the built network.

``.safetensors`` files and ``torch.save`` files read with ``weights_only=True`` cannot run
code. A pickle that holds Python objects, or a TorchScript archive, is refused unless the
spec opts in with ``model.trust_pickle: true``, which warns loudly. Keys that a training
wrapper added (``model.``, ``module.``) are stripped; a state dict nested under
``state_dict`` is unwrapped. Every failure is a :class:`ModelLoadError` about
``model.checkpoint`` that names the file.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import KeyPath, ModelLoadError, UnsafeFileError, listing, one_line
from .fileio import sha256_file
from .spec import ModelSpec

__all__ = [
    "CHECKPOINT_KEY",
    "CHECKPOINT_SUFFIXES",
    "load_checkpoint",
    "load_state_dict_file",
    "warn_trusted",
]

CHECKPOINT_KEY: KeyPath = ("model", "checkpoint")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# Prefixes that wrappers add to every key: Lightning's ``self.model``, DataParallel's ``module``.
_WRAPPER_PREFIXES = ("model.", "module.")
# Keys under which training scripts commonly nest the weights inside a larger checkpoint.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict")


def load_checkpoint(inner: nn.Module, path: Path, spec: ModelSpec) -> str:
    """Load the checkpoint at ``path`` into ``inner``; its SHA-256, of exactly the bytes read."""
    _require_regular_file(path)
    # Hash first: the digest names exactly the bytes that were then loaded.
    try:
        sha = sha256_file(path)
    except OSError as exc:
        raise ModelLoadError(
            f"{path}: cannot read the checkpoint ({exc.strerror or exc}); check its permissions.",
            key=CHECKPOINT_KEY,
        ) from exc
    state = load_state_dict_file(path, trust_pickle=spec.trust_pickle)
    _load_into(inner, state, path, spec)
    return sha


def warn_trusted(path: Path, what: str) -> None:
    """Say loudly that ``path`` is loaded in a way that can run its code (the spec opted in)."""
    warnings.warn(
        f"INFERLINK-AUDIT: loading {path} as a {what} because model.trust_pickle is true: "
        "this file can run arbitrary code on this machine. Only do this for files you trust.",
        UserWarning,
        stacklevel=3,
    )


def _require_regular_file(path: Path) -> None:
    """A missing file, a folder or a device (``/dev/zero``) each get their own plain answer."""
    try:
        if path.is_file():
            return
        if path.is_dir():
            problem = "is a folder, not a checkpoint file"
        elif path.exists():
            problem = "is not a regular file (a device, pipe or socket), so it is not a checkpoint"
        else:
            problem = "checkpoint not found"
    except (OSError, ValueError) as exc:
        problem = f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    raise ModelLoadError(
        f"{path}: {problem} (model.checkpoint). Paths are relative to the spec's folder; use "
        "checkpoint: null to audit the factory's initial weights.",
        key=CHECKPOINT_KEY,
    )


def load_state_dict_file(path: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict (name → tensor) from ``path`` without ever running code from it,
    unless ``trust_pickle``. Unwraps ``{"state_dict": ...}`` and checks every value is a
    finite tensor."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_file() and path.stat().st_size == 0:
        raise ModelLoadError(
            f"{path}: is empty (0 bytes), so it holds no weights; was the checkpoint written "
            "completely? Save it again.",
            key=CHECKPOINT_KEY,
        )
    if suffix == ".safetensors":
        raw: Any = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        raw = _read_torch(path, trust_pickle)
    else:
        raise ModelLoadError(
            f"{path}: unknown checkpoint format {suffix or '(no suffix)'}; model.checkpoint must "
            f"end in {', '.join(CHECKPOINT_SUFFIXES)}.",
            key=CHECKPOINT_KEY,
        )
    if isinstance(raw, nn.Module):  # a whole pickled model, only reachable with trust_pickle
        raw = raw.state_dict()
    if isinstance(raw, Mapping):
        for key in _NESTED_STATE_KEYS:
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
        raise ModelLoadError(
            f"{path}: holds a {type(raw).__name__}, not a state dict (a mapping from parameter "
            "names to tensors). Save one with torch.save(model.state_dict(), path).",
            key=CHECKPOINT_KEY,
        )
    not_tensors = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelLoadError(
            f"{path}: state dict entries {listing(not_tensors)} are not tensors; a checkpoint "
            "must map parameter names to tensors only (save model.state_dict()).",
            key=CHECKPOINT_KEY,
        )
    unusual = [f"{k} ({_kind(v)})" for k, v in raw.items() if _kind(v)]
    if unusual:
        raise ModelLoadError(
            f"{path}: tensors {listing(unusual)} are not plain dense tensors; an audit filters "
            "weights element by element. Save dense, real, unquantized weights (e.g. "
            "t.to_dense(), t.dequantize()) with model.state_dict().",
            key=CHECKPOINT_KEY,
        )
    not_finite = [
        k for k, v in raw.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if not_finite:
        raise ModelLoadError(
            f"{path}: tensors {listing(not_finite)} contain NaN or Inf; the training run that "
            "saved this checkpoint diverged. Use an earlier checkpoint.",
            key=CHECKPOINT_KEY,
        )
    return dict(raw)


def _kind(t: torch.Tensor) -> str:
    """What makes ``t`` unusable as a weight (sparse, meta, quantized, complex), or ``""``."""
    if t.layout != torch.strided:
        return f"layout {t.layout}".replace("torch.", "")
    if t.device.type == "meta":
        return "meta tensor without data"
    if t.is_quantized:
        return f"quantized {t.dtype}".replace("torch.", "")
    if t.is_complex():
        return f"complex {t.dtype}".replace("torch.", "")
    return ""


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: not a readable safetensors file ({one_line(exc)}); is it truncated or "
            "another format?",
            key=CHECKPOINT_KEY,
        ) from exc


def _read_torch(path: Path, trust_pickle: bool) -> Any:
    if trust_pickle:
        warn_trusted(path, "pickle (torch.load with weights_only=False)")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)  # trust_pickle
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: not a readable checkpoint ({type(exc).__name__}: {one_line(exc)}); "
                "is it truncated?",
                key=CHECKPOINT_KEY,
            ) from exc
    try:
        with warnings.catch_warnings():
            # Notices about the pickle protocol, or a TorchScript archive (refused below): the
            # error raised here says what matters.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc).lower()
        if "weights only" not in text:
            raise _unreadable(path, exc) from exc
        # The restricted unpickler also stops at opcodes it does not know; that is random
        # bytes unless the file starts like a pickle or torch's zip archive.
        if "unsupported operand" in text and not _starts_like_a_pickle(path):
            raise _unreadable(path, exc) from exc
        refused = _refused_global(str(exc))
        raise UnsafeFileError(
            f"{path} is a pickle that holds Python objects{refused}, and loading it could run "
            "arbitrary code, so it was NOT loaded. Re-save only the weights with "
            "torch.save(model.state_dict(), path) or as .safetensors; or, if you trust this "
            "file, set `model.trust_pickle: true` in the spec.",
            key=CHECKPOINT_KEY,
        ) from exc
    except RuntimeError as exc:
        if "torchscript" in str(exc).lower():
            raise UnsafeFileError(
                f"{path} is a TorchScript archive, which can run arbitrary code when loaded, so "
                "it was NOT loaded. Use 'torchscript: <file>' as model.factory with "
                "`model.trust_pickle: true` if you trust it, or re-save "
                "model.state_dict() as the checkpoint.",
                key=CHECKPOINT_KEY,
            ) from exc
        raise _unreadable(path, exc) from exc
    except Exception as exc:
        raise _unreadable(path, exc) from exc


def _starts_like_a_pickle(path: Path) -> bool:
    """A pickle of protocol 2 or later starts with PROTO (0x80) and its number; torch.save's
    archives are zip files whose ``data.pkl`` is one."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head.startswith(b"PK") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _refused_global(message: str) -> str:
    """`` (it references posix.system)`` from torch's refusal message, when it names one."""
    marker = "unsupported GLOBAL "
    start = message.find(marker)
    if start < 0:
        return ""
    name = message[start + len(marker) :].split()[0]
    return f" (it references {name})"


def _unreadable(path: Path, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: not a readable PyTorch checkpoint "
        f"({type(exc).__name__}: {one_line(exc)}); is it "
        "truncated, or not a checkpoint at all?",
        key=CHECKPOINT_KEY,
    )


def _strip_wrapper_prefixes(
    state: dict[str, torch.Tensor], model_keys: set[str]
) -> dict[str, torch.Tensor]:
    """Drop ``model.``/``module.`` prefixes that a training wrapper put on every key, but only
    when the model's own keys do not carry them too."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(
                k.startswith(prefix) for k in model_keys
            ):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _load_into(
    inner: nn.Module, state: dict[str, torch.Tensor], path: Path, spec: ModelSpec
) -> None:
    expected = inner.state_dict()
    state = _strip_wrapper_prefixes(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} checkpoint {_shape(state[k])} vs model {_shape(expected[k])}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label}: {listing(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if keys
        ]
        raise ModelLoadError(
            f"{path} does not fit the model built by {spec.factory!r} with kwargs "
            f"{spec.kwargs}: {'; '.join(parts)}. The checkpoint is probably for another "
            "architecture or other model.kwargs (e.g. num_classes).",
            key=CHECKPOINT_KEY,
        )
    try:
        inner.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{path}: the weights could not be copied into the model: {one_line(exc)}",
            key=CHECKPOINT_KEY,
        ) from exc


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"
