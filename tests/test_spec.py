"""Loading audit specs: the DESIGN §2.1 example, defaults, and every message a user can cause."""

from __future__ import annotations

import hashlib
import itertools
import textwrap
from pathlib import Path

import pytest

from inferlink_audit.errors import SpecError
from inferlink_audit.spec import DEFAULT_FGSM_EPS, FGSMSpec, LBFGSSpec, PGDSpec
from inferlink_audit.spec_loader import load_spec, parse_spec

# DESIGN §2.1, verbatim, comments included.
DESIGN_EXAMPLE = """\
version: 1
name: digits-cnn
model:
  factory: example_audits.digits:DigitsCNN   # importable module:Name, or a file next to the spec: models.py:Net,
                                             # or  torchvision: resnet18   or  torchscript: model.pt
  kwargs: {num_classes: 10}
  checkpoint: digits_cnn.safetensors         # .safetensors, or .pt/.pth/.ckpt loaded weights_only
                                             # (a Lightning-style {"state_dict": …} and "model." prefixes are understood)
data:
  source: sklearn_digits                     # sklearn_digits | tensors | torchvision
  split: test                                # sklearn_digits: a fixed, documented split
  # source: tensors     path: test.pt        # a .pt dict {x, y} (weights_only) or a .npz with arrays x, y
  # source: torchvision name: CIFAR10  root: ~/datasets  split: test   (download only if download: true)
  limit: 512
  batch_size: 256
  input_range: [0, 1]
  normalize: {mean: [0.5], std: [0.5]}       # applied inside the model wrapper, so ε is in input units
  train: {source: sklearn_digits, split: train}   # only for remediation
device: auto                                 # auto | cpu | cuda | cuda:1 | xla
seed: 0
filtering:
  scopes: [local, global]
  filters: [low_pass, high_pass, pulse]
  thresholds: 25
  values: signed                             # signed | magnitude
  layers: {types: [Conv2d, Linear], include: ["*"], exclude: []}
  adversarial_source: filtered               # filtered | original
  tolerance: 0.05                            # τ of section 1.4
attacks:
  - fgsm: {eps: 0.1}
  - pgd: {eps: 0.1, steps: 10, step_size: 0.02, norm: linf, random_start: false}
  - gaussian: {sigma: 0.1}
  - lbfgs: {target: next, max_iter: 50}      # box-constrained L-BFGS (Szegedy)
checks:
  min_clean_accuracy: 0.90
  min_adversarial_accuracy: 0.30             # per attack
  max_fragile_fraction: {value: 0.40, on: adversarial}   # per filter and attack; on: clean | adversarial
  max_targeted_layers: 2                     # per filter and attack
  max_lipschitz_upper_bound: 1.0e+4
  no_new_fragile_layers: true                # needs baseline:
  max_score_drop: 0.05                       # needs baseline:
baseline: previous/results.json              # results of the last released model, for regression checks
compare: [other_model.yaml]                  # further models in the same report (transfer, side-by-side table)
remediation:
  selective_retrain: {epochs: 2, lr: 1.0e-3, optimizer: adam, adversarial_mix: 0.0, min_adversarial_gain: 0.02}
report:
  dir: inferlink-report
"""

MINIMAL = """\
version: 1
name: tiny
model:
  factory: models.py:Net
data:
  source: sklearn_digits
"""


