"""Data loading: the fixed digits split, tensor files, torchvision folders, and validation."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from inferlink_audit.data import (
    DIGITS_N_TEST,
    DIGITS_N_TRAIN,
    Dataset,
    digits_split_indices,
    load_dataset,
    validate_dataset,
)
from inferlink_audit.errors import DataError
from inferlink_audit.spec import DataSourceSpec


def _digits(split: str = "test", limit: int | None = None) -> Dataset:
    return load_dataset(DataSourceSpec(source="sklearn_digits", split=split, limit=limit))


def _tensors(path: Path) -> Dataset:
    return load_dataset(DataSourceSpec(source="tensors", path=path))


def _seeded(n: int = 12, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 4, 4, generator=gen), torch.randint(0, classes, (n,), generator=gen)


# --------------------------------------------------------------------------- sklearn digits
def test_digits_split_sizes_dtypes_and_range() -> None:
    train, test = _digits("train"), _digits("test")
    assert (len(train), len(test)) == (DIGITS_N_TRAIN, DIGITS_N_TEST) == (1437, 360)
    for ds in (train, test):
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape[1:] == (1, 8, 8)
        assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert "360 examples of 1×8×8" in test.description


def test_digits_split_is_the_documented_one() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train_idx, test_idx = train_test_split(
        range(1797), test_size=0.2, random_state=0, stratify=target
    )
    assert digits_split_indices("test").tolist() == sorted(test_idx)
    assert digits_split_indices("train").tolist() == sorted(train_idx)
    assert not set(train_idx) & set(test_idx)
    test = _digits("test")
    images = load_digits().images[sorted(test_idx)] / 16.0
    assert np.array_equal(test.x.squeeze(1).numpy(), images.astype(np.float32))
    assert test.y.tolist() == target[sorted(test_idx)].tolist()


def test_digits_is_deterministic() -> None:
    a, b = _digits("test"), _digits("test")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_limit_takes_the_first_examples() -> None:
    full, first = _digits("train"), _digits("train", limit=50)
    assert len(first) == 50
    assert torch.equal(first.x, full.x[:50]) and torch.equal(first.y, full.y[:50])


def test_split_argument_overrides_the_spec() -> None:
    spec = DataSourceSpec(source="sklearn_digits", split="test")
    assert len(load_dataset(spec, split="train")) == DIGITS_N_TRAIN


# --------------------------------------------------------------------------- tensor files
def test_pt_dict(tmp_path: Path) -> None:
    x, y = _seeded()
    torch.save({"x": x, "y": y.to(torch.int32)}, tmp_path / "d.pt")
    ds = _tensors(tmp_path / "d.pt")
    assert torch.equal(ds.x, x) and torch.equal(ds.y, y) and ds.y.dtype == torch.int64
    limited = load_dataset(DataSourceSpec(source="tensors", path=tmp_path / "d.pt", limit=5))
    assert torch.equal(limited.x, x[:5])


def test_npz(tmp_path: Path) -> None:
    x, y = _seeded()
    np.savez(tmp_path / "d.npz", x=x.numpy().astype(np.float64), y=y.numpy())
    ds = _tensors(tmp_path / "d.npz")
    assert ds.x.dtype == torch.float32 and torch.allclose(ds.x, x)
    assert torch.equal(ds.y, y)


def test_npz_missing_array_names_what_it_has(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 3)), y=np.zeros(2))
    with pytest.raises(DataError, match=r"needs arrays named 'x'.*\['images', 'y'\]"):
        _tensors(tmp_path / "d.npz")


def test_npz_with_object_array_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(DataError, match=r"without unpickling"):
        _tensors(tmp_path / "d.npz")


class _Marker:
    """Any non-tensor object makes torch.save write a pickle that weights_only refuses."""


def test_pickled_pt_is_refused(tmp_path: Path) -> None:
    x, y = _seeded()
    torch.save({"x": x, "y": y, "extra": _Marker()}, tmp_path / "d.pt")
    with pytest.raises(DataError, match=r"pickled Python objects.*could run arbitrary code"):
        _tensors(tmp_path / "d.pt")


def test_pt_that_is_not_a_dict(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "d.pt")
    with pytest.raises(DataError, match=r"must hold a dict \{'x': Tensor, 'y': Tensor\}"):
        _tensors(tmp_path / "d.pt")


def test_truncated_and_missing_and_wrong_suffix(tmp_path: Path) -> None:
    x, y = _seeded()
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    data = (tmp_path / "d.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.pt: not a readable \.pt file"):
        _tensors(tmp_path / "t.pt")
    with pytest.raises(DataError, match=r"nope\.pt: data file not found"):
        _tensors(tmp_path / "nope.pt")
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(DataError, match=r"\.csv is neither"):
        _tensors(tmp_path / "d.csv")


def test_fractional_labels_are_refused_at_load(tmp_path: Path) -> None:
    x, _ = _seeded(4)
    torch.save({"x": x, "y": torch.tensor([0.0, 1.0, 1.5, 2.0])}, tmp_path / "d.pt")
    with pytest.raises(DataError, match=r"non-integer values \[1\.5\]"):
        _tensors(tmp_path / "d.pt")


def test_integral_float_labels_become_int64(tmp_path: Path) -> None:
    x, _ = _seeded(3)
    torch.save({"x": x, "y": torch.tensor([0.0, 2.0, 1.0])}, tmp_path / "d.pt")
    assert _tensors(tmp_path / "d.pt").y.tolist() == [0, 2, 1]


# --------------------------------------------------------------------------- torchvision
def test_torchvision_missing_files_never_download(tmp_path: Path) -> None:
    spec = DataSourceSpec(source="torchvision", name="CIFAR10", root=tmp_path)
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*download: true"):
        load_dataset(spec)
    assert list(tmp_path.iterdir()) == []
    spec = DataSourceSpec(source="torchvision", name="MNIST", root=tmp_path, split="train")
    with pytest.raises(DataError, match=r"MNIST \(train split\) not found.*MNIST/raw"):
        load_dataset(spec)


def _idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (the MNIST format): magic with the rank, big-endian sizes, bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_local_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    spec = DataSourceSpec(source="torchvision", name="MNIST", root=tmp_path, limit=4)
    ds = load_dataset(spec)
    assert ds.x.shape == (4, 1, 28, 28) and ds.x.dtype == torch.float32
    # Same scaling as transforms.ToTensor() on the PIL image.
    from PIL import Image
    from torchvision import transforms

    expected = transforms.ToTensor()(Image.fromarray(images[2], mode="L"))
    assert torch.equal(ds.x[2], expected)
    assert ds.y.tolist() == [3, 1, 4, 1]


def test_image_folder_prefers_split_subfolder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, cls in enumerate(("cat", "dog")):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2 + (split == "test")):
                pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{label}{i}.png")
    ds = load_dataset(DataSourceSpec(source="torchvision", name="ImageFolder", root=tmp_path))
    assert ds.x.shape == (6, 3, 6, 5) and ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
    train = load_dataset(
        DataSourceSpec(source="torchvision", name="ImageFolder", root=tmp_path), split="train"
    )
    assert len(train) == 4


def test_image_folder_with_mixed_sizes(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "1.png")
    Image.new("RGB", (5, 4)).save(tmp_path / "a" / "2.png")
    with pytest.raises(DataError, match=r"different sizes.*resize"):
        load_dataset(DataSourceSpec(source="torchvision", name="ImageFolder", root=tmp_path))


# --------------------------------------------------------------------------- validation
def _validate(x: torch.Tensor, y: torch.Tensor, num_outputs: int = 3) -> None:
    validate_dataset(
        Dataset(x=x, y=y, description=""),
        num_outputs=num_outputs,
        input_range=(0.0, 1.0),
        where="data.pt",
    )


def test_valid_data_passes() -> None:
    _validate(*_seeded())
    validate_dataset(_digits(), num_outputs=10, input_range=(0.0, 1.0), where="digits")


def test_labels_out_of_range_name_values_and_width() -> None:
    x, _ = _seeded(4)
    with pytest.raises(DataError, match=r"data\.pt: labels \[-1, 3, 7\].*3 outputs"):
        _validate(x, torch.tensor([0, -1, 3, 7]))


def test_nan_in_inputs_names_examples() -> None:
    x, y = _seeded(4)
    x[2, 0, 1, 1] = float("nan")
    x[3, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match=r"NaN or Inf in 2 example\(s\) \(indices \[2, 3\]\)"):
        _validate(x, y)


def test_inputs_outside_range_name_min_and_max() -> None:
    x, y = _seeded(4)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = -0.5, 255.0
    with pytest.raises(
        DataError, match=r"inputs lie in \[-0\.5, 255\] but data\.input_range is \[0, 1\]"
    ):
        _validate(x, y)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64), "no examples"),
        (torch.zeros(3), torch.zeros(3, dtype=torch.int64), r"shape \(3,\); they must be N×"),
        (torch.zeros(3, 2), torch.zeros(3, 3, dtype=torch.int64), r"1-D class indices"),
        (torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64), r"3 inputs but 2 labels"),
        (torch.zeros(2, 2), torch.tensor([0.0, 0.5]), r"non-integer values \[0\.5\]"),
        (torch.zeros(2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), "floating"),
    ],
)
def test_shape_and_type_errors(x: torch.Tensor, y: torch.Tensor, message: str) -> None:
    with pytest.raises(DataError, match=message):
        _validate(x, y)


def test_data_pickle_helper_is_really_a_pickle(tmp_path: Path) -> None:
    # Guard for test_pickled_pt_is_refused: the file must need the full unpickler.
    torch.save({"m": _Marker()}, tmp_path / "m.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "m.pt", weights_only=True)
