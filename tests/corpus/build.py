"""Write the corpus's binary inputs (checkpoints, data files) into a folder.

They are generated rather than committed: small, reproducible, and reviewable as code. Files
whose loading would run code create ``PWNED`` in the folder when (and only when) unpickled,
so a test can prove that nothing was executed.
"""

from __future__ import annotations

import os
import pickle
import random
import shlex
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parent
SPECS = ROOT / "specs"
FACTORIES = ROOT / "factories"
EXAMPLES = ROOT.parents[1] / "example_audits"
MARKER = "PWNED"


class RunsCode:
    """Unpickling this runs a shell command that creates a marker file: a hostile payload."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.target))}",))


def _digits_state() -> dict[str, torch.Tensor]:
    return load_file(EXAMPLES / "digits_cnn.safetensors")


def _digits_model(num_classes: int) -> nn.Module:
    from example_audits.digits import DigitsCNN

    torch.manual_seed(0)
    return DigitsCNN(num_classes=num_classes)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _images(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=generator)


def build_inputs(folder: Path) -> None:
    """Every binary input the corpus specs name, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = RunsCode(folder / MARKER)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8) % 10
    good = (EXAMPLES / "digits_cnn.safetensors").read_bytes()

    # ---- checkpoints
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (folder / "random_bytes.pt").write_bytes(random.Random(0).randbytes(4096))
    (folder / "notes.safetensors").write_text("these are my notes, not weights\n")
    (folder / "weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(56))
    (folder / "weights_folder.safetensors").mkdir(exist_ok=True)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    save_file(mlp.state_dict(), folder / "mlp_weights.safetensors")
    save_file(_digits_model(5).state_dict(), folder / "digits_5_classes.safetensors")
    state = _digits_state()
    state["fc1.weight"][0, 0] = float("nan")
    save_file(state, folder / "nan_weights.safetensors")
    state = _digits_state()
    state["conv2.bias"][1] = float("inf")
    torch.save(state, folder / "inf_weights.pt")
    torch.save({"state_dict": _digits_state(), "callback": payload}, folder / "evil.pt")
    with (folder / "evil_legacy.pth").open("wb") as handle:
        pickle.dump({"state_dict": _digits_state(), "callback": payload}, handle)
    state = _digits_state()
    state["fc1.weight"] = state["fc1.weight"].to(torch.complex64)
    torch.save(state, folder / "complex_weights.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_Tiny()).save(str(folder / "scripted.pt"))
    (folder / "baseline_list.json").write_text("[1, 2, 3]\n")

    # ---- data
    torch.save(
        {"x": torch.rand(8, 1, 28, 28, generator=g), "y": labels}, folder / "images_28x28.pt"
    )
    np.savez(
        folder / "flat.npz",
        x=np.random.default_rng(0).random((8, 64), dtype=np.float32),
        y=labels.numpy(),
    )
    x = _images(8, g)
    x[3, 0, 2, 2] = float("nan")
    x[7, 0, 0, 0] = float("inf")
    torch.save({"x": x, "y": labels}, folder / "nan.pt")
    y = labels.clone()
    y[2], y[5] = 10, 12
    torch.save({"x": _images(8, g), "y": y}, folder / "labels_10.pt")
    torch.save(
        {"x": torch.empty(0, 1, 8, 8), "y": torch.empty(0, dtype=torch.int64)}, folder / "empty.pt"
    )
    torch.save({"x": _images(8, g), "y": labels[:6]}, folder / "mismatch.pt")
    torch.save({"x": _images(8, g), "y": labels, "meta": payload}, folder / "pickled.pt")
    np.savez(folder / "objects.npz", x=np.array([payload] * 8, dtype=object), y=labels.numpy())
    torch.save({"x": torch.tensor(1.0), "y": torch.tensor(1)}, folder / "scalar.pt")
    torch.save({"x": _images(8, g).to(torch.complex64), "y": labels}, folder / "complex.pt")
    (folder / "random.npz").write_bytes(random.Random(1).randbytes(2048))
    torch.save({"x": _images(8, g), "y": nn.functional.one_hot(labels, 10)}, folder / "one_hot.pt")
    np.savez(folder / "soft.npz", x=_images(8, g).numpy(), y=np.array([0, 1, 0.5, 2, 3, 4, 5, 6]))
    pixels = np.random.default_rng(1).integers(0, 256, size=(8, 1, 8, 8), dtype=np.uint8)
    pixels[0, 0, 0, :2] = (0, 255)
    np.savez(folder / "pixels_255.npz", x=pixels, y=labels.numpy())
    (folder / "data.csv").write_text("x,y\n0.5,1\n")
    (folder / "zero_bytes.npz").write_bytes(b"")
    torch.save({"x": _images(8, g).to_sparse(), "y": labels}, folder / "sparse.pt")


def stage_case(spec: Path, folder: Path, inputs: Path) -> Path:
    """A folder holding one bad spec beside the digits model, the factory files and the
    built inputs, as a user's audit folder would; returns the spec's path there."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in (*EXAMPLES.glob("digits*"), *FACTORIES.iterdir()):
        if source.suffix in (".py", ".safetensors", ".txt"):
            shutil.copy(source, folder / source.name.removesuffix(".txt"))
    for item in inputs.iterdir():
        if item.is_dir():
            shutil.copytree(item, folder / item.name)
        else:
            shutil.copy(item, folder / item.name)
    target = folder / spec.name
    shutil.copy(spec, target)
    return target
