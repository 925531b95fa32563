"""Fixtures shared across the test suite: where the bundled example lives, and tiny models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def digits_spec_dir() -> Path:
    """``example_audits/``: the bundled digits CNN, its checkpoint and specs."""
    return REPO_ROOT / "example_audits"


@pytest.fixture(scope="session")
def digits_checkpoint(digits_spec_dir: Path) -> Path:
    """The bundled, trained ``DigitsCNN`` weights (safetensors)."""
    return digits_spec_dir / "digits_cnn.safetensors"


@pytest.fixture
def make_tiny_mlp() -> Callable[..., nn.Module]:
    """Build a seeded MLP for N×1×8×8 inputs: same seed, same weights, in eval mode."""

    def make(seed: int = 0, hidden: int = 16, num_classes: int = 10) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        ).eval()

    return make
