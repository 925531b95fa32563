"""Test and training sets as plain tensors, and the checks that they fit the model.

An audit evaluates the same examples hundreds of times (once per threshold, filter and
attack), so a data set is loaded once into two tensors that the engine keeps on the
device; there is no ``DataLoader`` and no per-item transform. Nothing is downloaded unless
a spec says ``download: true``.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError, KeyPath
from .spec import DataSourceSpec, DataSpec

__all__ = [
    "DIGITS_N_TEST",
    "DIGITS_N_TRAIN",
    "Dataset",
    "data_key",
    "digits_split_indices",
    "example_input_shape",
    "load_dataset",
    "validate_dataset",
]

DIGITS_N_TRAIN = 1437
DIGITS_N_TEST = 360
_DIGITS_N = 1797
_DIGITS_SPLIT_SEED = 0

# Shapes (C, H, W) of the torchvision sets this module reads, so a model can be probed
# before the data are loaded.
_TORCHVISION_SHAPES: dict[str, tuple[int, ...]] = {
    "MNIST": (1, 28, 28),
    "FashionMNIST": (1, 28, 28),
    "CIFAR10": (3, 32, 32),
    "CIFAR100": (3, 32, 32),
}
_TORCHVISION_FOLDERS = {
    "MNIST": "MNIST/raw",
    "FashionMNIST": "FashionMNIST/raw",
    "CIFAR10": "cifar-10-batches-py",
    "CIFAR100": "cifar-100-python",
}
_MAX_LISTED = 10
# Values a float32 conversion may move just past a bound (e.g. 255/255 computed in float32).
_RANGE_SLACK = 1e-6


@dataclass
class Dataset:
    """Examples ``x`` (float32, N×...) with integer labels ``y`` (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor
    description: str

    def __len__(self) -> int:
        return int(self.y.shape[0])


def load_dataset(spec: DataSourceSpec, *, split: str | None = None) -> Dataset:
    """Load the examples a data spec names, in a fixed order, limited to the first ``limit``.

    ``split`` overrides ``spec.split``. Sources:

    * ``sklearn_digits`` — scikit-learn's bundled 8×8 digits (1797 images, no download),
      ``images / 16`` as float32 N×1×8×8 in [0, 1]. The split is fixed and documented::

          train_idx, test_idx = train_test_split(
              range(1797), test_size=0.2, random_state=0, stratify=digits.target)

      giving 1437 train and 360 test examples, each kept in ascending original-index order.
    * ``tensors`` — ``path`` is a ``.pt`` dict ``{"x": Tensor, "y": Tensor}`` read with
      ``torch.load(weights_only=True)`` (pickled objects are refused), or a ``.npz`` with
      arrays ``x`` and ``y`` (read with ``allow_pickle=False``). The file *is* the split.
    * ``torchvision`` — MNIST, FashionMNIST, CIFAR10, CIFAR100 from the local ``root``
      (fetched only with ``download: true``), scaled like ``transforms.ToTensor()``: float32
      N×C×H×W in [0, 1]. ``ImageFolder`` reads ``root/<split>`` when that folder exists, else
      ``root`` itself; its images must all have one size (nothing is resized).
    """
    split = spec.split if split is None else split
    if split not in ("train", "test"):
        raise DataError(f"data split {split!r} is not 'train' or 'test'.")
    if spec.source == "sklearn_digits":
        x, y, what = _load_digits(split, spec.limit)
    elif spec.source == "tensors":
        if spec.path is None:
            raise DataError("data source 'tensors' needs 'path' (a .pt dict {x, y} or a .npz).")
        x, y, what = _load_tensors(Path(spec.path).expanduser(), spec.limit)
    elif spec.source == "torchvision":
        if spec.name is None or spec.root is None:
            raise DataError("data source 'torchvision' needs 'name' and 'root' (a local folder).")
        x, y, what = _load_torchvision(
            spec.name, Path(spec.root).expanduser(), split, spec.download, spec.limit
        )
    else:  # pragma: no cover - the spec's Literal type rules this out
        raise DataError(f"unknown data source {spec.source!r}")
    shape = "×".join(str(d) for d in x.shape[1:])
    return Dataset(x=x, y=y, description=f"{what}: {x.shape[0]} examples of {shape}")


def data_key(spec: DataSpec) -> KeyPath:
    """The spec key a problem with the test data is about: ``data.path`` when the data come
    from a file, else the ``data`` section as a whole."""
    return ("data", "path") if spec.path is not None else ("data",)


def example_input_shape(spec: DataSourceSpec) -> tuple[int, ...] | None:
    """The shape (C, H, W) of one example when it is known without reading the data."""
    if spec.source == "sklearn_digits":
        return (1, 8, 8)
    if spec.source == "torchvision" and spec.name in _TORCHVISION_SHAPES:
        return _TORCHVISION_SHAPES[spec.name]
    return None


# --------------------------------------------------------------------------- sklearn digits
def digits_split_indices(split: str) -> np.ndarray:
    """Original indices (ascending) of the fixed digits split; see :func:`load_dataset`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train_idx, test_idx = train_test_split(
        np.arange(_DIGITS_N),
        test_size=0.2,
        random_state=_DIGITS_SPLIT_SEED,
        stratify=target,
    )
    return np.sort(train_idx if split == "train" else test_idx)


def _load_digits(split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = digits_split_indices(split)[:limit]
    x = torch.from_numpy((digits.images[idx] / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target[idx].astype(np.int64))
    return x.contiguous(), y, f"sklearn digits, {split} split"


# --------------------------------------------------------------------------- tensors
def _load_tensors(path: Path, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    where = str(path)
    try:
        regular = path.is_file()
        problem = (
            ""
            if regular
            else "is a folder, not a data file"
            if path.is_dir()
            else "is not a regular file (a device, pipe or socket)"
            if path.exists()
            else "data file not found"
        )
    except (OSError, ValueError) as exc:
        problem = f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    if problem:
        raise DataError(
            f"{where}: {problem} (data.path). Paths are relative to the spec's folder; give a "
            ".pt dict {'x': Tensor, 'y': Tensor} or a .npz with arrays x and y."
        )
    if path.stat().st_size == 0:
        raise DataError(
            f"{where}: is empty (0 bytes), so it holds no examples; was it written completely?"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x_raw, y_raw = _read_npz(path)
    elif suffix in (".pt", ".pth"):
        x_raw, y_raw = _read_pt(path)
    else:
        raise DataError(
            f"{where}: data files must be a .pt dict {{'x': Tensor, 'y': Tensor}} or a .npz with "
            f"arrays x and y; {suffix or 'no suffix'} is neither."
        )
    _check_raw_arrays(x_raw, y_raw, where)
    # Stored with requires_grad or not, the data are plain inputs here.
    x = x_raw.detach()[:limit]
    y = _labels_to_int64(y_raw.detach()[:limit], where)
    # Integer pixels stay unscaled: validate_dataset then names the range against input_range.
    return x.to(torch.float32).contiguous(), y, f"tensors from {path.name}"


def _check_raw_arrays(x: torch.Tensor, y: torch.Tensor, where: str) -> None:
    """Shapes and dtypes that would fail obscurely later (slicing a 0-d tensor, complex values
    silently cast to real), refused while the file's name is still at hand."""
    for key, value in (("x", x), ("y", y)):
        unusual = (
            f"a {value.layout} tensor".replace("torch.", "")
            if value.layout != torch.strided
            else "a meta tensor without data"
            if value.device.type == "meta"
            else f"a quantized {value.dtype} tensor".replace("torch.", "")
            if value.is_quantized
            else ""
        )
        if unusual:
            raise DataError(
                f"{where}: '{key}' is {unusual}; store plain dense tensors (e.g. t.to_dense(), "
                "t.dequantize())."
            )
        if value.dim() == 0:
            raise DataError(
                f"{where}: '{key}' is a single number (shape ()), not one entry per example; "
                "store x as N×... inputs and y as N labels."
            )
        if value.is_complex():
            raise DataError(
                f"{where}: '{key}' holds complex numbers ({value.dtype}); inputs and labels must "
                "be real."
            )
    _check_shapes(x, y, where)
    if x.shape[0] == 0:
        raise DataError(f"{where}: x and y hold no examples; the data set is empty.")


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    # np.load falls back to unpickling anything that is not a zip or .npy; look first, so a
    # file of another kind is called that, not "pickled data".
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file ({exc.strerror or exc}).") from exc
    if magic not in _ZIP_MAGIC:
        raise DataError(
            f"{path}: not a .npz archive (a .npz is a zip file; this one starts with "
            f"{magic!r}). Save the data with np.savez(path, x=..., y=...)."
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if "x" not in names or "y" not in names:
                raise DataError(
                    f"{path}: a .npz data file needs arrays named 'x' (inputs) and 'y' (labels); "
                    f"it has {names or 'no arrays'}. Save it with np.savez(path, x=..., y=...)."
                )
            x_np, y_np = archive["x"], archive["y"]
    except DataError:
        raise
    except ValueError as exc:
        # allow_pickle=False refuses object arrays, which would unpickle (run code) to load.
        raise DataError(
            f"{path}: cannot read the .npz without unpickling ({exc}). Store x and y as plain "
            "numeric arrays (not object arrays) with np.savez."
        ) from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc}); is it truncated?") from exc
    for key, array in (("x", x_np), ("y", y_np)):
        if array.dtype.kind not in "biuf":
            raise DataError(
                f"{path}: array '{key}' has dtype {array.dtype}; inputs and labels must be numeric."
            )
    return torch.from_numpy(np.ascontiguousarray(x_np)), torch.from_numpy(
        np.ascontiguousarray(y_np)
    )


