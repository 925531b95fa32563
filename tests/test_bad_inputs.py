"""The corpus of bad inputs (``tests/corpus``): every one ends in one clear paragraph, exit 2.

Each spec in ``tests/corpus/specs`` says in its header what the error must contain
(``# expect: ...``), on which spec line it is reported (``# line: N``), which file would
exist if a hostile payload had run (``# pwned: NAME``), and which warnings the user's own
model raises on its way to the error (``# warns: TEXT``; the library itself raises none).
The whole stderr is checked: one paragraph, nothing before or after it. A case runs in its
own folder holding
the spec, the digits model, the corpus's factory files and the generated binary inputs, with
that folder as the working directory; afterwards the folder must be exactly as before:
nothing created (no report folder, no ``__pycache__``, no payload marker), nothing modified.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from inferlink_audit.cli import main
from inferlink_audit.errors import ModelLoadError

from .corpus.build import SPECS, build_inputs, stage_case

REPO = Path(__file__).resolve().parents[1]
# One torch thread per subprocess: they share CI's two cores with the test workers.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Under ``-n 2`` on two cores, torch's default threads per worker oversubscribe them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Case:
    """One corpus spec and what its header promises."""

    spec: Path
    expect: list[str] = field(default_factory=list)
    line: int | None = None
    pwned: list[str] = field(default_factory=list)
    warns: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, spec: Path) -> Case:
        case = cls(spec)
        for raw in spec.read_text(encoding="utf-8").splitlines():
            match = re.match(r"# (expect|line|pwned|warns): (.*)$", raw)
            if match is None:
                continue
            kind, value = match.groups()
            if kind == "expect":
                case.expect.append(value)
            elif kind == "line":
                case.line = int(value)
            elif kind == "warns":
                case.warns.append(value)
            else:
                case.pwned.append(value)
        assert case.expect, f"{spec.name}: the header names no '# expect:'"
        return case


CASES = sorted(SPECS.glob("*.yaml"))


def _skip_if_present(name: str) -> None:
    """Two device cases only make sense where that device is really missing."""
    if name == "device_cuda_7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    if name == "device_xla_without_torch_xla" and importlib.util.find_spec("torch_xla"):
        pytest.skip("torch_xla is installed here")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with the SHA-256 of each file's bytes."""
    state: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            state[os.path.relpath(os.path.join(root, name), folder) + "/"] = "dir"
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):  # never read through a link (it may be /dev/zero)
                state[os.path.relpath(path, folder)] = "link to " + os.readlink(path)
                continue
            state[os.path.relpath(path, folder)] = hashlib.sha256(
                Path(path).read_bytes()
            ).hexdigest()
    return state


@pytest.fixture(scope="session")
def corpus_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus-inputs")
    build_inputs(folder)
    return folder


def assert_clear_error(err: str, case: Case, spec: Path) -> None:
    """The whole of stderr is one paragraph from the CLI, naming the spec (and line), with the
    promised content: nothing printed before it (a traceback, a warning) or after it."""
    assert err.startswith("inferlink-audit: error: "), f"output before the error:\n{err}"
    assert err.endswith("\n") and not err.endswith("\n\n"), f"output after the error:\n{err!r}"
    assert err.count("inferlink-audit: error: ") == 1, f"more than one error:\n{err}"
    assert "Traceback" not in err and "INTERNALERROR" not in err, err
    assert "\n\n" not in err.strip(), f"more than one paragraph:\n{err}"
    assert str(spec) in err, f"the spec is not named:\n{err}"
    if case.line is not None:
        assert f"{spec}:{case.line}:" in err, f"line {case.line} is not named:\n{err}"
    for fragment in case.expect:
        assert fragment in err, f"{fragment!r} missing from:\n{err}"


def assert_only_the_model_warns(messages: list[str], case: Case) -> None:
    """Each warning raised is one the spec's header declares (the user's model raises it),
    and each declared one is raised, so a stale declaration cannot hide a new warning."""
    unexpected = [m for m in messages if not any(w in m for w in case.warns)]
    assert unexpected == [], f"warnings besides the error: {unexpected}"
    for declared in case.warns:
        assert any(declared in m for m in messages), f"{declared!r} not raised: {messages}"


