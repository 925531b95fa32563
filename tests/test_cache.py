"""DiskSweepCache: entries round-trip exactly, a damaged entry is never trusted, and a sweep
is recomputed whenever anything it was computed from changes (checkpoint, spec, data, code)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from inferlink_audit.audit import AuditSession
from inferlink_audit.cache import CACHE_FORMAT, DiskSweepCache, tensors_sha256
from inferlink_audit.results import Labels, Scores, SweepResult
from inferlink_audit.spec_loader import load_spec

KEY = "ab" * 32  # what AuditSession.cache_key returns: a SHA-256 hex digest


def make_sweeps(*, nan: bool = False) -> list[SweepResult]:
    local = SweepResult(
        scope="local",
        layer="conv1",
        filter="low_pass",
        attack="fgsm_eps0.1",
        numel=144,
        thresholds=[0.5, 0.1, -0.3],
        removed_fraction=[0.0, 1 / 3, 1.0],
        clean_accuracy=[0.97, 0.9, 0.1],
        adversarial_accuracy=[0.31, 0.4, 0.1],
        scores=Scores(-0.1234567890123, math.nan if nan else 0.25, 0.1 + 0.2),
        labels=Labels("fragile", "antifragile"),
        targeted=True,
        antifragile_area=Scores(0.0, 0.3, 0.0),
        evaluated_variants=3,
    )
    global_ = SweepResult(
        scope="global",
        layer=None,
        filter="low_pass",
        attack="fgsm_eps0.1",
        numel=1000,
        thresholds=[1.0, 0.0, -1.0],
        removed_fraction=[0.0, 0.5, 1.0],
        clean_accuracy=[0.97, 0.5, 0.1],
        adversarial_accuracy=[0.31, 0.2, 0.1],
        scores=Scores(0.0, 0.0, 0.0),
        labels=Labels("robust", "robust"),
        targeted=False,
        layers=["conv1", "fc"],
    )
    return [local, global_]


def test_an_entry_round_trips_exactly(tmp_path: Path) -> None:
    cache = DiskSweepCache(tmp_path)
    assert cache.get(KEY) is None
    cache.put(KEY, make_sweeps())
    assert cache.get(KEY) == make_sweeps()
    assert (cache.hits, cache.misses, cache.discarded) == (1, 1, 0)
    assert [p.name for p in tmp_path.iterdir()] == [f"{KEY}.json"]  # no temporary file left
    assert json.loads((tmp_path / f"{KEY}.json").read_text())["format"] == CACHE_FORMAT


def test_an_undefined_score_survives_the_round_trip(tmp_path: Path) -> None:
    cache = DiskSweepCache(tmp_path)
    cache.put(KEY, make_sweeps(nan=True))
    (local, _) = cache.get(KEY) or []
    assert math.isnan(local.scores.adversarial)


def _corrupt_payload(text: str) -> str:
    entry = json.loads(text)
    entry["payload"] = entry["payload"].replace('"numel":144', '"numel":145')
    return json.dumps(entry)


def _wrong_key(text: str) -> str:
    entry = json.loads(text)
    entry["key"] = "cd" * 32
    return json.dumps(entry)


def _wrong_format(text: str) -> str:
    entry = json.loads(text)
    entry["format"] = "inferlink-audit/sweep-cache/v0"
    return json.dumps(entry)


def _checksum_of_other_payload(text: str) -> str:
    entry = json.loads(text)
    entry["payload"] = "[]"  # a well-formed payload whose checksum was not recorded
    return json.dumps(entry)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda text: text[: len(text) // 2], id="truncated"),
        pytest.param(lambda text: "", id="empty"),
        pytest.param(lambda text: "[1, 2, 3]", id="not-an-entry"),
        pytest.param(_corrupt_payload, id="payload-changed"),
        pytest.param(_checksum_of_other_payload, id="checksum-mismatch"),
        pytest.param(_wrong_key, id="other-key"),
        pytest.param(_wrong_format, id="other-format"),
    ],
)
def test_a_damaged_entry_is_deleted_and_reported_as_a_miss(
    tmp_path: Path, damage: Callable[[str], str]
) -> None:
    cache = DiskSweepCache(tmp_path)
    cache.put(KEY, make_sweeps())
    path = cache.path_for(KEY)
    path.write_text(damage(path.read_text()))
    assert cache.get(KEY) is None
    assert (cache.hits, cache.misses, cache.discarded) == (0, 1, 1)
    assert not path.exists()
    cache.put(KEY, make_sweeps())  # what the session does next: recompute and store
    assert cache.get(KEY) == make_sweeps()


def test_bytes_that_are_not_text_are_a_miss(tmp_path: Path) -> None:
    cache = DiskSweepCache(tmp_path)
    cache.path_for(KEY).write_bytes(b"\xff\xfe\x00garbage")
    assert cache.get(KEY) is None
    assert cache.discarded == 1
    assert not cache.path_for(KEY).exists()


def test_keys_never_leave_the_folder(tmp_path: Path) -> None:
    cache = DiskSweepCache(tmp_path / "cache")
    path = cache.path_for("../../etc/passwd")
    assert path.parent == tmp_path / "cache"
    cache.put("../../etc/passwd", make_sweeps())
    assert cache.get("../../etc/passwd") == make_sweeps()


def test_an_unwritable_folder_costs_a_recomputation_not_the_audit(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    cache = DiskSweepCache(blocker)
    cache.put(KEY, make_sweeps())
    assert cache.write_errors == 1
    assert cache.get(KEY) is None


def test_the_cache_module_does_not_import_pytest() -> None:
    code = "import sys, inferlink_audit.cache; print('pytest' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tensor_hash_sees_values_dtype_and_shape() -> None:
    x = torch.arange(6, dtype=torch.float32)
    same = tensors_sha256(x.clone(), torch.tensor([1, 2]))
    assert tensors_sha256(x, torch.tensor([1, 2])) == same
    changed = x.clone()
    changed[3] = 3.5
    assert tensors_sha256(changed, torch.tensor([1, 2])) != same
    assert tensors_sha256(x.view(2, 3), torch.tensor([1, 2])) != same
    assert tensors_sha256(x.double(), torch.tensor([1, 2])) != same
    assert tensors_sha256(x, torch.tensor([1, 3])) != same


# --------------------------------------------------------------------------- invalidation
NET_SOURCE = """
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return {output}
"""
FORWARD = "self.fc2(torch.relu(self.fc1(x)))"
ATTACK = "fgsm_eps0.1"


def _write_checkpoint(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    net = nn.Sequential()
    net.fc1 = nn.Linear(4, 8)
    net.fc2 = nn.Linear(8, 3)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "net.safetensors")


def _write_data(folder: Path, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(48, 4, generator=gen)
    torch.save({"x": x, "y": torch.randint(0, 3, (48,), generator=gen)}, folder / "test.pt")


def _write_spec(folder: Path, thresholds: int = 5) -> Path:
    spec = {
        "version": 1,
        "name": "tiny",
        "model": {"factory": "net.py:TinyNet", "checkpoint": "net.safetensors"},
        "data": {"source": "tensors", "path": str(folder / "test.pt"), "batch_size": 16},
        "device": "cpu",
        "filtering": {"thresholds": thresholds, "filters": ["low_pass"]},
        "attacks": [{"fgsm": {"eps": 0.1}}],
    }
    path = folder / "audit.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def tiny_audit(tmp_path: Path) -> Path:
    """A spec over a two-layer network built by ``net.py``, its checkpoint and its test.pt."""
    (tmp_path / "net.py").write_text(NET_SOURCE.format(output=FORWARD))
    _write_checkpoint(tmp_path, seed=0)
    _write_data(tmp_path, seed=1)
    return _write_spec(tmp_path)


def _forget_factory_module() -> None:
    """What a new run (a new process) starts from: the factory file not yet imported."""
    for name in [n for n in sys.modules if n.startswith("_inferlink_factory_net_")]:
        del sys.modules[name]


def _sweeps(spec_path: Path, cache: DiskSweepCache | None) -> tuple[list[SweepResult], int]:
    """One run's low-pass sweeps and how many sweeps it computed (rather than read)."""
    _forget_factory_module()
    session = AuditSession(load_spec(spec_path), cache=cache)
    return session.sweeps("low_pass", ATTACK), session.computed_sweeps


