"""Build the user's network from a spec, load its weights safely, and wrap it for the audit.

Loading is where a user's mistakes show up first (a typo in the factory, a checkpoint of
another architecture, a pickle from an unknown source), so every such failure becomes one
:class:`ModelLoadError` paragraph that names the file or key and says what to do. Files that
could run code when loaded (pickles, TorchScript archives) are refused unless the spec opts
in with ``model.trust_pickle: true``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import pickle
import sys
import traceback
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .data import example_input_shape
from .errors import DataError, ModelLoadError, UnsafeFileError
from .fileio import sha256_file
from .spec import DataSpec, ModelSpec

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "LoadedModel",
    "NormalizedModel",
    "check_batch",
    "load_model",
    "load_state_dict_file",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# Prefixes that wrappers add to every key: Lightning's ``self.model``, DataParallel's ``module``.
_WRAPPER_PREFIXES = ("model.", "module.")
# Keys under which training scripts commonly nest the weights inside a larger checkpoint.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict")
# Never passed through to torchvision: any of these would fetch pretrained weights.
_TORCHVISION_DOWNLOAD_KWARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")
_MAX_LISTED = 8
# When no example input is given and the data's shape is unknown, probe the model on this.
_FALLBACK_SHAPE = (3, 224, 224)


class NormalizedModel(nn.Module):
    """The user's network behind a per-channel ``(x - mean) / std``.

    Attacks and their ε work in input units (pixels in ``input_range``); normalising inside
    the module keeps every gradient step and clamp in those units. ``mean`` and ``std`` are
    non-persistent buffers, so they follow ``.to(device)`` but never appear in a state dict,
    and the filters (which look at Conv/Linear weights) never see them.
    """

    mean: torch.Tensor | None
    std: torch.Tensor | None

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.model = model
        if mean is not None and std is not None:
            if len(mean) != len(std) or not len(mean):
                raise ValueError(f"mean {list(mean)} and std {list(std)} need one value a channel")
            if any(s <= 0 for s in std):
                raise ValueError(f"std {list(std)} must be positive")
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        else:
            self.mean = None
            self.std = None

    @property
    def channels(self) -> int | None:
        """Channels the normalisation expects (1 broadcasts to any), or None without one."""
        return None if self.mean is None else int(self.mean.numel())

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return x
        if x.dim() < 2 or (self.mean.numel() != 1 and x.shape[1] != self.mean.numel()):
            raise ValueError(
                f"normalisation has {self.mean.numel()} channel(s) but the input has shape "
                f"{tuple(x.shape)} (channels are dimension 1)"
            )
        # (C,) -> (1, C, 1, ...) so one value applies to each channel of an N×C×... batch.
        view = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(view)) / self.std.view(view)

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(self.normalize(x))


@dataclass
class LoadedModel:
    """A network ready to audit: the wrapper the engine runs and the user's inner module."""

    module: NormalizedModel
    inner: nn.Module
    checkpoint_sha256: str
    num_outputs: int
    description: str
    # Of the code that builds the network (see _source_sha256): the sweep cache keys on it.
    source_sha256: str = ""