def write(folder: Path, text: str, name: str = "release.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_with(path: Path, fragment: str) -> int:
    """1-based line of the only line of ``path`` holding ``fragment``; keeps tests honest."""
    hits = [
        number for number, line in enumerate(path.read_text().splitlines(), 1) if fragment in line
    ]
    assert len(hits) == 1, hits
    return hits[0]


def spec_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value


def minimal_with(tmp_path: Path, extra: str) -> Path:
    return write(tmp_path, MINIMAL + textwrap.dedent(extra))


# --------------------------------------------------------------------------- valid specs
@pytest.fixture
def design_spec(tmp_path: Path) -> Path:
    write(tmp_path, "{}", "previous/results.json")
    write(tmp_path, MINIMAL, "other_model.yaml")
    return write(tmp_path, DESIGN_EXAMPLE)


def test_design_example_loads_with_its_values(design_spec: Path, tmp_path: Path) -> None:
    spec = load_spec(design_spec)

    assert spec.name == "digits-cnn"
    assert spec.model.factory == "example_audits.digits:DigitsCNN"
    assert spec.model.factory_kind == "import"
    assert spec.model.kwargs == {"num_classes": 10}
    assert spec.model.checkpoint == tmp_path / "digits_cnn.safetensors"
    assert spec.data.limit == 512
    assert spec.data.input_range == (0.0, 1.0)
    assert spec.data.normalize is not None and spec.data.normalize.std == [0.5]
    assert spec.data.train is not None and spec.data.train.split == "train"
    assert spec.filtering.layers.types == ["Conv2d", "Linear"]
    assert [attack.id for attack in spec.attack_specs] == [
        "fgsm_eps0.1",
        "pgd_linf_eps0.1_steps10",
        "gaussian_sigma0.1",
        "lbfgs_next",
    ]
    pgd = spec.attack("pgd_linf_eps0.1_steps10")
    assert isinstance(pgd, PGDSpec) and pgd.effective_step_size == 0.02
    # YAML 1.1 would read the key `on:` as the boolean true; the loader keeps it a word.
    assert spec.checks.max_fragile_fraction is not None
    assert spec.checks.max_fragile_fraction.value == 0.40
    assert spec.checks.max_fragile_fraction.on == "adversarial"
    assert spec.checks.max_lipschitz_upper_bound == 1.0e4
    assert spec.checks.no_new_fragile_layers is True
    assert spec.baseline == tmp_path / "previous" / "results.json"
    assert spec.compare == [tmp_path / "other_model.yaml"]
    assert spec.remediation is not None
    assert spec.remediation.selective_retrain.lr == 1.0e-3
    assert spec.report.dir == tmp_path / "inferlink-report"


def test_design_example_metadata(design_spec: Path, tmp_path: Path) -> None:
    spec = load_spec(design_spec)

    assert spec.source_path == design_spec
    assert spec.spec_dir == tmp_path
    assert spec.sha256 == hashlib.sha256(design_spec.read_bytes()).hexdigest()
    assert spec.line_of() == 1
    assert spec.line_of("checks", "max_fragile_fraction") == line_with(
        design_spec, "max_fragile_fraction:"
    )
    assert spec.line_of("attacks", 1, "pgd", "steps") == line_with(design_spec, "- pgd:")
    assert spec.line_of("compare", 0) == line_with(design_spec, "compare:")
    # A key the file does not set points at its nearest ancestor.
    assert spec.line_of("filtering", "range") == line_with(design_spec, "filtering:")


def test_minimal_spec_gets_the_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL))

    assert spec.filtering.thresholds == 25
    assert spec.filtering.filters == ["low_pass", "high_pass", "pulse"]
    assert spec.filtering.scopes == ["local", "global"]
    assert len(spec.attacks) == 1
    attack = spec.attack_specs[0]
    assert isinstance(attack, FGSMSpec) and attack.eps == DEFAULT_FGSM_EPS == 8 / 255
    assert spec.device == "auto"
    assert spec.seed == 0
    assert spec.baseline is None and spec.compare == []
    assert spec.remediation is None
    assert spec.model.checkpoint is None
    assert spec.report.dir == tmp_path / "inferlink-report"