@pytest.mark.parametrize("spec", CASES, ids=[p.stem for p in CASES])
def test_bad_input_exits_2_with_one_clear_paragraph_and_touches_nothing(
    spec: Path,
    corpus_inputs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _skip_if_present(spec.stem)
    case = Case.read(spec)
    folder = tmp_path / "case"
    staged = stage_case(spec, folder, corpus_inputs)
    monkeypatch.chdir(folder)  # a payload writing relative paths would land in the snapshot
    before = snapshot(folder)
    caplog.set_level(logging.WARNING)
    # pytest would keep warnings and log records out of stderr; outside it they print there.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
            warnings.filterwarnings("ignore", category=hidden)  # as Python hides them by default
        code = main(["run", str(staged), "--out", str(folder / "report")])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    assert_clear_error(err, case, staged)
    assert_only_the_model_warns([str(w.message) for w in caught], case)
    assert [r.getMessage() for r in caplog.records] == []
    assert snapshot(folder) == before
    for name in case.pwned:
        assert not (folder / name).exists(), f"{name} exists: the payload ran"


def test_every_corpus_spec_is_small_and_the_corpus_fits_its_budget() -> None:
    total = sum(p.stat().st_size for p in SPECS.parent.rglob("*") if p.is_file())
    assert total < 200_000
    assert len(CASES) >= 50


SUBPROCESS_CASES = ["yaml_syntax", "ckpt_pickle_runs_code", "model_wrong_input_size"]


def test_the_console_command_gives_the_same_errors(corpus_inputs: Path, tmp_path: Path) -> None:
    """``python -m inferlink_audit``: exit 2, no traceback, nothing written (run in parallel)."""
    runs = []
    for name in SUBPROCESS_CASES:
        case = Case.read(SPECS / f"{name}.yaml")
        assert not case.warns, "the whole stderr is checked below: pick a case without warnings"
        folder = tmp_path / name
        staged = stage_case(case.spec, folder, corpus_inputs)
        before = snapshot(folder)
        proc = subprocess.Popen(
            [sys.executable, "-m", "inferlink_audit", "run", str(staged), "--out", "report"],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        runs.append((case, folder, staged, before, proc))
    try:
        for case, folder, staged, before, proc in runs:
            out, err = proc.communicate(timeout=600)  # a guard against a hang only
            assert proc.returncode == 2, err
            assert out == ""
            assert_clear_error(err, case, staged)
            assert snapshot(folder) == before
            for name in case.pwned:
                assert not (folder / name).exists()
    finally:
        for *_, proc in runs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_debug_shows_the_traceback(corpus_inputs: Path, tmp_path: Path) -> None:
    staged = stage_case(SPECS / "ckpt_truncated.yaml", tmp_path / "case", corpus_inputs)
    with pytest.raises(ModelLoadError, match="not a readable safetensors file") as raised:
        main(["run", str(staged), "--out", str(tmp_path / "out"), "--debug"])
    assert raised.type is ModelLoadError
    assert not (tmp_path / "out").exists()


def test_pytest_plugin_reports_errors_without_internalerror(
    corpus_inputs: Path, tmp_path: Path
) -> None:
    """The same faults under ``pytest --inferlink-audit``: collection or item errors only."""
    folder = tmp_path / "case"
    names = ["yaml_syntax", "ckpt_pickle_runs_code"]
    specs = [stage_case(SPECS / f"{n}.yaml", folder, corpus_inputs) for n in names[:1]]
    for name in names[1:]:
        specs.append(folder / f"{name}.yaml")
        (folder / f"{name}.yaml").write_text((SPECS / f"{name}.yaml").read_text())
    # A spec without checks still makes items; give these one each so they are collected.
    for spec in specs[1:]:
        spec.write_text(spec.read_text() + "checks:\n  min_clean_accuracy: 0.5\n")
    before = snapshot(folder)
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "--continue-on-collection-errors",
    ]
    for spec in specs:
        args += ["--inferlink-audit", str(spec)]
    proc = subprocess.run(
        [*args, "--inferlink-report", str(tmp_path / "report")],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=ENV,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode in (1, 2), text  # tests failed / collection errors; 3 is INTERNALERROR
    assert "INTERNALERROR" not in text
    assert "YAML syntax error" in text
    assert "evil.pt is a pickle" in text and "NOT loaded" in text
    assert not (folder / "PWNED").exists()
    assert snapshot(folder) == before


# --------------------------------------------------------------------------- resources
OUT_OF_MEMORY = {
    "torch": lambda: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total capacity)"
    ),
    "cpu-allocator": lambda: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)"
    ),
}


