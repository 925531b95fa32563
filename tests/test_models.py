"""Model loading: every factory form, safe checkpoint formats, and the errors users will meet."""

from __future__ import annotations

import os
import pickle
import shlex
import sys
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from example_audits.digits import DigitsCNN
from inferlink_audit.data import load_dataset
from inferlink_audit.errors import DataError, ModelLoadError, UnsafeFileError
from inferlink_audit.fileio import sha256_file
from inferlink_audit.models import LoadedModel, NormalizedModel, load_model
from inferlink_audit.spec import DataSpec, ModelSpec

DIGITS_FACTORY = "example_audits.digits:DigitsCNN"
DIGITS_DATA = DataSpec(source="sklearn_digits")


def _load(
    factory: str = DIGITS_FACTORY,
    *,
    spec_dir: Path,
    checkpoint: Path | None = None,
    kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    data: DataSpec = DIGITS_DATA,
    example_input: torch.Tensor | None = None,
) -> LoadedModel:
    spec = ModelSpec(
        factory=factory, kwargs=kwargs or {}, checkpoint=checkpoint, trust_pickle=trust_pickle
    )
    return load_model(spec, data, spec_dir=spec_dir, example_input=example_input)


def _digits_state(seed: int = 1, num_classes: int = 10) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return DigitsCNN(num_classes=num_classes).state_dict()


def _same_weights(module: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    got = module.state_dict()
    return got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


# --------------------------------------------------------------------------- NormalizedModel
def test_normalized_model_per_channel_math() -> None:
    torch.manual_seed(0)
    wrapper = NormalizedModel(nn.Identity(), mean=[0.5, 0.25], std=[0.5, 2.0])
    x = torch.rand(3, 2, 4, 5)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 2.0], dim=1)
    assert torch.allclose(wrapper(x), expected)
    features = torch.rand(3, 2)  # N×C without spatial dimensions broadcasts too
    assert torch.allclose(
        wrapper(features), (features - torch.tensor([0.5, 0.25])) / torch.tensor([0.5, 2.0])
    )


def test_normalized_model_single_value_and_none() -> None:
    x = torch.rand(2, 3, 2, 2)
    assert torch.allclose(NormalizedModel(nn.Identity(), [0.5], [0.5])(x), 2 * x - 1)
    assert torch.equal(NormalizedModel(nn.Identity())(x), x)


def test_normalized_model_state_dict_is_the_inner_models() -> None:
    inner = nn.Linear(3, 2)
    wrapper = NormalizedModel(inner, [0.1, 0.2, 0.3], [1.0, 1.0, 1.0])
    assert list(wrapper.state_dict()) == ["model.weight", "model.bias"]
    with pytest.raises(ValueError, match=r"3 channel\(s\) but the input has shape \(1, 2\)"):
        wrapper(torch.zeros(1, 2))


# --------------------------------------------------------------------------- factories
def test_import_factory_with_kwargs(tmp_path: Path) -> None:
    loaded = _load(
        "torch.nn:Linear",
        spec_dir=tmp_path,
        kwargs={"in_features": 4, "out_features": 3},
        example_input=torch.zeros(5, 4),
    )
    assert isinstance(loaded.inner, nn.Linear) and loaded.num_outputs == 3
    assert loaded.checkpoint_sha256 == ""
    assert "initial weights" in loaded.description


def test_import_factory_from_spec_dir_restores_sys_path(tmp_path: Path) -> None:
    name = f"tiny_models_{uuid.uuid4().hex[:8]}"  # unique: sys.modules caches by name
    (tmp_path / f"{name}.py").write_text(
        "from torch import nn\n\n"
        "def make(classes=4):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, classes))\n"
    )
    before = list(sys.path)
    loaded = _load(f"{name}:make", spec_dir=tmp_path, kwargs={"classes": 7})
    assert sys.path == before
    assert loaded.num_outputs == 7


def test_import_factory_walks_up_to_the_package(digits_spec_dir: Path) -> None:
    # A spec inside example_audits/ naming example_audits.digits finds the package above it.
    before = list(sys.path)
    loaded = _load(DIGITS_FACTORY, spec_dir=digits_spec_dir)
    assert type(loaded.inner).__name__ == "DigitsCNN" and loaded.num_outputs == 10
    assert sys.path == before