def test_relative_paths_resolve_against_the_spec_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    write(tmp_path, "{}", "shared/results.json")
    write(tmp_path, MINIMAL, "audits/other.yaml")
    absolute = tmp_path / "weights" / "abs.pt"
    path = write(
        tmp_path,
        f"""\
        version: 1
        name: paths
        model:
          factory: models.py:Net
          checkpoint: weights/model.safetensors
        data:
          source: tensors
          path: data/test.pt
          train: {{source: torchvision, name: MNIST, root: ~/datasets, split: train}}
        baseline: ../shared/results.json
        compare: [other.yaml, {absolute}]
        report: {{dir: out/report}}
        """,
        "audits/paths.yaml",
    )
    absolute.parent.mkdir()
    absolute.touch()

    spec = load_spec(path)

    audits = tmp_path / "audits"
    assert spec.spec_dir == audits
    assert spec.model.checkpoint == audits / "weights" / "model.safetensors"
    assert spec.model.factory == "models.py:Net"  # the model loader resolves it from spec_dir
    assert spec.data.path == audits / "data" / "test.pt"
    assert spec.data.train is not None and spec.data.train.root == home / "datasets"
    assert spec.baseline == tmp_path / "shared" / "results.json"
    assert spec.compare == [audits / "other.yaml", absolute]
    assert spec.report.dir == audits / "out" / "report"


def test_relative_spec_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, MINIMAL, "audits/tiny.yaml")
    monkeypatch.chdir(tmp_path)

    spec = load_spec("audits/tiny.yaml")

    assert spec.source_path == tmp_path / "audits" / "tiny.yaml"
    assert spec.report.dir == tmp_path / "audits" / "inferlink-report"


def test_parse_spec_hashes_the_text_and_anchors_at_path(tmp_path: Path) -> None:
    text = MINIMAL + "model_note: x\n"
    with pytest.raises(SpecError, match=r"virtual\.yaml:7: model_note: unknown key; did you mean"):
        parse_spec(text, path=tmp_path / "virtual.yaml")

    spec = parse_spec(MINIMAL, path=tmp_path / "virtual.yaml")
    assert spec.sha256 == hashlib.sha256(MINIMAL.encode("utf-8")).hexdigest()
    assert spec.spec_dir == tmp_path


def test_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    spec = load_spec(minimal_with(tmp_path, "attacks:\n  - fgsm: {eps: 3e-2}\n"))
    assert spec.attack_specs[0].id == "fgsm_eps0.03"


def test_kwargs_exponent_is_a_float(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL.replace(
            "  factory: models.py:Net\n", "  factory: models.py:Net\n  kwargs: {lr: 1e-3}\n"
        ),
    )
    assert load_spec(path).model.kwargs == {"lr": 1e-3}


def test_merge_keys_and_anchors_work(tmp_path: Path) -> None:
    path = minimal_with(
        tmp_path,
        """\
        attacks:
          - pgd: &pgd {eps: 0.1, steps: 10}
          - pgd: {<<: *pgd, steps: 20}
        """,
    )
    spec = load_spec(path)
    assert [attack.id for attack in spec.attack_specs] == [
        "pgd_linf_eps0.1_steps10",
        "pgd_linf_eps0.1_steps20",
    ]


def test_bare_max_fragile_fraction_is_shorthand(tmp_path: Path) -> None:
    spec = load_spec(minimal_with(tmp_path, "checks: {max_fragile_fraction: 0.25}\n"))
    assert spec.checks.max_fragile_fraction is not None
    assert spec.checks.max_fragile_fraction.value == 0.25
    assert spec.checks.max_fragile_fraction.on == "adversarial"