def test_an_unchanged_audit_reuses_its_sweeps(tiny_audit: Path, tmp_path: Path) -> None:
    cache = DiskSweepCache(tmp_path / "cache")
    first, computed = _sweeps(tiny_audit, cache)
    assert computed == 1
    again, computed = _sweeps(tiny_audit, cache)
    assert computed == 0
    assert (cache.hits, cache.misses) == (1, 1)
    assert again == first


def _new_checkpoint(folder: Path) -> None:
    _write_checkpoint(folder, seed=5)


def _new_spec_field(folder: Path) -> None:
    _write_spec(folder, thresholds=7)


def _regenerated_data(folder: Path) -> None:
    _write_data(folder, seed=2)  # same file name and spec, other examples


def _edited_factory_source(folder: Path) -> None:
    # Same class, same parameters (the checkpoint still loads), another function.
    (folder / "net.py").write_text(NET_SOURCE.format(output=f"-{FORWARD}"))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_new_checkpoint, id="checkpoint"),
        pytest.param(_new_spec_field, id="spec-field"),
        pytest.param(_regenerated_data, id="data-file"),
        pytest.param(_edited_factory_source, id="factory-source"),
    ],
)
def test_a_changed_input_recomputes_the_sweeps(
    tiny_audit: Path, tmp_path: Path, change: Callable[[Path], None]
) -> None:
    cache = DiskSweepCache(tmp_path / "cache")
    before, _ = _sweeps(tiny_audit, cache)
    change(tmp_path)
    after, computed = _sweeps(tiny_audit, cache)
    assert computed == 1
    assert cache.hits == 0
    fresh, _ = _sweeps(tiny_audit, None)  # the same inputs, no cache at all
    assert after == fresh
    assert after != before  # the change moved the numbers, so a stale entry would show