def test_unknown_module_and_name(tmp_path: Path) -> None:
    with pytest.raises(
        ModelLoadError, match=r"cannot import module 'no_such_pkg_xyz\.models'.*file\.py:Name"
    ):
        _load("no_such_pkg_xyz.models:Net", spec_dir=tmp_path)
    with pytest.raises(ModelLoadError, match=r"has no 'DigitCNN'\. Did you mean DigitsCNN\?"):
        _load("example_audits.digits:DigitCNN", spec_dir=tmp_path)


def test_file_factory_next_to_spec(tmp_path: Path) -> None:
    for i, classes in enumerate((3, 5)):
        folder = tmp_path / f"spec{i}"
        folder.mkdir()
        (folder / "helpers.py").write_text(f"HIDDEN = {8 + i}\n")
        # Two files with the same name must not shadow each other; a sibling import works.
        (folder / "models.py").write_text(
            "from torch import nn\nfrom helpers import HIDDEN\n\n"
            "class Net(nn.Module):\n"
            "    def __init__(self, num_classes=2):\n"
            "        super().__init__()\n"
            "        self.fc1 = nn.Linear(64, HIDDEN)\n"
            "        self.fc2 = nn.Linear(HIDDEN, num_classes)\n\n"
            "    def forward(self, x):\n"
            "        return self.fc2(self.fc1(x.flatten(1)).relu())\n"
        )
        sys.modules.pop("helpers", None)
        loaded = _load("models.py:Net", spec_dir=folder, kwargs={"num_classes": classes})
        assert loaded.num_outputs == classes
        assert loaded.inner.fc1.out_features == 8 + i  # type: ignore[union-attr]
    sys.modules.pop("helpers", None)


def test_file_factory_edited_in_the_same_process_runs_its_new_code(tmp_path: Path) -> None:
    # The sweep cache keys on the factory's source: the code that runs must be that source too.
    net = tmp_path / "net.py"
    for classes in (3, 4):
        net.write_text(
            "from torch import nn\n\n"
            "class Net(nn.Sequential):\n"
            "    def __init__(self):\n"
            f"        super().__init__(nn.Flatten(), nn.Linear(64, {classes}))\n"
        )
        assert _load("net.py:Net", spec_dir=tmp_path).num_outputs == classes


def test_file_factory_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"models\.py not found.*relative to the spec"):
        _load("models.py:Net", spec_dir=tmp_path)


def test_factory_kwargs_type_error_names_factory_and_kwargs(tmp_path: Path) -> None:
    with pytest.raises(
        ModelLoadError,
        match=r"'example_audits\.digits:DigitsCNN' cannot be called with model\.kwargs "
        r"\{'num_class': 10\}",
    ):
        _load(spec_dir=tmp_path, kwargs={"num_class": 10})


def test_factory_must_return_a_module(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("def make():\n    return 42\n")
    with pytest.raises(ModelLoadError, match=r"returned a int, not a torch\.nn\.Module"):
        _load("bad.py:make", spec_dir=tmp_path)


def test_factory_raising_says_where(tmp_path: Path) -> None:
    (tmp_path / "boom.py").write_text("def make():\n    raise ValueError('bad config')\n")
    with pytest.raises(ModelLoadError, match=r"raised ValueError.*bad config \(at .*boom\.py:2\)"):
        _load("boom.py:make", spec_dir=tmp_path)


def test_torchvision_resnet18_without_download(tmp_path: Path) -> None:
    loaded = _load(
        "torchvision: resnet18",
        spec_dir=tmp_path,
        kwargs={"num_classes": 10},
        data=DataSpec(source="torchvision", name="CIFAR10", root=tmp_path),
    )
    assert type(loaded.inner).__name__ == "ResNet" and loaded.num_outputs == 10
    assert not loaded.module.training


@pytest.mark.parametrize("kwargs", [{"weights": "IMAGENET1K_V1"}, {"pretrained": True}])
def test_torchvision_refuses_pretrained_weights(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ModelLoadError, match=r"would download pretrained weights.*checkpoint"):
        _load("torchvision: resnet18", spec_dir=tmp_path, kwargs=kwargs)


def test_torchvision_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no model 'resnet19'\. Did you mean resnet18"):
        _load("torchvision: resnet19", spec_dir=tmp_path)


def _scripted(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        torch.jit.save(torch.jit.script(net), str(tmp_path / "model.pt"))
    return tmp_path / "model.pt"


def test_torchscript_refused_without_trust(tmp_path: Path) -> None:
    _scripted(tmp_path)
    with pytest.raises(
        UnsafeFileError, match=r"can run arbitrary code.*`model\.trust_pickle: true`"
    ):
        _load("torchscript: model.pt", spec_dir=tmp_path)


def test_torchscript_loaded_with_trust(tmp_path: Path) -> None:
    _scripted(tmp_path)
    with pytest.warns(UserWarning, match=r"trust_pickle is true.*arbitrary code"):
        loaded = _load("torchscript: model.pt", spec_dir=tmp_path, trust_pickle=True)
    assert loaded.num_outputs == 10 and not loaded.module.training


def test_torchscript_archive_as_checkpoint_is_refused(tmp_path: Path) -> None:
    path = _scripted(tmp_path)
    with pytest.raises(UnsafeFileError, match=r"TorchScript archive.*NOT loaded"):
        _load(spec_dir=tmp_path, checkpoint=path)


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".ckpt", ".bin"])
def test_checkpoint_formats_load_exact_weights(tmp_path: Path, suffix: str) -> None:
    state = _digits_state()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    digest = sha256_file(path)
    loaded = _load(spec_dir=tmp_path, checkpoint=path)
    assert _same_weights(loaded.inner, state)
    assert loaded.checkpoint_sha256 == digest == sha256_file(path)  # never written to
    assert f"weights from w{suffix} (sha256 {digest[:12]})" in loaded.description
    assert not loaded.module.training and not loaded.inner.training
    assert all(p.device.type == "cpu" for p in loaded.module.parameters())


