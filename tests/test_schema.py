"""The spec's JSON Schema (``inferlink-audit schema``): every key described, every example and
test spec accepted and typos refused, as ``check-jsonschema`` (what a CI hook or an editor
would use) sees them, and the editor line ``init`` writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from inferlink_audit.cli import main
from inferlink_audit.schema import SCHEMA_FILENAME, spec_json_schema
from inferlink_audit.spec import AuditSpec

from .specs import EXAMPLES, digits_spec
from .test_plugin import spec_text
from .test_shards import small_spec

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "corpus" / "specs"

# Corpus specs the models refuse for reasons a JSON Schema cannot state (a relation between
# two keys); the loader reports them, the editor cannot.
BEYOND_A_SCHEMA = {"input_range_reversed.yaml": "low < high of a pair"}


def check_jsonschema(schema: Path, files: list[Path]) -> dict[str, list[str]]:
    """``check-jsonschema``'s verdict on each file: the messages of its errors (none: valid)."""
    pytest.importorskip("check_jsonschema")
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), "-o", "json"]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    report = json.loads(done.stdout)
    verdicts: dict[str, list[str]] = {str(f): [] for f in files}
    for error in report["errors"]:
        verdicts[error["filename"]].append(error["message"])
    return verdicts


@pytest.fixture(scope="module")
def schema_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The schema as ``inferlink-audit schema --out`` writes it."""
    path = tmp_path_factory.mktemp("schema") / SCHEMA_FILENAME
    assert main(["schema", "--out", str(path)]) == 0
    return path


def properties(node: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every ``properties`` entry anywhere in the schema, with where it is."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        for key, value in node.get("properties", {}).items():
            found.append((f"{where}.{key}", value))
        for key, value in node.items():
            found += properties(value, f"{where}/{key}")
    elif isinstance(node, list):
        for value in node:
            found += properties(value, where)
    return found


def test_every_key_in_the_schema_has_a_description() -> None:
    keys = properties(spec_json_schema())
    assert len(keys) > 90  # the whole spec, nested models included
    assert [where for where, value in keys if not value.get("description")] == []


def test_schema_prints_the_models_schema_and_it_is_a_valid_draft_2020_12_schema(
    capsys: pytest.CaptureFixture[str], schema_file: Path
) -> None:
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(schema_file.read_text(encoding="utf-8")) == spec_json_schema()
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(printed["properties"]) == set(AuditSpec.model_fields)
    assert printed["required"] == ["version", "name", "model", "data"]
    pytest.importorskip("check_jsonschema")
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--check-metaschema", str(schema_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_schema_out_to_a_folder_that_cannot_hold_it_is_an_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    assert main(["schema", "--out", str(tmp_path / "file" / "schema.json")]) == 2
    assert capsys.readouterr().err.startswith(f"inferlink-audit: error: cannot write {tmp_path}")


def test_every_example_and_test_spec_passes_check_jsonschema(
    schema_file: Path, tmp_path: Path
) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("## Spec reference", 1)[1]
    reference = re.search(r"```yaml\n(.*?)```", readme, re.S)
    assert reference is not None
    written = {
        "readme_reference.yaml": reference.group(1),
        "digits_spec.yaml": yaml.safe_dump(digits_spec()),
        "plugin_spec.yaml": spec_text(),
        # the loader's shorthand: a bare number means {value: 0.4, on: adversarial}
        "bare_fraction.yaml": yaml.safe_dump(digits_spec(checks={"max_fragile_fraction": 0.4})),
    }
    for name, text in written.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "shards").mkdir()
    files = [
        *sorted(EXAMPLES.glob("*.yaml")),
        *sorted((ROOT / "docs").rglob("*.yaml")),
        *(tmp_path / name for name in written),
        small_spec(tmp_path / "shards"),
    ]
    verdicts = check_jsonschema(schema_file, files)
    assert {name: errors for name, errors in verdicts.items() if errors} == {}
    assert len(verdicts) == len(files)


def test_the_schema_agrees_with_the_models_on_the_test_corpus(schema_file: Path) -> None:
    """Each hostile spec is refused by the schema exactly when the models refuse it (a problem
    the loader finds later, in a file or the model, is no business of the schema's)."""
    files = [p for p in sorted(CORPUS.glob("*.yaml")) if p.name not in BEYOND_A_SCHEMA]
    models_accept: dict[str, bool] = {}
    for path in files:
        try:
            AuditSpec.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
        except ValidationError:
            models_accept[str(path)] = False
        except yaml.YAMLError:
            continue  # not YAML: neither judges it
        else:
            models_accept[str(path)] = True
    assert sorted(models_accept.values()).count(False) >= 5  # typos, types and bounds refused
    verdicts = check_jsonschema(schema_file, [Path(p) for p in models_accept])
    schema_accepts = {name: not errors for name, errors in verdicts.items()}
    assert schema_accepts == models_accept


def test_the_schema_rejects_an_unknown_key_at_any_depth(schema_file: Path, tmp_path: Path) -> None:
    spec = digits_spec()
    top = tmp_path / "top.yaml"
    top.write_text(yaml.safe_dump({**spec, "chekcs": {}}))
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump({**spec, "filtering": {"thresholdz": 5}}))
    verdicts = check_jsonschema(schema_file, [top, nested])
    assert verdicts == {
        str(top): ["Additional properties are not allowed ('chekcs' was unexpected)"],
        str(nested): ["Additional properties are not allowed ('thresholdz' was unexpected)"],
    }


def test_init_points_editors_at_the_schema_it_writes_next_to_the_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "audits" / "audit.yaml"
    target.parent.mkdir()
    assert main(["init", str(target), "--factory", "models.py:Net"]) == 0
    schema = tmp_path / "audits" / SCHEMA_FILENAME
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        f"wrote {target}",
        f"wrote {schema} (the schema the spec's first line points editors to)",
    ]
    first = target.read_text(encoding="utf-8").splitlines()[0]
    assert first == f"# yaml-language-server: $schema=./{SCHEMA_FILENAME}"
    assert json.loads(schema.read_text(encoding="utf-8")) == spec_json_schema()
    assert check_jsonschema(schema, [target]) == {str(target): []}
    # A second init finds the same schema there and leaves it alone.
    assert main(["init", str(target), "--factory", "models.py:Net", "--force"]) == 0
    assert f"wrote {schema}" not in capsys.readouterr().out
