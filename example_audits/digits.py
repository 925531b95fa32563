"""The bundled example: a small CNN for scikit-learn's 8×8 digits, and the script that trained it.

``python example_audits/digits.py`` retrains it deterministically on the CPU and rewrites
``digits_cnn.safetensors`` next to this file. The checkpoint holds the weights of the inner
:class:`DigitsCNN`; inputs in [0, 1] are normalised with mean 0.5 / std 0.5 by
:class:`inferlink_audit.models.NormalizedModel` in training exactly as in an audit, so the
spec says ``normalize: {mean: [0.5], std: [0.5]}``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

CHECKPOINT = Path(__file__).resolve().with_name("digits_cnn.safetensors")
SEED = 0
EPOCHS = 40
BATCH_SIZE = 32
LR = 5e-3
MEAN, STD = [0.5], [0.5]


class DigitsCNN(nn.Module):
    """conv(1→8) → ReLU → conv(8→16) → ReLU → maxpool 2 → fc(256→32) → ReLU → fc(32→classes).

    About 9.8k parameters: small enough to audit in seconds, deep enough (four filterable
    layers, two of each kind) for layer labels to differ.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def main() -> float:
    """Train on the fixed digits train split, print the test accuracy, write the checkpoint."""
    from safetensors.torch import save

    from inferlink_audit.data import load_dataset
    from inferlink_audit.devices import seed_everything
    from inferlink_audit.fileio import atomic_write_bytes
    from inferlink_audit.models import NormalizedModel
    from inferlink_audit.spec import DataSourceSpec

    started = time.perf_counter()
    # One thread and deterministic kernels: the same bytes on every rerun and machine.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    seed_everything(SEED)

    train = load_dataset(DataSourceSpec(source="sklearn_digits", split="train"))
    test = load_dataset(DataSourceSpec(source="sklearn_digits", split="test"))
    net = DigitsCNN(num_classes=10)
    model = NormalizedModel(net, MEAN, STD)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)

    for _epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(train.x[batch]), train.y[batch])
            loss.backward()
            optimizer.step()

    model.eval()
    with torch.no_grad():
        accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
    n_params = sum(p.numel() for p in net.parameters())
    # One metadata key only: safetensors writes several in hash order, so bytes would vary.
    metadata = {
        "trained_by": f"example_audits/digits.py: DigitsCNN(num_classes=10), seed {SEED}, "
        f"{EPOCHS} epochs, inputs normalised with mean {MEAN} std {STD}"
    }
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(CHECKPOINT, save(state, metadata=metadata))
    print(
        f"DigitsCNN: {n_params} parameters, test accuracy {accuracy:.4f} on {len(test)} "
        f"examples, wrote {CHECKPOINT.name} ({CHECKPOINT.stat().st_size} bytes) in "
        f"{time.perf_counter() - started:.1f} s"
    )
    return accuracy


if __name__ == "__main__":
    # Run as a script from a checkout without installing: make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
