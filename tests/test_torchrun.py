"""torchrun: two gloo ranks on the CPU, each evaluating a share of the test set, write the
results of one process (README, "Several processes"); what cannot be split is refused."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from inferlink_audit.cli import main
from inferlink_audit.distributed import share_bounds
from inferlink_audit.errors import AuditError
from tests.specs import write_spec

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_ENV = {
    "RANK": "0",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "0",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "1",
}


def small_spec(folder: Path, limit: int, batch_size: int, **overrides: object) -> Path:
    """FGSM at two ε (with its attack-failure indicators) and Gaussian noise (random draws per
    example), statistics on."""
    return write_spec(
        folder,
        data={
            "source": "sklearn_digits",
            "limit": limit,
            "batch_size": batch_size,
            "normalize": {"mean": [0.5], "std": [0.5]},
        },
        filtering={"thresholds": 3, "filters": ["low_pass", "pulse"]},
        attacks=[
            {"fgsm": {"eps": [0.1, 0.05]}},  # an ε curve: eps_not_monotone reads its outcomes
            {"gaussian": {"sigma": 0.3}},
        ],
        statistics={"resamples": 200},
        checks={
            "min_clean_accuracy": 0.5,
            "max_fragile_fraction": {"value": 1.0},
            "attack_sanity": True,  # indicators run whole on every rank
        },
        **overrides,
    )


def models_of(path: Path) -> str:
    """Every model record (curves, outcomes' statistics, attacks, checks) as canonical text."""
    return json.dumps(json.loads(path.read_text())["models"], sort_keys=True)


def one_process_and_two_ranks(spec: Path, tmp_path: Path, *options: str) -> tuple[Path, Path, str]:
    """results.json of one process and of two torchrun ranks (given ``options``), and what
    the ranks printed."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", str(spec), "--out", str(one), "--quiet"]) == 0
    assert not dist.is_initialized()  # a plain run joins no process group
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "inferlink_audit", "run", str(spec)]
    done = subprocess.run(
        [*command, "--out", str(two), "--quiet", *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return one / "results.json", two / "results.json", done.stdout


@pytest.mark.slow
def test_two_gloo_ranks_in_whole_batches_write_the_results_of_one_process(
    tmp_path: Path,
) -> None:
    # 50 examples in batches of 16 (16, 16, 16, 2): rank 0 holds 32, rank 1 holds 18.
    assert share_bounds(50, 16, 2) == [(0, 32), (32, 50)]
    spec = small_spec(tmp_path, limit=50, batch_size=16)
    cache = tmp_path / "cache"
    one, two, stdout = one_process_and_two_ranks(spec, tmp_path, "--cache", str(cache))
    assert models_of(two) == models_of(one)
    assert json.loads(two.read_text())["meta"]["torchrun_ranks"] == 2
    assert stdout.count("results: ") == 1  # rank 0 alone prints and writes
    # Rank 0 kept the sweeps the ranks computed together: one process reads them back.
    written = {path: path.stat().st_mtime_ns for path in cache.glob("*.json")}
    assert len(written) == 4  # 2 filters x 2 attacks
    three = tmp_path / "three"
    assert main(["run", str(spec), "--out", str(three), "--quiet", "--cache", str(cache)]) == 0
    assert models_of(three / "results.json") == models_of(one)
    assert {path: path.stat().st_mtime_ns for path in cache.glob("*.json")} == written  # read


@pytest.mark.slow
def test_two_gloo_ranks_splitting_one_batch_write_the_results_of_one_process(
    tmp_path: Path,
) -> None:
    # One batch of 45: the ranks take 22 and 23 examples, batches starting mid-set.
    assert share_bounds(45, 64, 2) == [(0, 22), (22, 45)]
    spec = small_spec(tmp_path, limit=45, batch_size=64)
    one, two, _ = one_process_and_two_ranks(spec, tmp_path)
    assert models_of(two) == models_of(one)


@pytest.mark.parametrize(
    ("n", "batch", "world"), [(50, 16, 2), (360, 360, 3), (7, 2, 4), (5, 9, 5)]
)
def test_shares_cover_every_example_once_in_order(n: int, batch: int, world: int) -> None:
    bounds = share_bounds(n, batch, world)
    assert len(bounds) == world
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(n))
    sizes = [stop - start for start, stop in bounds]
    if -(-n // batch) >= world:  # whole batches: every share but the last starts a batch
        assert all(start % batch == 0 for start, _ in bounds)
        assert max(sizes) - min(sizes) <= batch
    else:
        assert max(sizes) - min(sizes) <= 1


def test_more_ranks_than_examples_is_refused() -> None:
    with pytest.raises(AuditError, match=r"3 ranks for 2 test examples"):
        share_bounds(2, 1, 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"remediation": {"selective_retrain": {"epochs": 1}}},
            r"audit\.yaml:\d+: remediation: selective retraining .* does not run under torchrun",
        ),
        ({"compare": ["other.yaml"]}, r"audit\.yaml:\d+: compare: transferability .* torchrun"),
        (
            {"statistics": {"sequential": {"round": 40}}},
            r"audit\.yaml:\d+: statistics\.sequential: sequential rounds .* torchrun",
        ),
    ],
)
def test_torchrun_refuses_what_cannot_be_split(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, object],
    message: str,
) -> None:
    if "remediation" in overrides:
        data = {"source": "sklearn_digits", "limit": 40, "train": {"source": "sklearn_digits"}}
        overrides = {**overrides, "data": data}
    else:
        write_spec(tmp_path, "other.yaml", name="other")
    spec = write_spec(tmp_path, **overrides)
    for name, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(name, value)
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inferlink-audit: error: ")
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not dist.is_initialized()


def test_torchrun_refuses_a_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path)
    for name, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(name, value)
    assert main(["run", str(spec), "--shard", "1/2", "--out", str(tmp_path / "out")]) == 2
    assert "use one of them: drop --shard" in capsys.readouterr().err


def test_a_rank_other_than_0_prints_no_error_found_before_joining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path)
    for name, value in {**TORCHRUN_ENV, "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(["run", str(spec), "--shard", "1/2"]) == 2
    assert capsys.readouterr().err == ""  # rank 0 says it once
