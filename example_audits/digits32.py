"""A torchvision architecture next to the tiny digits CNN: ShuffleNet V2 (×0.5) on 32×32 images.

``python example_audits/digits32.py`` makes the data and trains the network deterministically
on the CPU (one thread, about two minutes), then writes, next to this file,
``shufflenet_digits32.safetensors`` (the weights of
``torchvision.models.shufflenet_v2_x0_5(num_classes=10)``, 1.4 MB) and
``digits32_test.pt`` (256 test images, a dict ``{"x", "y"}``). ``digits32.yaml`` audits them.

Nothing is downloaded: the images are scikit-learn's bundled 8×8 digits (the fixed split of
``source: sklearn_digits``) upsampled bilinearly to 32×32 and repeated on 3 channels, so the
inputs look like a small RGB data set (CIFAR-shaped) to a stock torchvision model.

Why ShuffleNet V2 ×0.5 and not ResNet-18: ResNet-18's weights are 45 MB in float32, too big
to commit; ShuffleNet's are 1.4 MB and it has the same shape of problem (57 convolution and
linear layers in five stages, batch norm, branches), so the spec shows how a big model's
layers are sampled.

The same script makes your own files for docs/tutorial.md: ``--epochs``, ``--checkpoint``,
``--test-data`` and ``--train-data`` choose how long to train and where to write.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# The same kernels on every x86-64 machine: AVX-512 kernels sum in another order than AVX2 ones,
# and two epochs of training grow that rounding into a different network (test accuracy 0.668
# instead of 0.793 after 2 epochs), so the numbers docs/tutorial.md shows would hold only on the
# CPU that made them. Set before torch is imported; an explicit setting in the environment wins.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "shufflenet_digits32.safetensors"
TEST_DATA = HERE / "digits32_test.pt"
SEED = 0
EPOCHS = 12
BATCH_SIZE = 64
LR = 3e-3
TEST_EXAMPLES = 256
MEAN, STD = [0.5], [0.5]
ARCHITECTURE = "shufflenet_v2_x0_5"


def digits32(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The sklearn digits ``split`` as N×3×32×32 floats in [0, 1] and int64 labels."""
    from inferlink_audit.data import load_dataset
    from inferlink_audit.spec import DataSourceSpec

    data = load_dataset(DataSourceSpec(source="sklearn_digits", split=split))  # type: ignore[arg-type]
    x = F.interpolate(data.x, size=(32, 32), mode="bilinear", align_corners=False)
    # Stored as float16 (half the bytes); training sees exactly the values the audit reads.
    x = x.clamp(0.0, 1.0).to(torch.float16).to(torch.float32)
    return x.repeat(1, 3, 1, 1).contiguous(), data.y


def save_tensors(path: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """A ``.pt`` dict ``{"x", "y"}`` as ``source: tensors`` reads it (loaded weights_only)."""
    torch.save({"x": x.to(torch.float16), "y": y}, path)


def train(epochs: int) -> nn.Module:
    """ShuffleNet V2 ×0.5 trained on the digits train split for ``epochs`` epochs."""
    import torchvision

    from inferlink_audit.devices import seed_everything
    from inferlink_audit.models import NormalizedModel

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    seed_everything(SEED)
    x, y = digits32("train")
    net = getattr(torchvision.models, ARCHITECTURE)(num_classes=10)
    model = NormalizedModel(net, MEAN, STD)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(SEED)
    for _epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            if len(batch) < 2:  # batch norm needs two examples
                continue
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return net.eval()


def main(argv: list[str] | None = None) -> float:
    """Make the data, train, print the test accuracy, write the checkpoint and the data."""
    from safetensors.torch import save

    from inferlink_audit.fileio import atomic_write_bytes
    from inferlink_audit.models import NormalizedModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--test-data", type=Path, default=TEST_DATA)
    parser.add_argument("--train-data", type=Path, default=None, help="also write the train split")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    net = train(args.epochs)
    x_test, y_test = digits32("test")
    x_test, y_test = x_test[:TEST_EXAMPLES], y_test[:TEST_EXAMPLES]
    with torch.no_grad():
        logits = NormalizedModel(net, MEAN, STD).eval()(x_test)
    accuracy = float((logits.argmax(1) == y_test).float().mean())
    metadata = {
        "trained_by": f"example_audits/digits32.py: torchvision {ARCHITECTURE}(num_classes=10), "
        f"seed {SEED}, {args.epochs} epochs, inputs normalised with mean {MEAN} std {STD}"
    }
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(args.checkpoint, save(state, metadata=metadata))
    save_tensors(args.test_data, x_test, y_test)
    if args.train_data is not None:
        save_tensors(args.train_data, *digits32("train"))
    print(
        f"{ARCHITECTURE}: test accuracy {accuracy:.4f} on {len(y_test)} examples after "
        f"{args.epochs} epochs; wrote {args.checkpoint} "
        f"({args.checkpoint.stat().st_size / 1e6:.1f} MB) and {args.test_data} in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return accuracy


if __name__ == "__main__":
    # Run as a script from a checkout without installing: make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
