"""Build the user's network from ``model.factory``, and hash the code that builds it.

A factory is ``module:Name`` (an importable module, or one beside the spec), ``file.py:Name``
(a Python file relative to the spec), ``torchvision: name`` (never with pretrained weights:
an audit does not download) or ``torchscript: file`` (only with ``model.trust_pickle``).
Before it is called, a factory that is plainly not a model's (a built-in, standard-library or
torch function) is refused. Every failure is a :class:`ModelLoadError` about
``model.factory``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .checkpoints import warn_trusted
from .errors import KeyPath, ModelLoadError, UnsafeFileError, one_line
from .fileio import sha256_file
from .spec import ModelSpec

__all__ = ["FACTORY_KEY", "build_network", "resolve_path", "source_sha256"]

FACTORY_KEY: KeyPath = ("model", "factory")
# Never passed through to torchvision: any of these would fetch pretrained weights.
_TORCHVISION_DOWNLOAD_KWARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def source_sha256(spec: ModelSpec, spec_dir: Path, inner: nn.Module) -> str:
    """SHA-256 of what builds the network, so an edited model class is a new sweep-cache key.

    A TorchScript archive is hashed whole; a torchvision model by torchvision's version; a
    ``module:Name`` or ``file.py:Name`` factory by the content of the named module's file and
    of the file defining each class in the built network outside torch (the model, its
    blocks). Code those files merely import is not followed.
    """
    kind, target = spec.factory_kind, spec.factory_target
    if kind == "torchscript":
        return sha256_file(resolve_path(target, spec_dir))
    if kind == "torchvision":
        import torchvision

        return hashlib.sha256(f"torchvision {torchvision.__version__}".encode()).hexdigest()
    module_part = target.split(":", 1)[0].strip()
    named = resolve_path(module_part, spec_dir) if kind == "file" else None
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


def resolve_path(path: Path | str, spec_dir: Path) -> Path:
    """``path`` as a spec means it: ``~`` expanded, relative to the spec's folder."""
    p = Path(path)
    # '~nosuchuser/...' stays as written, so "not found" names it as the user typed it.
    with contextlib.suppress(RuntimeError):
        p = p.expanduser()
    return p if p.is_absolute() else spec_dir / p


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
            "model's class or at a function that returns the model.",
            key=FACTORY_KEY,
        )
    module = getattr(factory, "__module__", None) or type(factory).__module__ or ""
    top = module.split(".")[0]
    builtin = isinstance(factory, types.BuiltinFunctionType | types.BuiltinMethodType)
    if builtin or top in sys.stdlib_module_names or top in ("builtins", "torch", "_operator"):
        name = getattr(factory, "__qualname__", type(factory).__name__)
        raise ModelLoadError(
            f"model.factory {spec.factory!r} names {module}.{name}, a built-in or library "
            "function, not a model factory, so it was NOT called. Point the factory at your "
            "model's class or at a function that returns the model.",
            key=FACTORY_KEY,
        )