def load_model(
    spec: ModelSpec,
    data: DataSpec,
    *,
    spec_dir: Path,
    example_input: torch.Tensor | None = None,
) -> LoadedModel:
    """Build ``spec.factory(**spec.kwargs)``, load ``spec.checkpoint`` into it and wrap it.

    The result is in eval mode on the CPU (the engine moves it). ``num_outputs`` comes from
    one forward pass on the first example of ``example_input``; without one, on zeros shaped
    like one example of ``data`` (when that shape is known without reading the data).
    The checkpoint file is only read, never written.
    """
    spec_dir = Path(spec_dir)
    inner, built_from = _build(spec, spec_dir)
    sha = ""
    if spec.checkpoint is not None:
        path = _resolve(spec.checkpoint, spec_dir)
        _require_regular_file(path, "checkpoint", "model.checkpoint")
        # Hash first: the digest names exactly the bytes that were then loaded.
        try:
            sha = sha256_file(path)
        except OSError as exc:
            raise ModelLoadError(
                f"{path}: cannot read the checkpoint ({exc.strerror or exc}); check its "
                "permissions."
            ) from exc
        state = load_state_dict_file(path, trust_pickle=spec.trust_pickle)
        _load_into(inner, state, path, spec)
        weights = f"weights from {path.name} (sha256 {sha[:12]})"
    else:
        weights = "the factory's initial weights (no checkpoint)"
    _require_finite(inner, spec, "the checkpoint" if spec.checkpoint is not None else None)
    inner = inner.to("cpu")
    norm = data.normalize
    wrapper = NormalizedModel(
        inner, None if norm is None else norm.mean, None if norm is None else norm.std
    )
    wrapper.eval()
    probe = _probe_input(data, example_input)
    if wrapper.channels not in (None, 1) and (
        probe.dim() < 2 or probe.shape[1] != wrapper.channels
    ):
        raise DataError(
            f"data.normalize gives {wrapper.channels} channel values but the inputs have shape "
            f"{tuple(probe.shape[1:])} (channels first): give one mean/std per input channel, "
            "or a single value for all."
        )
    source = f"{data.path.name} (data.path)" if data.path is not None else f"{data.source} data"
    num_outputs = _count_outputs(wrapper, probe, spec, source)
    n_params = sum(p.numel() for p in inner.parameters())
    kwargs = ", ".join(f"{k}={v!r}" for k, v in spec.kwargs.items())
    call = "" if spec.factory_kind == "torchscript" else f"({kwargs})"
    description = (
        f"{type(inner).__name__} from {built_from}{call}, {n_params:,} parameters, "
        f"{num_outputs} outputs, {weights}"
        + ("" if norm is None else f", inputs normalised with mean {norm.mean} std {norm.std}")
    )
    return LoadedModel(
        module=wrapper,
        inner=inner,
        checkpoint_sha256=sha,
        num_outputs=num_outputs,
        description=description,
        source_sha256=_source_sha256(spec, spec_dir, inner),
    )


