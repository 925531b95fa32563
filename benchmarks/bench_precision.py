"""Per-step cost of the FGSM 3-pass step in each arithmetic the engine could use.

One process, one ResNet-18 (CIFAR-shaped, 32x32, seeded random weights), one batch of 128
images: the step the exact engine repeats for every variant (forward with the input's
gradient, input-only backward, adversarial forward). It times fp32 (the baseline), bf16
autocast, bf16 autocast with channels_last inputs, the same with a channels_last model, and
``torch.compile`` (inductor) in fp32 and bf16 including its compile time, then prints each
mode's ratio to fp32 measured in this process, interleaved over several rounds so that other
load on a shared machine hits every mode alike. Compilation is cold: the inductor cache is a
fresh temporary folder unless TORCHINDUCTOR_CACHE_DIR is set. Run with OMP_NUM_THREADS=2 on an
idle machine:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_precision.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

# A cold compile, and no half-written kernel of another process (set before torch loads).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sweep import cifar_resnet18

EPS = 8 / 255


def three_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The exact engine's per-variant step: clean forward with the input's gradient, the
    input-only backward, the adversarial forward."""
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with cast:
        leaf = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(leaf), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, leaf)
        with torch.inference_mode():
            return model((x + EPS * grad.sign()).clamp_(0, 1)).argmax(1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile modes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = cifar_resnet18()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(args.images, 3, 32, 32)
    y = torch.randint(0, 10, (args.images,))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model_cl = cifar_resnet18().to(memory_format=torch.channels_last)
    model_cl.load_state_dict(model.state_dict())
    for p in model_cl.parameters():
        p.requires_grad_(False)
    modes: dict[str, Callable[[], Any]] = {
        "fp32": lambda: three_pass(model, x, y, False),
        "bf16 autocast": lambda: three_pass(model, x, y, True),
        "bf16 + channels_last input": lambda: three_pass(model, x_cl, y, True),
        "bf16 + channels_last model+input": lambda: three_pass(model_cl, x_cl, y, True),
    }
    compile_seconds: dict[str, float] = {}
    if not args.no_compile:
        for name, bf16, inputs in (
            ("compiled fp32", False, x),
            ("compiled bf16 + channels_last", True, x_cl),
        ):
            compiled = torch.compile(model, backend="inductor")
            t0 = time.perf_counter()
            three_pass(compiled, inputs, y, bf16)  # compiles forward and backward
            three_pass(compiled, inputs, y, bf16)
            compile_seconds[name] = time.perf_counter() - t0
            modes[name] = lambda c=compiled, i=inputs, b=bf16: three_pass(c, i, y, b)
    for fn in modes.values():
        fn()  # warm-up (allocators, oneDNN primitive caches)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["fp32"])
    print(f"threads {torch.get_num_threads()}, {args.images} images 32x32, ResNet-18, FGSM 3-pass")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:36s} {med:7.3f} s/step  (min {min(values):.3f})  {base / med:5.2f}x fp32")
    for name, seconds in compile_seconds.items():
        saved = base - statistics.median(times[name])
        ref = "fp32"
        if "bf16" in name:
            eager = statistics.median(times["bf16 + channels_last input"])
            saved = eager - statistics.median(times[name])
            ref = "eager bf16 + channels_last input"
        steps = f"{seconds / saved:.0f} steps" if saved > 0 else "never (not faster)"
        print(f"{name}: first two steps {seconds:.1f} s; break-even vs {ref}: {steps}")


if __name__ == "__main__":
    main()