@pytest.mark.parametrize("kind", sorted(OUT_OF_MEMORY))
@pytest.mark.parametrize("at_call", [2, 7], ids=["first-batch", "mid-audit"])
def test_a_batch_that_does_not_fit_names_the_batch_size_and_the_size_to_try(
    kind: str,
    at_call: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Simulated by the model's forward raising the allocator's error from its n-th call:
    the 2nd is the first full batch (the 1st probes one example), the 7th is mid-audit."""
    from example_audits.digits import DigitsCNN

    from .specs import write_spec

    original = DigitsCNN.forward
    calls = 0

    def forward(self: DigitsCNN, x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls >= at_call:
            raise OUT_OF_MEMORY[kind]()
        return original(self, x)

    monkeypatch.setattr(DigitsCNN, "forward", forward)
    spec = write_spec(
        tmp_path,
        model={"factory": "example_audits.digits:DigitsCNN", "checkpoint": None},
        filtering={"thresholds": 3, "filters": ["pulse"], "scopes": ["global"]},
    )
    out = tmp_path / "out"
    assert main(["run", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert calls >= at_call
    assert err.startswith(f"inferlink-audit: error: {spec}") and "Traceback" not in err
    assert "out of memory on device cpu with data.batch_size 120" in err
    assert "set data.batch_size: 60 (half of 120)" in err
    assert not out.exists()


def test_out_of_memory_with_a_batch_size_beyond_the_data_suggests_half_of_what_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from example_audits.digits import DigitsCNN

    from .specs import write_spec

    original = DigitsCNN.forward

    def forward(self: DigitsCNN, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return original(self, x)

    monkeypatch.setattr(DigitsCNN, "forward", forward)
    spec = write_spec(
        tmp_path,
        model={"factory": "example_audits.digits:DigitsCNN", "checkpoint": None},
        data={"source": "sklearn_digits", "limit": 120, "batch_size": 500},
    )
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:" in err and "data.batch_size: out of memory on device cpu" in err
    assert "data.batch_size 500 (batches of 120, the whole test set)" in err
    assert "set data.batch_size: 60 (half of 120)" in err


# --------------------------------------------------------------------------- other commands
def test_device_override_names_the_spec(
    corpus_inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    staged = stage_case(SPECS / "ckpt_nan.yaml", tmp_path / "case", corpus_inputs)
    staged.write_text(
        staged.read_text().replace("nan_weights.safetensors", "digits_cnn.safetensors")
    )
    assert main(["run", str(staged), "--device", "quantum:0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"inferlink-audit: error: {staged}: device 'quantum:0' is not a device")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[1, 2, 3]", "not a results.json written by inferlink-audit"),
        ("{not json", "cannot read results"),
        ('{"schema": "something/else"}', "this version reads"),
    ],
    ids=["list", "not-json", "other-schema"],
)
def test_merge_refuses_files_that_are_not_results(
    content: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "results.json"
    bad.write_text(content)
    assert main(["merge", str(bad), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and fragment in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_init_into_a_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "audit.yaml").mkdir()
    assert main(["init", str(tmp_path / "audit.yaml"), "--force"]) == 2
    assert "is a folder" in capsys.readouterr().err