@pytest.mark.parametrize("prefix", ["model.", "module.", "model.module."])
def test_lightning_state_dict_and_wrapper_prefixes(tmp_path: Path, prefix: str) -> None:
    state = _digits_state()
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "state_dict": {prefix + k: v for k, v in state.items()},
        "hyper_parameters": {"lr": 0.001},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    loaded = _load(spec_dir=tmp_path, checkpoint=tmp_path / "last.ckpt")
    assert _same_weights(loaded.inner, state)


def test_checkpoint_of_another_architecture_lists_keys(
    tmp_path: Path, make_tiny_mlp: Callable[..., nn.Module]
) -> None:
    state = _digits_state(num_classes=5)
    state.pop("conv1.bias")
    state.update({f"extra{i}.weight": torch.zeros(1) for i in range(12)})
    save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError) as info:
        _load(spec_dir=tmp_path, checkpoint=tmp_path / "other.safetensors")
    message = str(info.value)
    assert "missing: conv1.bias" in message
    assert "unexpected: extra0.weight" in message and "… and 4 more" in message
    assert "shape mismatch: fc2.weight checkpoint (5, 32) vs model (10, 32)" in message
    assert "another architecture or other model.kwargs" in message
    assert "\n" not in message

    save_file(make_tiny_mlp().state_dict(), tmp_path / "mlp.safetensors")
    with pytest.raises(
        ModelLoadError, match=r"missing: conv1\.weight.*unexpected: 1\.bias, 1\.weight"
    ):
        _load(spec_dir=tmp_path, checkpoint=tmp_path / "mlp.safetensors")


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.target))}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, writer: str) -> None:
    pwned = tmp_path / "pwned"
    payload = {"state_dict": _digits_state(), "callback": _RunsCode(pwned)}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as handle:
            pickle.dump(payload, handle)
    digest = sha256_file(path)
    with pytest.raises(UnsafeFileError) as info:
        _load(spec_dir=tmp_path, checkpoint=path)
    message = str(info.value)
    assert "evil.pt is a pickle" in message and "could run arbitrary code" in message
    assert "torch.save(model.state_dict()" in message and "`model.trust_pickle: true`" in message
    if writer == "torch.save":
        assert "posix.system" in message or "nt.system" in message  # names what it would call
    assert not pwned.exists()
    assert sha256_file(path) == digest