def _read_pt(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # sparse tensors are refused below, with the reason
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise DataError(
                f"{path}: this .pt file contains pickled Python objects, and loading it could run "
                "arbitrary code, so it is refused. Save plain tensors instead: "
                "torch.save({'x': x_tensor, 'y': y_tensor}, path), or np.savez(path, x=..., y=...)."
            ) from exc
        raise DataError(f"{path}: not a readable .pt file ({exc}); is it truncated?") from exc
    except Exception as exc:
        raise DataError(
            f"{path}: not a readable .pt file ({type(exc).__name__}: {exc}); is it truncated or "
            "another format?"
        ) from exc
    if not isinstance(obj, dict) or not {"x", "y"} <= set(obj):
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"{path}: a .pt data file must hold a dict {{'x': Tensor, 'y': Tensor}}; found "
            f"{found}. Save it with torch.save({{'x': x, 'y': y}}, path)."
        )
    x, y = obj["x"], obj["y"]
    for key, value in (("x", x), ("y", y)):
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{path}: '{key}' is a {type(value).__name__}, not a torch.Tensor.")
    return x, y


def _labels_to_int64(y: torch.Tensor, where: str) -> torch.Tensor:
    """Integer-valued labels of any dtype become int64; fractional labels are an error."""
    if torch.is_floating_point(y) or torch.is_complex(y):
        bad = ~torch.isfinite(y) | (y != torch.round(y))
        if bool(bad.any()):
            found = _listing(torch.unique(y[bad]).tolist())
            raise DataError(
                f"{where}: labels must be integer class indices; found non-integer values "
                f"{found}. Store y as integers 0..K-1 (one-hot or soft labels are not supported)."
            )
    return y.to(torch.int64)