def build_network(spec: ModelSpec, spec_dir: Path) -> tuple[nn.Module, str]:
    """``spec.factory(**spec.kwargs)`` with its initial weights, and what built it (a label)."""
    kind, target = spec.factory_kind, spec.factory_target
    if kind == "torchscript":
        return _load_torchscript(spec, resolve_path(target, spec_dir)), f"torchscript {target}"
    if kind == "torchvision":
        factory: Callable[..., Any] = _torchvision_factory(target, spec.kwargs)
        kwargs = {k: v for k, v in spec.kwargs.items() if k not in _TORCHVISION_DOWNLOAD_KWARGS}
        label = f"torchvision {target}"
    else:
        module_part, name = (part.strip() for part in target.split(":", 1))
        module = (
            _import_file(resolve_path(module_part, spec_dir), spec)
            if kind == "file"
            else _import_module(module_part, spec_dir, spec)
        )
        factory = _get_attr(module, name, spec)
        kwargs = dict(spec.kwargs)
        label = target
    if not callable(factory):
        raise ModelLoadError(
            f"model.factory {spec.factory!r} names a {type(factory).__name__}, not a class or "
            "function that builds the model.",
            key=FACTORY_KEY,
        )
    if kind != "torchvision":
        _guard_factory(factory, spec)
    try:
        built = factory(**kwargs)
    except SystemExit as exc:
        raise ModelLoadError(
            f"model.factory {spec.factory!r} called sys.exit({exc.code!r}) when building the "
            f"model{_where(exc)}; a factory must return the model.",
            key=FACTORY_KEY,
        ) from exc
    except TypeError as exc:
        raise ModelLoadError(
            f"model.factory {spec.factory!r} cannot be called with model.kwargs {kwargs}: "
            f"{one_line(exc)}. "
            "Check the argument names and values against its signature.",
            key=FACTORY_KEY,
        ) from exc
    except Exception as exc:
        raise ModelLoadError(
            f"model.factory {spec.factory!r} raised {type(exc).__name__} when called with "
            f"model.kwargs {kwargs}: {one_line(exc)}{_where(exc)}.",
            key=FACTORY_KEY,
        ) from exc
    if not isinstance(built, nn.Module):
        raise ModelLoadError(
            f"model.factory {spec.factory!r} returned a {type(built).__name__}, not a "
            "torch.nn.Module; point the factory at the model class or a function returning one.",
            key=FACTORY_KEY,
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
                "beside the spec.",
                key=FACTORY_KEY,
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
        f"{one_line(exc)}"
        f"{_where(exc)}. Fix the module or install what it imports.",
        key=FACTORY_KEY,
    )


def _import_file(path: Path, spec: ModelSpec) -> ModuleType:
    """Load a ``.py`` file by path under a unique module name (two specs' ``models.py`` never
    collide), with its folder on ``sys.path`` meanwhile so it can import its neighbours."""
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "not found"
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: {path} {problem}. A 'file.py:Name' factory is a "
            "Python file relative to the spec's folder.",
            key=FACTORY_KEY,
        )
    path = path.resolve()
    # The content is part of the name: a file edited while the process lives (a pytest session,
    # a notebook) is imported again, so its new code never runs under a stale module.
    digest = hashlib.sha256(str(path).encode() + b"\0" + path.read_bytes()).hexdigest()[:12]
    name = f"_inferlink_factory_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: {path} is not a Python module.", key=FACTORY_KEY
        )
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
            f"{type(exc).__name__}: {one_line(exc)}{_where(exc)}.",
            key=FACTORY_KEY,
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
                f"has no {part!r}.{hint}",
                key=FACTORY_KEY,
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
            "'weights.pt') or as .safetensors) and give them as model.checkpoint instead.",
            key=FACTORY_KEY,
        )
    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(
            f"model.factory 'torchvision: {name}': torchvision {torchvision.__version__} has no "
            f"model {name!r}.{hint}",
            key=FACTORY_KEY,
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
            ".safetensors) and name the model's class as model.factory.",
            key=FACTORY_KEY,
        )
    if spec.kwargs:
        raise ModelLoadError(
            f"model.kwargs {spec.kwargs} cannot be passed to a TorchScript archive ({path}); "
            "it is already built. Remove model.kwargs.",
            key=FACTORY_KEY,
        )
    if not path.is_file():
        raise ModelLoadError(
            f"model.factory {spec.factory!r}: {path} not found (paths are relative to the spec).",
            key=FACTORY_KEY,
        )
    warn_trusted(path, "TorchScript archive")
    try:
        with warnings.catch_warnings():
            # torch.jit's deprecation notice is not actionable for an audit's user.
            warnings.simplefilter("ignore", FutureWarning)
            module: nn.Module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: not a readable TorchScript archive "
            f"({type(exc).__name__}: {one_line(exc)}); is it "
            "truncated, or a plain checkpoint (then name the model class as model.factory and "
            "the file as model.checkpoint)?",
            key=FACTORY_KEY,
        ) from exc
    return module
