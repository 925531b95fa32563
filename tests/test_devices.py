"""Device names resolve to real devices or fail with a message that says what to do."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from inferlink_audit import devices
from inferlink_audit.devices import (
    describe_device,
    deterministic_settings,
    resolve_device,
    seed_everything,
    synchronize,
    worker_device_name,
)
from inferlink_audit.errors import DeviceError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="only without CUDA")


def test_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("  CPU ") == torch.device("cpu")
    assert describe_device(torch.device("cpu")) == "cpu"


def test_auto_prefers_cuda_else_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu:0", "tpu", "", "cuda:-1"])
def test_bad_names_list_the_valid_ones(name: str) -> None:
    with pytest.raises(DeviceError, match=r"auto, cpu, cuda, cuda:N, xla, xla:N or mps"):
        resolve_device(name)


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_absent(name: str) -> None:
    with pytest.raises(DeviceError, match=r"CUDA is not available.*device: cpu"):
        resolve_device(name)


@needs_cuda
def test_cuda_present() -> None:
    device = resolve_device("cuda:0")
    assert device == torch.device("cuda", 0)
    assert describe_device(device).startswith("cuda:0 (")
    done = torch.cuda.Event()
    x = torch.randn(4096, 4096, device=device)
    for _ in range(8):  # queued asynchronously: the host returns before the GPU finishes
        x = x @ x / 64
    done.record()
    synchronize(device)
    assert done.query()


@needs_cuda
def test_cuda_index_out_of_range_names_the_devices_present() -> None:
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=rf"no CUDA device {count}.*has {count}: cuda:0 \("):
        resolve_device(f"cuda:{count}")


def test_xla_without_torch_xla_says_how_to_install() -> None:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch_xla is installed")
    with pytest.raises(DeviceError, match=r"torch_xla.*pip install torch_xla"):
        resolve_device("xla")
    with pytest.raises(DeviceError, match=r"torch_xla"):
        resolve_device("xla:1")


def test_mps_when_unavailable() -> None:
    if torch.backends.mps.is_available():
        assert resolve_device("mps").type == "mps"
    else:
        with pytest.raises(DeviceError, match=r"MPS backend is not available"):
            resolve_device("mps")


def test_synchronize_waits_on_cuda_and_mps_and_calls_nothing_on_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each backend's own wait is called with the device; the CPU has nothing to wait for.
    The backends are replaced by recorders, so this runs on any machine."""
    calls: list[tuple[str, tuple[object, ...]]] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(("cuda", a)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda *a: calls.append(("mps", a)))
    synchronize(torch.device("cpu"))
    assert calls == []
    synchronize(torch.device("cuda", 3))
    synchronize(torch.device("mps"))
    assert calls == [("cuda", (torch.device("cuda", 3),)), ("mps", ())]


def test_seed_everything_repeats_every_generator() -> None:
    def draw() -> tuple[float, float, torch.Tensor]:
        return random.random(), float(np.random.rand()), torch.rand(3)

    seed_everything(123)
    first = draw()
    seed_everything(123)
    second = draw()
    assert first[:2] == second[:2]
    assert torch.equal(first[2], second[2])


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    """deterministic_settings changes process-wide state; put it back for other tests."""
    state = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2], state[3]
    if state[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = state[4]


@pytest.mark.usefixtures("restore_determinism")
def test_deterministic_settings_cpu() -> None:
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    settings = deterministic_settings(torch.device("cpu"))
    assert settings == {
        "use_deterministic_algorithms": True,
        "warn_only": True,
        "cudnn.deterministic": True,
        "cudnn.benchmark": False,
    }
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_determinism_flags_and_operator_norms_do_not_load_the_torch_compiler() -> None:
    # A fresh interpreter: torch.use_deterministic_algorithms imports TorchInductor and
    # torch.func.vjp TorchDynamo (seconds each, the bulk of a small audit's start-up); the
    # flags must be set all the same.
    code = (
        "import sys, torch\n"
        "from inferlink_audit.devices import deterministic_settings\n"
        "from inferlink_audit.spectral import operator_norm\n"
        "deterministic_settings(torch.device('cpu'))\n"
        "conv = torch.nn.Conv2d(2, 3, 3, bias=False).double()\n"
        "operator_norm(conv, (1, 2, 6, 6), device=torch.device('cpu'), tolerance=1e-6)\n"
        "print(torch.are_deterministic_algorithms_enabled(),"
        " torch.is_deterministic_algorithms_warn_only_enabled(),"
        " 'torch._inductor' in sys.modules, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["True", "True", "False", "False"]


@pytest.mark.usefixtures("restore_determinism")
def test_deterministic_settings_cuda_sets_cublas_workspace() -> None:
    # Only the environment is touched for cuda, so this runs without a GPU too.
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    settings = deterministic_settings(torch.device("cuda", 0))
    assert settings["CUBLAS_WORKSPACE_CONFIG"] == os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


# --------------------------------------------------------------------------- parallel workers
@pytest.mark.parametrize(
    ("name", "worker", "count", "expected"),
    [
        ("auto", 0, 2, "cuda:0"),
        ("auto", 1, 2, "cuda:1"),
        ("cuda", 2, 2, "cuda:0"),
        ("CUDA", 3, 2, "cuda:1"),
        ("auto", 5, 1, "cuda:0"),
        ("auto", 1, 0, "auto"),  # no GPU: auto still means the CPU
        ("cuda:1", 0, 2, "cuda:1"),  # an explicit index is kept
        ("cpu", 1, 2, "cpu"),
        ("xla", 1, 2, "xla"),
        ("auto", None, 2, "auto"),  # not a worker: the usual meaning
    ],
)
def test_worker_i_uses_gpu_i_mod_count(
    name: str, worker: int | None, count: int, expected: str
) -> None:
    assert worker_device_name(name, worker, count) == expected


def test_the_gpu_count_comes_from_the_one_seam(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 3)
    assert [worker_device_name("auto", i) for i in range(5)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:0",
        "cuda:1",
    ]


@no_cuda
def test_a_worker_whose_gpu_is_missing_says_which_it_was_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 2)
    with pytest.raises(
        DeviceError,
        match=r"^device 'auto' on parallel worker 3 is cuda:1: device 'cuda:1': CUDA is not",
    ):
        resolve_device("auto", worker=3)


@needs_cuda
def test_a_worker_resolves_to_its_gpu() -> None:
    count = torch.cuda.device_count()
    assert resolve_device("auto", worker=count + 1) == torch.device("cuda", 1 % count)
    assert resolve_device("cpu", worker=1) == torch.device("cpu")