def test_trusted_pickle_of_a_whole_model_loads_with_a_warning(tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = DigitsCNN()
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(UnsafeFileError):
        _load(spec_dir=tmp_path, checkpoint=tmp_path / "whole.pt")
    with pytest.warns(UserWarning, match=r"INFERLINK-AUDIT.*trust_pickle is true"):
        loaded = _load(spec_dir=tmp_path, checkpoint=tmp_path / "whole.pt", trust_pickle=True)
    assert _same_weights(loaded.inner, net.state_dict())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_checkpoint_names_the_file(tmp_path: Path, suffix: str) -> None:
    good = tmp_path / f"good{suffix}"
    if suffix == ".pt":
        torch.save(_digits_state(), good)
    else:
        save_file(_digits_state(), good)
    data = good.read_bytes()
    bad = tmp_path / f"cut{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=rf"cut\{suffix}: not a readable .*truncated"):
        _load(spec_dir=tmp_path, checkpoint=bad)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(ModelLoadError, match=r"notes\.pt: not a readable PyTorch checkpoint"):
        _load(spec_dir=tmp_path, checkpoint=tmp_path / "notes.pt")
    (tmp_path / "w.h5").write_bytes(b"\x89HDF")
    with pytest.raises(ModelLoadError, match=r"unknown checkpoint format \.h5"):
        _load(spec_dir=tmp_path, checkpoint=tmp_path / "w.h5")
    with pytest.raises(ModelLoadError, match=r"missing\.pt: checkpoint not found"):
        _load(spec_dir=tmp_path, checkpoint=tmp_path / "missing.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ModelLoadError, match=r"holds a list, not a state dict"):
        _load(spec_dir=tmp_path, checkpoint=tmp_path / "list.pt")


def test_nan_and_non_tensor_values_name_the_keys(tmp_path: Path) -> None:
    state = _digits_state()
    state["fc1.weight"][0, 0] = float("nan")
    state["conv2.bias"][1] = float("inf")
    save_file(state, tmp_path / "nan.safetensors")
    with pytest.raises(
        ModelLoadError, match=r"tensors conv2\.bias, fc1\.weight contain NaN or Inf"
    ):
        _load(spec_dir=tmp_path, checkpoint=tmp_path / "nan.safetensors")
    torch.save({**_digits_state(), "note": "v2", "step": 7}, tmp_path / "mixed.pt")
    with pytest.raises(ModelLoadError, match=r"entries note, step are not tensors"):
        _load(spec_dir=tmp_path, checkpoint=tmp_path / "mixed.pt")


def test_relative_checkpoint_resolves_against_spec_dir(tmp_path: Path) -> None:
    save_file(_digits_state(), tmp_path / "w.safetensors")
    loaded = _load(spec_dir=tmp_path, checkpoint=Path("w.safetensors"))
    assert loaded.checkpoint_sha256 == sha256_file(tmp_path / "w.safetensors")


# --------------------------------------------------------------------------- probing
def test_forward_failure_names_the_input_shape(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"forward pass on an input of shape \(1, 3, 32, 32\)"):
        _load(spec_dir=tmp_path, example_input=torch.zeros(4, 3, 32, 32))


def test_model_must_return_logits(tmp_path: Path) -> None:
    (tmp_path / "tuple_out.py").write_text(
        "from torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x.flatten(1), x\n"
    )
    with pytest.raises(ModelLoadError, match=r"returned tuple; .*logits of shape N×classes"):
        _load("tuple_out.py:Net", spec_dir=tmp_path)


def test_normalisation_channels_must_match_inputs(tmp_path: Path) -> None:
    data = DataSpec(source="sklearn_digits", normalize={"mean": [0.5] * 3, "std": [0.5] * 3})
    with pytest.raises(DataError, match=r"data\.normalize gives 3 channel values.*\(1, 8, 8\)"):
        _load(spec_dir=tmp_path, data=data)


def test_example_input_sets_the_output_width(tmp_path: Path) -> None:
    loaded = _load(
        spec_dir=tmp_path, kwargs={"num_classes": 4}, example_input=torch.rand(9, 1, 8, 8)
    )
    assert loaded.num_outputs == 4


# --------------------------------------------------------------------------- bundled example
def test_bundled_digits_checkpoint_scores_at_least_95(
    digits_spec_dir: Path, digits_checkpoint: Path
) -> None:
    data = DataSpec(source="sklearn_digits", split="test", normalize={"mean": [0.5], "std": [0.5]})
    digest = sha256_file(digits_checkpoint)
    assert digits_checkpoint.stat().st_size < 200_000
    test = load_dataset(data)
    loaded = _load(
        spec_dir=digits_spec_dir,
        checkpoint=Path("digits_cnn.safetensors"),
        kwargs={"num_classes": 10},
        data=data,
        example_input=test.x,
    )
    with torch.no_grad():
        accuracy = float((loaded.module(test.x).argmax(1) == test.y).float().mean())
    assert accuracy >= 0.95
    assert sum(p.numel() for p in loaded.inner.parameters()) < 15_000
    assert loaded.checkpoint_sha256 == digest == sha256_file(digits_checkpoint)