# --------------------------------------------------------------------------- validation errors
def test_typo_names_file_line_key_and_suggestion(tmp_path: Path) -> None:
    path = minimal_with(
        tmp_path,
        """\
        filtering:
          scopes: [local]
          thresholdz: 25
        """,
    )
    line = line_with(path, "thresholdz")

    error = spec_error(path)

    message = str(error)
    assert message.splitlines()[0] == (
        f"{path}:{line}: filtering.thresholdz: unknown key; did you mean 'thresholds'?"
    )
    # The snippet shows the line and puts a caret under the key.
    assert message.splitlines()[1] == f"{line:>5} |   thresholdz: 25"
    assert message.splitlines()[2] == "      |   ^"
    assert (error.path, error.line, error.key) == (str(path), line, "filtering.thresholdz")


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    error = spec_error(minimal_with(tmp_path, "report: {zzz: 1}\n"))
    assert "report.zzz: unknown key; valid keys here: dir" in str(error)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "check:\n  min_clean_accuracy: 0.9\n")
    line = line_with(path, "check:")
    assert f"{path}:{line}: check: unknown key; did you mean 'checks'?" in str(spec_error(path))


def test_unknown_attack_suggests_the_nearest(tmp_path: Path) -> None:
    path = minimal_with(
        tmp_path,
        """\
        attacks:
          - fgsm: {eps: 0.1}
          - fgssm: {eps: 0.1}
        """,
    )
    line = line_with(path, "fgssm")
    error = spec_error(path)
    assert f"{path}:{line}: attacks[1].fgssm: unknown key; did you mean 'fgsm'?" in str(error)
    assert error.key == "attacks[1].fgssm"


def test_unknown_attack_parameter_suggests_the_nearest(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "attacks:\n  - fgsm: {epsilon: 0.1}\n")
    assert "attacks[0].fgsm.epsilon: unknown key; did you mean 'eps'?" in str(spec_error(path))


def test_wrong_type_names_line_key_expected_and_given(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "filtering:\n  thresholds: many\n")
    line = line_with(path, "thresholds: many")
    error = spec_error(path)
    assert f"{path}:{line}: filtering.thresholds: expected an integer, got 'many'" in str(error)
    assert (error.line, error.key) == (line, "filtering.thresholds")


def test_wrong_type_number(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "attacks:\n  - gaussian: {sigma: abc}\n")
    assert "attacks[0].gaussian.sigma: expected a number, got 'abc'" in str(spec_error(path))


def test_wrong_type_mapping(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "attacks: [fgsm]\n")
    line = line_with(path, "attacks:")
    assert f"{path}:{line}: attacks[0]: expected a mapping, got 'fgsm'" in str(spec_error(path))


@pytest.mark.parametrize(
    ("extra", "fragment", "problem"),
    [
        (
            "attacks:\n  - fgsm: {eps: -0.1}\n",
            "eps: -0.1",
            "attacks[0].fgsm.eps: must be greater than 0, got -0.1",
        ),
        (
            "filtering:\n  thresholds: 0\n",
            "thresholds: 0",
            "filtering.thresholds: must be at least 3, got 0",
        ),
        (
            "filtering:\n  thresholds: 100000\n",
            "thresholds:",
            "filtering.thresholds: must be at most 10000, got 100000",
        ),
        (
            "checks:\n  min_clean_accuracy: 1.5\n",
            "min_clean_accuracy",
            "checks.min_clean_accuracy: must be at most 1, got 1.5",
        ),
        (
            "checks:\n  max_fragile_fraction: 1.5\n",
            "max_fragile_fraction",
            "checks.max_fragile_fraction: must be at most 1, got 1.5",
        ),
        (
            "filtering:\n  filters: [low_pass, band_pass]\n",
            "filters:",
            "filtering.filters[1]: expected 'low_pass', 'high_pass' or 'pulse', got 'band_pass'",
        ),
        (
            "filtering:\n  scopes: []\n",
            "scopes:",
            "filtering.scopes: needs at least 1 items, got 0",
        ),
        ("  limit: 0\n", "limit: 0", "data.limit: must be at least 1, got 0"),
    ],
)
def test_impossible_values(tmp_path: Path, extra: str, fragment: str, problem: str) -> None:
    # Appended after MINIMAL, so an indented line lands in the `data:` mapping.
    path = write(tmp_path, MINIMAL + extra)
    line = line_with(path, fragment)
    assert f"{path}:{line}: {problem}" in str(spec_error(path))