# --------------------------------------------------------------------------- torchvision
def _load_torchvision(
    name: str, root: Path, split: str, download: bool, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    from torchvision import datasets

    if name == "ImageFolder":
        return _load_image_folder(root, split, limit)
    cls = getattr(datasets, name)
    train = split == "train"
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:
        # torchvision signals missing or corrupt files with a RuntimeError.
        looked = root / _TORCHVISION_FOLDERS[name]
        hint = (
            "The download did not produce usable files; check the network and free space."
            if download
            else "Put the files there, or set data.download: true to fetch them (needs network)."
        )
        raise DataError(
            f"torchvision {name} ({split} split) not found or corrupt under {looked} "
            f"(data.root = {root}). {hint}"
        ) from exc
    except OSError as exc:
        raise DataError(
            f"torchvision {name}: cannot read or fetch the files under {root} ({exc})."
        ) from exc
    except Exception as exc:  # a damaged file that passed torchvision's own checks
        raise DataError(
            f"torchvision {name}: the files under {root} cannot be read "
            f"({type(exc).__name__}: {exc}); delete them and fetch them again."
        ) from exc
    data, targets = ds.data, ds.targets
    if isinstance(data, np.ndarray):  # CIFAR: N×H×W×C uint8
        images = torch.from_numpy(data[:limit]).permute(0, 3, 1, 2)
    else:  # MNIST family: N×H×W uint8
        images = data[:limit].unsqueeze(1)
    labels = torch.as_tensor(targets[:limit], dtype=torch.int64)
    # ToTensor's scaling of uint8 images, without a per-item Python loop.
    x = images.to(torch.float32).div_(255.0).contiguous()
    return x, labels, f"torchvision {name}, {split} split"


def _load_image_folder(
    root: Path, split: str, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    from torchvision import datasets, transforms

    folder = root / split if (root / split).is_dir() else root
    try:
        ds = datasets.ImageFolder(str(folder), transform=transforms.ToTensor())
    except (FileNotFoundError, OSError) as exc:
        raise DataError(
            f"ImageFolder {folder}: no class folders with images found ({exc}). Expected "
            f"{root}/{split}/<class>/<image> or {root}/<class>/<image>."
        ) from exc
    n = len(ds) if limit is None else min(limit, len(ds))
    items: list[Any] = []
    for i in range(n):
        try:
            items.append(ds[i])
        except Exception as exc:  # PIL: unreadable, truncated or decompression-bomb images
            image = ds.samples[i][0]
            raise DataError(
                f"ImageFolder {folder}: cannot read image {image} ({type(exc).__name__}: {exc}); "
                "remove or replace it."
            ) from exc
    shapes = sorted({tuple(img.shape) for img, _ in items})
    if len(shapes) > 1:
        raise DataError(
            f"ImageFolder {folder}: images have different sizes {_listing(shapes)}; an audit "
            "batches them as one tensor, so resize them to one size first."
        )
    x = torch.stack([img for img, _ in items]) if items else torch.empty(0, 3, 1, 1)
    y = torch.tensor([label for _, label in items], dtype=torch.int64)
    return x, y, f"ImageFolder {folder}"


# --------------------------------------------------------------------------- validation
def _check_shapes(x: torch.Tensor, y: torch.Tensor, where: str) -> None:
    """x is N×... with one 1-D label per example (checked at load and again at validation)."""
    if x.dim() < 2:
        raise DataError(
            f"{where}: inputs x have shape {tuple(x.shape)}; they must be N×... with one row per "
            "example (e.g. N×C×H×W images or N×D features)."
        )
    if y.dim() != 1:
        raise DataError(
            f"{where}: labels y have shape {tuple(y.shape)}; they must be 1-D class indices "
            "(not one-hot): use y.argmax(1) for one-hot labels."
        )
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{where}: {x.shape[0]} inputs but {y.shape[0]} labels; x and y must have the same "
            "length."
        )


def validate_dataset(
    ds: Dataset, *, num_outputs: int, input_range: tuple[float, float], where: str
) -> None:
    """Refuse data that would make an audit's numbers meaningless, naming ``where`` they came from.

    Checks: examples exist; x is N×... (at least 2-D) with one label per example; x is finite
    and inside ``input_range`` (attacks clamp to it, so values outside would be silently
    changed); labels are integers in [0, num_outputs).
    """
    x, y = ds.x, ds.y
    if x.dim() == 0 or x.shape[0] == 0 or y.numel() == 0:
        raise DataError(f"{where}: the data set has no examples; check the file, split and limit.")
    _check_shapes(x, y, where)
    if not torch.is_floating_point(x):
        raise DataError(f"{where}: inputs x have dtype {x.dtype}; they must be floating point.")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad_rows = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
        raise DataError(
            f"{where}: inputs contain NaN or Inf in {len(bad_rows)} example(s) (indices "
            f"{_listing(bad_rows)}); clean or drop them."
        )
    if torch.is_floating_point(y) or torch.is_complex(y):
        _labels_to_int64(y, where)
    lo, hi = input_range
    found_lo, found_hi = float(x.min()), float(x.max())
    if found_lo < lo - _RANGE_SLACK or found_hi > hi + _RANGE_SLACK:
        raise DataError(
            f"{where}: inputs lie in [{found_lo:g}, {found_hi:g}] but data.input_range is "
            f"[{lo:g}, {hi:g}]. Attacks clip to input_range, so either scale the data into it "
            "(e.g. divide 0-255 pixels by 255) or set input_range to the data's real bounds; "
            "normalisation belongs in data.normalize, not in the stored data."
        )
    labels = y.to(torch.int64)
    bad = (labels < 0) | (labels >= num_outputs)
    if bool(bad.any()):
        values = torch.unique(labels[bad]).tolist()
        raise DataError(
            f"{where}: labels {_listing(values)} are outside 0..{num_outputs - 1}: the model has "
            f"{num_outputs} outputs (classes). Check that the data and the model's number of "
            "classes (model.kwargs) belong together."
        )


def _listing(values: list[Any]) -> str:
    """At most ``_MAX_LISTED`` values, then how many more, so a message stays one paragraph."""
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return f"[{shown}, … and {more} more]" if more > 0 else f"[{shown}]"