def _source_sha256(spec: ModelSpec, spec_dir: Path, inner: nn.Module) -> str:
    """SHA-256 of what builds the network, so an edited model class is a new sweep-cache key.

    A TorchScript archive is hashed whole; a torchvision model by torchvision's version; a
    ``module:Name`` or ``file.py:Name`` factory by the content of the named module's file and
    of the file defining each class in the built network outside torch (the model, its
    blocks). Code those files merely import is not followed.
    """
    kind, target = spec.factory_kind, spec.factory_target
    if kind == "torchscript":
        return sha256_file(_resolve(target, spec_dir))
    if kind == "torchvision":
        import torchvision

        return hashlib.sha256(f"torchvision {torchvision.__version__}".encode()).hexdigest()
    module_part = target.split(":", 1)[0].strip()
    named = _resolve(module_part, spec_dir) if kind == "file" else None
    if named is None:
        named_file = getattr(sys.modules.get(module_part), "__file__", None)
        named = Path(named_file) if named_file else None
    files = {named.resolve()} if named is not None else set()
    for cls in {type(m) for m in inner.modules()}:
        if cls.__module__.split(".")[0] in ("torch", "torchvision"):
            continue
        with contextlib.suppress(TypeError, OSError):
            source = inspect.getsourcefile(cls)
            if source is not None:
                files.add(Path(source).resolve())
    digest = hashlib.sha256()
    for path in sorted(files):
        try:
            digest.update(sha256_file(path).encode())
        except OSError:
            digest.update(f"unreadable {path}".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- factories
def _resolve(path: Path | str, spec_dir: Path) -> Path:
    p = Path(path)
    # '~nosuchuser/...' stays as written, so "not found" names it as the user typed it.
    with contextlib.suppress(RuntimeError):
        p = p.expanduser()
    return p if p.is_absolute() else spec_dir / p


def _require_regular_file(path: Path, what: str, key: str) -> None:
    """A missing file, a folder or a device (``/dev/zero``) each get their own plain answer."""
    try:
        if path.is_file():
            return
        if path.is_dir():
            problem = f"is a folder, not a {what} file"
        elif path.exists():
            problem = f"is not a regular file (a device, pipe or socket), so it is not a {what}"
        else:
            problem = f"{what} not found"
    except (OSError, ValueError) as exc:
        problem = f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    raise ModelLoadError(
        f"{path}: {problem} ({key}). Paths are relative to the spec's folder"
        + (
            "; use checkpoint: null to audit the factory's initial weights."
            if key == "model.checkpoint"
            else "."
        )
    )


def _require_finite(inner: nn.Module, spec: ModelSpec, source: str | None) -> None:
    """NaN or Inf weights make every accuracy meaningless, and NaN never compares equal, so
    the bit-exact restore check after a sweep could not hold: refuse them before any work."""
    bad = [
        name
        for name, tensor in (*inner.named_parameters(), *inner.named_buffers())
        if (tensor.is_floating_point() or tensor.is_complex())
        and not bool(torch.isfinite(tensor.detach()).all())
    ]
    if bad:
        origin = source or f"the initial weights of model.factory {spec.factory!r}"
        raise ModelLoadError(
            f"after loading {origin}, the model's tensors {_listing(bad)} contain NaN or Inf; "
            "an audit needs finite weights. Fix the initialisation or give a checkpoint."
        )


def _guard_factory(factory: Any, spec: ModelSpec) -> None:
    """Refuse, before calling it, a factory that is plainly not a model's: a class that is not
    an ``nn.Module``, or a built-in, standard-library or ``torch`` function (``os:system``,
    ``shutil:rmtree``, ``torch:save``), which a spec could otherwise call with any kwargs."""
    while isinstance(factory, functools.partial):  # Net = partial(ResNet, depth=18) is fine
        factory = factory.func
    if isinstance(factory, type):
        if issubclass(factory, nn.Module):
            return
        raise ModelLoadError(
            f"model.factory {spec.factory!r} names the class {factory.__qualname__}, which is "
            "not a torch.nn.Module subclass, so it was NOT called. Point the factory at your "
            "model's class or at a function that returns the model."
        )
    module = getattr(factory, "__module__", None) or type(factory).__module__ or ""
    top = module.split(".")[0]
    builtin = isinstance(factory, types.BuiltinFunctionType | types.BuiltinMethodType)
    if builtin or top in sys.stdlib_module_names or top in ("builtins", "torch", "_operator"):
        name = getattr(factory, "__qualname__", type(factory).__name__)
        raise ModelLoadError(
            f"model.factory {spec.factory!r} names {module}.{name}, a built-in or library "
            "function, not a model factory, so it was NOT called. Point the factory at your "
            "model's class or at a function that returns the model."
        )


def _build(spec: ModelSpec, spec_dir: Path) -> tuple[nn.Module, str]:
    kind, target = spec.factory_kind, spec.factory_target
    if kind == "torchscript":
        return _load_torchscript(spec, _resolve(target, spec_dir)), f"torchscript {target}"
    if kind == "torchvision":
        factory: Callable[..., Any] = _torchvision_factory(target, spec.kwargs)
        kwargs = {k: v for k, v in spec.kwargs.items() if k not in _TORCHVISION_DOWNLOAD_KWARGS}
        label = f"torchvision {target}"
    else:
        module_part, name = (part.strip() for part in target.split(":", 1))
        module = (
            _import_file(_resolve(module_part, spec_dir), spec)
            if kind == "file"
            else _import_module(module_part, spec_dir, spec)
        )
        factory = _get_attr(module, name, spec)
        kwargs = dict(spec.kwargs)
        label = target
    if not callable(factory):
        raise ModelLoadError(
            f"model.factory {spec.factory!r} names a {type(factory).__name__}, not a class or "
            "function that builds the model."
        )
    if kind != "torchvision":
        _guard_factory(factory, spec)
    try:
        built = factory(**kwargs)
    except SystemExit as exc:
        raise ModelLoadError(
            f"model.factory {spec.factory!r} called sys.exit({exc.code!r}) when building the "
            f"model{_where(exc)}; a factory must return the model."
        ) from exc
    except TypeError as exc:
        raise ModelLoadError(
            f"model.factory {spec.factory!r} cannot be called with model.kwargs {kwargs}: "
            f"{_one_line(exc)}. "
            "Check the argument names and values against its signature."
        ) from exc
    except Exception as exc:
        raise ModelLoadError(
            f"model.factory {spec.factory!r} raised {type(exc).__name__} when called with "
            f"model.kwargs {kwargs}: {_one_line(exc)}{_where(exc)}."
        ) from exc
    if not isinstance(built, nn.Module):
        raise ModelLoadError(
            f"model.factory {spec.factory!r} returned a {type(built).__name__}, not a "
            "torch.nn.Module; point the factory at the model class or a function returning one."
        )
    return built, label


def _where(exc: BaseException) -> str:
    """`` (at file:line)`` of the innermost frame, so a user can find the bug in their code."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" (at {exc.filename}:{exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


@contextmanager
def _no_bytecode() -> Iterator[None]:
    """Import without writing ``__pycache__`` beside the user's files (an audit only reads)."""
    saved = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = saved


@contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    """Put ``folder`` first on ``sys.path`` for one import, then restore ``sys.path`` as it was.

    Bytecode is not written meanwhile: an audit only reads the user's folder, which may be
    read-only or under review, and must not leave ``__pycache__`` folders in it.
    """
    saved = list(sys.path)
    sys.path.insert(0, str(folder))
    try:
        with _no_bytecode():
            yield
    finally:
        sys.path[:] = saved


def _import_module(module_name: str, spec_dir: Path, spec: ModelSpec) -> ModuleType:
    """Import ``module_name`` as installed, else from the spec's folder or the nearest parent
    that holds its top-level package (so ``example_audits.digits`` works from a spec inside
    ``example_audits/``)."""
    try:
        with _no_bytecode():
            return importlib.import_module(module_name)
    except ImportError as first:
        missing = getattr(first, "name", None)
        top = module_name.split(".")[0]
        # Only a miss on the module itself (or a parent package) is worth a second try; an
        # ImportError from inside the user's module is reported as it is.
        if missing is not None and not (module_name + ".").startswith(missing + "."):
            raise _import_failed(module_name, first) from first
        folder = next(
            (
                d
                for d in (spec_dir, *spec_dir.resolve().parents)
                if (d / top).is_dir() or (d / f"{top}.py").is_file()
            ),
            None,
        )
        if folder is None:
            raise ModelLoadError(
                f"model.factory {spec.factory!r}: cannot import module {module_name!r} ({first}); "
                f"it is not installed and not found next to the spec ({spec_dir}) or above it. "
                "Install the package, fix the module path, or use 'file.py:Name' for a file "
                "beside the spec."
            ) from first
        with _on_sys_path(folder):
            try:
                return importlib.import_module(module_name)
            except (Exception, SystemExit) as exc:
                raise _import_failed(module_name, exc) from exc
    except (Exception, SystemExit) as exc:
        raise _import_failed(module_name, exc) from exc


def _import_failed(module_name: str, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"model.factory: importing {module_name!r} failed with {type(exc).__name__}: "
        f"{_one_line(exc)}"
        f"{_where(exc)}. Fix the module or install what it imports."
    )


def _import_file(path: Path, spec: ModelSpec) -> ModuleType:
    """Load a ``.py`` file by path under a unique module name (two specs' ``models.py`` never
    collide), with its folder on ``sys.path`` meanwhile so it can import its neighbours."""
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "not found"
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: {path} {problem}. A 'file.py:Name' factory is a "
            "Python file relative to the spec's folder."
        )
    path = path.resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    name = f"_inferlink_factory_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelLoadError(f"model.factory {spec.factory!r}: {path} is not a Python module.")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running it: dataclasses and pickling look the module up by name.
    sys.modules[name] = module
    try:
        with _on_sys_path(path.parent):
            module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: running {path} failed with "
            f"{type(exc).__name__}: {_one_line(exc)}{_where(exc)}."
        ) from exc
    return module