def test_wrong_version(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("version: 1", "version: 2"))
    assert f"{path}:1: version: expected 1, got 2" in str(spec_error(path))


def test_missing_required_key_points_at_the_parent(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("model:\n  factory: models.py:Net\n", ""))
    error = spec_error(path)
    assert str(error).splitlines()[0] == f"{path}:1: model: required key missing"
    assert (error.line, error.key) == (1, "model")


def test_missing_nested_key_points_at_its_mapping(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "attacks:\n  - fgsm: {}\n")
    line = line_with(path, "- fgsm")
    assert f"{path}:{line}: attacks[0].fgsm.eps: required key missing" in str(spec_error(path))


def test_every_problem_is_reported_in_file_order(tmp_path: Path) -> None:
    path = minimal_with(
        tmp_path,
        """\
        seed: -1
        filtering:
          thresholdz: 25
          values: absolute
        """,
    )
    lines = [line for line in str(spec_error(path)).splitlines() if line.startswith(str(path))]
    assert lines == [
        f"{path}:{line_with(path, 'seed')}: seed: must be at least 0, got -1",
        f"{path}:{line_with(path, 'thresholdz')}: filtering.thresholdz: unknown key; "
        "did you mean 'thresholds'?",
        f"{path}:{line_with(path, 'values')}: filtering.values: expected 'signed' or "
        "'magnitude', got 'absolute'",
    ]


def test_union_branches_read_as_one_problem(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "attacks:\n  - lbfgs: {target: foo}\n")
    message = str(spec_error(path))
    assert (
        "attacks[0].lbfgs.target: expected 'next' or 'random', or an integer, got 'foo'" in message
    )
    assert "constrained-int" not in message and "literal[" not in message
    assert LBFGSSpec(target=3).id == "lbfgs_3"


def test_model_validator_message_is_kept_and_located(tmp_path: Path) -> None:
    path = minimal_with(
        tmp_path,
        """\
        filtering:
          scopes: [global]
        checks:
          max_fragile_fraction: 0.4
        """,
    )
    line = line_with(path, "scopes:")
    error = spec_error(path)
    assert str(error).splitlines()[0] == (
        f"{path}:{line}: filtering.scopes: checks max_fragile_fraction label layers one by one: "
        "add 'local' to filtering.scopes"
    )
    assert "Value error" not in str(error)


def test_nested_model_validator_is_located_at_the_key_it_names(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("sklearn_digits", "tensors"))
    line = line_with(path, "source: tensors")
    assert f"{path}:{line}: data.source: source 'tensors' needs 'path'" in str(spec_error(path))


def test_baseline_check_without_baseline(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "checks:\n  max_score_drop: 0.05\n")
    line = line_with(path, "checks:")
    assert (
        f"{path}:{line}: checks: checks max_score_drop compare with a released model: "
        "set 'baseline: path/to/results.json'"
    ) in str(spec_error(path))


def test_missing_baseline_file_points_at_its_line(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "baseline: previous/results.json\n")
    line = line_with(path, "baseline:")
    error = spec_error(path)
    assert str(error).splitlines()[0] == (
        f"{path}:{line}: baseline: file not found: {tmp_path / 'previous' / 'results.json'} "
        "(relative paths start at the spec's folder)"
    )
    assert (error.line, error.key) == (line, "baseline")


def test_missing_compare_file_points_at_its_item(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL, "a.yaml")
    path = minimal_with(tmp_path, "compare:\n  - a.yaml\n  - b.yaml\n")
    line = line_with(path, "b.yaml")
    assert f"{path}:{line}: compare[1]: file not found: {tmp_path / 'b.yaml'}" in str(
        spec_error(path)
    )


