"""DiskSweepCache: entries round-trip exactly, and a damaged entry is never trusted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from inferlink_audit.cache import CACHE_FORMAT, DiskSweepCache
from inferlink_audit.results import Labels, Scores, SweepResult

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