def _get_attr(module: ModuleType, name: str, spec: ModelSpec) -> Any:
    obj: Any = module
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelLoadError(
                f"model.factory {spec.factory!r}: {getattr(module, '__file__', module.__name__)} "
                f"has no {part!r}.{hint}"
            ) from None
    return obj


def _torchvision_factory(name: str, kwargs: Mapping[str, Any]) -> Callable[..., nn.Module]:
    import torchvision

    asked = {
        k: kwargs[k] for k in _TORCHVISION_DOWNLOAD_KWARGS if kwargs.get(k) not in (None, False)
    }
    if asked:
        raise ModelLoadError(
            f"model.kwargs {asked} would download pretrained weights for torchvision {name}, "
            "and an audit never downloads. Save the weights once (torch.save(model.state_dict(), "
            "'weights.pt') or as .safetensors) and give them as model.checkpoint instead."
        )
    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(
            f"model.factory 'torchvision: {name}': torchvision {torchvision.__version__} has no "
            f"model {name!r}.{hint}"
        )

    def build(**kw: Any) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, **kw)

    return build


def _load_torchscript(spec: ModelSpec, path: Path) -> nn.Module:
    if not spec.trust_pickle:
        raise UnsafeFileError(
            f"{path}: TorchScript archives can run arbitrary code when loaded, so this one was "
            "NOT loaded. If you trust where it came from, set `model.trust_pickle: true` in the "
            "spec; otherwise export the weights (torch.save(model.state_dict(), ...) or "
            ".safetensors) and name the model's class as model.factory."
        )
    if spec.kwargs:
        raise ModelLoadError(
            f"model.kwargs {spec.kwargs} cannot be passed to a TorchScript archive ({path}); "
            "it is already built. Remove model.kwargs."
        )
    if not path.is_file():
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: {path} not found (paths are relative to the spec)."
        )
    _warn_trusted(path, "TorchScript archive")
    try:
        with warnings.catch_warnings():
            # torch.jit's deprecation notice is not actionable for an audit's user.
            warnings.simplefilter("ignore", FutureWarning)
            module: nn.Module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: not a readable TorchScript archive "
            f"({type(exc).__name__}: {_one_line(exc)}); is it "
            "truncated, or a plain checkpoint (then name the model class as model.factory and "
            "the file as model.checkpoint)?"
        ) from exc
    return module