# --------------------------------------------------------------------------- YAML-level errors
def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "filtering:\n  scopes: [local, global\n  filters: [pulse]\n")
    error = spec_error(path)
    first = str(error).splitlines()[0]
    assert first.startswith(f"{path}:{line_with(path, 'filters:')}:")
    assert "YAML syntax error: expected ',' or ']'" in first
    assert "Traceback" not in str(error)
    assert error.line == line_with(path, "filters:")


def test_yaml_bad_indentation(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nname: x\n  model: y\n")
    assert f"{path}:3:8: YAML syntax error: mapping values are not allowed here" in str(
        spec_error(path)
    )


def test_alias_bomb_is_refused(tmp_path: Path) -> None:
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    names = "abcdefghi"
    for previous, name in itertools.pairwise(names):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    path = write(tmp_path, "\n".join(levels) + "\n")
    message = str(spec_error(path))
    assert "expands to more than 10000 values through YAML aliases" in message


def test_too_many_aliases_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "x: &x 1\nys: [" + ", ".join(["*x"] * 101) + "]\n")
    assert f"{path}:2: uses more than 100 YAML aliases" in str(spec_error(path))


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "a: &a [1, *a]\n")
    assert "a YAML alias refers to itself" in str(spec_error(path))


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "a: " + "[" * 200 + "]" * 200 + "\n")
    assert "levels of nesting" in str(spec_error(path))


def test_non_mapping_document_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "- version: 1\n- name: x\n")
    assert f"{path}:1: an audit spec is a YAML mapping of keys" in str(spec_error(path))
    path = write(tmp_path, "just text\n", "scalar.yaml")
    assert "but this file holds the value 'just text'" in str(spec_error(path))


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert f"{path}: is empty; an audit spec needs at least version, name, model, data" in str(
        spec_error(path)
    )


def test_several_documents_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "---\n" + MINIMAL)
    line = line_with(path, "---")
    assert f"{path}:{line}: holds more than one YAML document" in str(spec_error(path))


def test_non_string_keys_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "filtering:\n  1: x\n")
    line = line_with(path, "1: x")
    assert f"{path}:{line}: filtering: keys must be words, got 1" in str(spec_error(path))
    path = write(tmp_path, MINIMAL + "? [a, b]\n: x\n", "complex.yaml")
    assert "keys must be words, got a sequence" in str(spec_error(path))


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "seed: 1\nseed: 2\n")
    first, second = (
        n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith("seed")
    )
    assert f"{path}:{second}: key 'seed' is given twice (first on line {first})" in str(
        spec_error(path)
    )


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("seed: !!int abc\n", "seed: cannot read 'abc' as int"),
        ("seed: !foo bar\n", "seed: cannot read this value: could not determine a constructor"),
        ("filtering: !!set {a, b}\n", "filtering: unsupported YAML tag 'tag:yaml.org,2002:set'"),
        ("x: &x {<<: *x}\n", "a YAML alias refers to itself"),
    ],
)
def test_unreadable_values_are_refused(tmp_path: Path, extra: str, problem: str) -> None:
    path = write(tmp_path, MINIMAL + extra)
    assert f"{path}:{line_with(path, extra.strip())}: {problem}" in str(spec_error(path))


def test_unsafe_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "seed: !!python/object/apply:os.system [echo hi]\n")
    line = line_with(path, "seed:")
    message = str(spec_error(path))
    assert message.startswith(f"{path}:{line}:")
    assert "python/object/apply:os.system" in message


# --------------------------------------------------------------------------- file errors
def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    error = spec_error(path)
    assert str(error).startswith(f"{path}: no such audit spec; check the path")
    assert error.path == str(path)


def test_folder_instead_of_file(tmp_path: Path) -> None:
    assert f"{tmp_path}: is a folder, not an audit spec" in str(spec_error(tmp_path))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\nname: caf\xe9\n")
    assert f"{path}:2: is not UTF-8 text" in str(spec_error(path))