def _warn_trusted(path: Path, what: str) -> None:
    warnings.warn(
        f"INFERLINK-AUDIT: loading {path} as a {what} because model.trust_pickle is true: "
        "this file can run arbitrary code on this machine. Only do this for files you trust.",
        UserWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------- checkpoints
def load_state_dict_file(path: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict (name → tensor) from ``path`` without ever running code from it,
    unless ``trust_pickle``. Unwraps ``{"state_dict": ...}`` and checks every value is a
    finite tensor."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_file() and path.stat().st_size == 0:
        raise ModelLoadError(
            f"{path}: is empty (0 bytes), so it holds no weights; was the checkpoint written "
            "completely? Save it again."
        )
    if suffix == ".safetensors":
        raw: Any = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        raw = _read_torch(path, trust_pickle)
    else:
        raise ModelLoadError(
            f"{path}: unknown checkpoint format {suffix or '(no suffix)'}; model.checkpoint must "
            f"end in {', '.join(CHECKPOINT_SUFFIXES)}."
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
            "names to tensors). Save one with torch.save(model.state_dict(), path)."
        )
    not_tensors = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelLoadError(
            f"{path}: state dict entries {_listing(not_tensors)} are not tensors; a checkpoint "
            "must map parameter names to tensors only (save model.state_dict())."
        )
    unusual = [f"{k} ({_kind(v)})" for k, v in raw.items() if _kind(v)]
    if unusual:
        raise ModelLoadError(
            f"{path}: tensors {_listing(unusual)} are not plain dense tensors; an audit filters "
            "weights element by element. Save dense, real, unquantized weights (e.g. "
            "t.to_dense(), t.dequantize()) with model.state_dict()."
        )
    not_finite = [
        k for k, v in raw.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if not_finite:
        raise ModelLoadError(
            f"{path}: tensors {_listing(not_finite)} contain NaN or Inf; the training run that "
            "saved this checkpoint diverged. Use an earlier checkpoint."
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
            f"{path}: not a readable safetensors file ({_one_line(exc)}); is it truncated or "
            "another format?"
        ) from exc


def _read_torch(path: Path, trust_pickle: bool) -> Any:
    if trust_pickle:
        _warn_trusted(path, "pickle (torch.load with weights_only=False)")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: not a readable checkpoint ({type(exc).__name__}: {_one_line(exc)}); "
                "is it truncated?"
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
            "file, set `model.trust_pickle: true` in the spec."
        ) from exc
    except RuntimeError as exc:
        if "torchscript" in str(exc).lower():
            raise UnsafeFileError(
                f"{path} is a TorchScript archive, which can run arbitrary code when loaded, so "
                "it was NOT loaded. Use 'torchscript: <file>' as model.factory with "
                "`model.trust_pickle: true` if you trust it, or re-save "
                "model.state_dict() as the checkpoint."
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
        f"({type(exc).__name__}: {_one_line(exc)}); is it "
        "truncated, or not a checkpoint at all?"
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
            f"{label}: {_listing(keys)}"
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
            "architecture or other model.kwargs (e.g. num_classes)."
        )
    try:
        inner.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{path}: the weights could not be copied into the model: {_one_line(exc)}"
        ) from exc


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _listing(values: Sequence[str]) -> str:
    shown = ", ".join(values[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return f"{shown}, … and {more} more" if more > 0 else shown


# --------------------------------------------------------------------------- probing
def _probe_input(data: DataSpec, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        if example_input.dim() < 2:
            raise DataError(
                f"the data's inputs have shape {tuple(example_input.shape)}; they must be N×... "
                "with one row per example (e.g. N×C×H×W images or N×D features)."
            )
        example = example_input[:1].detach().to("cpu", torch.float32)
        # An empty data set still tells the shape; validate_dataset reports the emptiness.
        return example if len(example) else torch.zeros((1, *example_input.shape[1:]))
    shape = example_input_shape(data) or _FALLBACK_SHAPE
    return torch.zeros((1, *shape), dtype=torch.float32)


def _count_outputs(module: nn.Module, probe: torch.Tensor, spec: ModelSpec, source: str) -> int:
    shape = tuple(probe.shape)
    try:
        with torch.no_grad():
            out = module(probe)
    except (Exception, SystemExit) as exc:
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: a forward pass on an input of shape {shape} (one "
            f"example of {source}) failed with {type(exc).__name__}: {_one_line(exc)}. "
            "Check that the model's expected input (channels, size) matches the data."
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != shape[0]:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: on an input of shape {shape} the model returned "
            f"{got}; an audited classifier must return logits of shape N×classes. Wrap it so "
            "forward() returns only the logits."
        )
    if out.shape[1] == 0:
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: on an input of shape {shape} the model returned "
            f"logits of shape {tuple(out.shape)}, with no classes; check model.kwargs "
            "(e.g. num_classes)."
        )
    return int(out.shape[1])


def check_batch(module: nn.Module, x: torch.Tensor, y: torch.Tensor, num_outputs: int) -> None:
    """Run the first batch forward and backward to the input, as the attacks will.

    The model was probed on one example; a forward that only works for one (``view(1, -1)``),
    logits that are NaN, a forward that is not differentiable with respect to its input, or a
    batch that does not fit in memory then fail here with the batch's shape named, rather
    than from deep inside an attack. Parameters and their ``.grad`` are left untouched (only
    the input's gradient is taken). Running out of memory is re-raised as it is, for the
    caller to name the batch size.
    """
    from .devices import is_out_of_memory

    shape = tuple(x.shape)
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        try:
            out = module(leaf)
        except (Exception, SystemExit) as exc:
            if isinstance(exc, Exception) and is_out_of_memory(exc):
                raise
            raise DataError(
                f"the model fails on a batch of shape {shape} (data.batch_size {shape[0]}) with "
                f"{type(exc).__name__}: {_one_line(exc)}. It ran on one example, so check that "
                "forward() handles any batch size."
            ) from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (shape[0], num_outputs):
            got = (
                f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            )
            raise DataError(
                f"on a batch of shape {shape} the model returned {got}, not logits of shape "
                f"{(shape[0], num_outputs)}; forward() must handle any batch size."
            )
        if not bool(torch.isfinite(out.detach()).all()):
            raise DataError(
                f"the model's logits on the first batch (shape {shape}) contain NaN or Inf; "
                "accuracies would be meaningless. Check the weights and data.normalize."
            )
        try:
            loss = torch.nn.functional.cross_entropy(out, y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, leaf)
        except (Exception, SystemExit) as exc:
            if isinstance(exc, Exception) and is_out_of_memory(exc):
                raise
            raise ModelLoadError(
                f"the model's logits are not differentiable with respect to its input "
                f"({type(exc).__name__}: {_one_line(exc)}); attacks need that gradient. Remove "
                "torch.no_grad(), .detach() or non-differentiable steps from forward()."
            ) from exc
        if grad is None or not bool(torch.isfinite(grad).all()):
            raise ModelLoadError(
                "the gradient of the model's loss with respect to its input on the first batch "
                "contains NaN or Inf; attacks could not use it. Check forward() for divisions "
                "by zero or logs of zero."
            )


def _one_line(exc: BaseException) -> str:
    """The informative line of an exception's message, so the error stays one paragraph.

    Usually the first line; torch's ``Error(s) in loading state_dict for Net:`` puts the
    detail on the next ones, and its weights-only refusal on the line naming the opcode.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    detail = [line for line in lines if line.startswith("Unsupported operand")]
    first = detail[0] if detail else lines[0]
    if first.endswith(":") and len(lines) > 1:
        first = " ".join([first, *lines[1:3]])
    return first if len(first) <= 300 else first[:297] + "..."
