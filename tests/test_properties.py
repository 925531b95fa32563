"""Property tests: whatever text or values a spec holds, loading it gives a spec or a SpecError.

A release gate that crashes on a malformed file tells the user nothing; a ``SpecError`` names
the file, line and key. These tests feed the loader random YAML text, random YAML documents,
random values for every known key and random damage to a valid spec, and accept exactly two
outcomes: an ``AuditSpec``, or a ``SpecError`` whose message names the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferlink_audit.errors import SpecError
from inferlink_audit.spec import AuditSpec
from inferlink_audit.spec_loader import load_spec, parse_spec

from .specs import digits_spec

# Never created: parse_spec only uses it for messages and to anchor relative paths.
SPEC_PATH = Path("/nonexistent-inferlink-audit/specs/audit.yaml")

FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def outcome(text: str) -> AuditSpec | SpecError:
    """The loader's answer to ``text``; any other exception fails the test with its traceback."""
    try:
        return parse_spec(text, path=SPEC_PATH)
    except SpecError as exc:
        message = str(exc)
        assert message.startswith(str(SPEC_PATH)), message
        assert exc.path == str(SPEC_PATH)
        if exc.line is not None:
            assert exc.line >= 1
            assert f"{SPEC_PATH}:{exc.line}" in message
        return exc


# --------------------------------------------------------------------------- raw text
YAML_CHARS = st.sampled_from(
    [*":-[]{}&*!|>'\"#%@`,?~<=. \n\t\\/_", "a", "1", "e", "version", "name", "model"]
)


@FAST
@given(st.text(max_size=300))
def test_random_text(text: str) -> None:
    outcome(text)


@FAST
@given(st.lists(YAML_CHARS, max_size=120).map("".join))
def test_random_yaml_punctuation(text: str) -> None:
    outcome(text)


# --------------------------------------------------------------------------- random documents
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(
        ["~", "~nosuchuser/x", "a\x00b", "x" * 300, "../../etc/passwd", "cuda:99", "1e-3"]
    )
)
KEYS = st.sampled_from(
    [
        "version",
        "name",
        "model",
        "data",
        "device",
        "seed",
        "filtering",
        "attacks",
        "checks",
        "baseline",
        "compare",
        "remediation",
        "report",
        "factory",
        "checkpoint",
        "source",
        "limit",
        "eps",
        "fgsm",
        "pgd",
        "thresholds",
        "<<",
    ]
) | st.text(max_size=8)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=25,
)


@FAST
@given(st.dictionaries(KEYS, DOCUMENTS, max_size=8))
def test_random_documents(document: dict[str, Any]) -> None:
    outcome(yaml.safe_dump(document, allow_unicode=True))


@FAST
@given(DOCUMENTS)
def test_random_top_level_values(document: Any) -> None:
    outcome(yaml.safe_dump(document, allow_unicode=True))


# --------------------------------------------------------------------------- known keys
KEY_PATHS: list[tuple[str | int, ...]] = [
    ("version",),
    ("name",),
    ("device",),
    ("seed",),
    ("model",),
    ("model", "factory"),
    ("model", "kwargs"),
    ("model", "checkpoint"),
    ("model", "trust_pickle"),
    ("data",),
    ("data", "source"),
    ("data", "split"),
    ("data", "path"),
    ("data", "limit"),
    ("data", "batch_size"),
    ("data", "input_range"),
    ("data", "normalize"),
    ("data", "normalize", "mean"),
    ("data", "normalize", "std"),
    ("data", "train"),
    ("filtering",),
    ("filtering", "scopes"),
    ("filtering", "filters"),
    ("filtering", "thresholds"),
    ("filtering", "values"),
    ("filtering", "tolerance"),
    ("filtering", "range"),
    ("filtering", "layers"),
    ("attacks",),
    ("attacks", 0),
    ("attacks", 0, "fgsm"),
    ("attacks", 0, "fgsm", "eps"),
    ("checks",),
    ("checks", "min_clean_accuracy"),
    ("checks", "max_fragile_fraction"),
    ("checks", "max_targeted_layers"),
    ("checks", "max_lipschitz_upper_bound"),
    ("baseline",),
    ("compare",),
    ("remediation",),
    ("report",),
    ("report", "dir"),
]
VALUES = DOCUMENTS | st.sampled_from(
    [
        -1,
        0,
        0.0,
        -0.0,
        1e308,
        math.inf,
        -math.inf,
        math.nan,
        2**64,
        [1, 0],
        [0, 1, 2],
        ["local", "local"],
        {"fgsm": {"eps": 0.1}, "pgd": {"eps": 0.1}},
        {"value": 2},
    ]
)


def _set(document: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    """Set ``path`` in ``document``, building the mappings and lists on the way."""
    node: Any = document
    for index, part in enumerate(path[:-1]):
        following = path[index + 1]
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(part, int):
            if not isinstance(node, list):
                return
            while len(node) <= part:
                node.append(empty)
            if not isinstance(node[part], list | dict):
                node[part] = empty
            node = node[part]
        else:
            if not isinstance(node, dict):
                return
            if not isinstance(node.get(part), list | dict):
                node[part] = empty
            node = node[part]
    last = path[-1]
    if isinstance(last, int) and isinstance(node, list):
        while len(node) <= last:
            node.append(None)
        node[last] = value
    elif isinstance(last, str) and isinstance(node, dict):
        node[last] = value


@FAST
@given(st.lists(st.tuples(st.sampled_from(KEY_PATHS), VALUES), min_size=1, max_size=4))
def test_random_values_for_known_keys(changes: list[tuple[tuple[str | int, ...], Any]]) -> None:
    document = digits_spec()
    for path, value in changes:
        _set(document, path, value)
    outcome(yaml.safe_dump(document, allow_unicode=True))


@FAST
@given(st.sets(st.sampled_from(KEY_PATHS), max_size=4))
def test_removing_known_keys(paths: set[tuple[str | int, ...]]) -> None:
    document = digits_spec()
    for path in paths:
        node: Any = document
        for part in path[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                break
        else:
            if isinstance(node, dict):
                node.pop(path[-1], None)
            elif isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
                node.pop(path[-1])
    outcome(yaml.safe_dump(document, allow_unicode=True))


# --------------------------------------------------------------------------- damaged files
VALID = yaml.safe_dump(digits_spec(), sort_keys=False)


@FAST
@given(st.data())
def test_damaged_valid_spec(data: st.DataObject) -> None:
    """Cut, insert and overwrite characters of a valid spec: still a spec or a SpecError."""
    text = VALID
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        action = data.draw(st.sampled_from(["cut", "insert", "replace"]))
        piece = data.draw(st.lists(YAML_CHARS, min_size=1, max_size=6).map("".join))
        if action == "cut":
            text = text[:at] + text[at + len(piece) :]
        elif action == "insert":
            text = text[:at] + piece + text[at:]
        else:
            text = text[:at] + piece + text[at + len(piece) :]
    outcome(text)


def test_the_undamaged_spec_is_valid() -> None:
    assert isinstance(outcome(VALID), AuditSpec)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_on_disk(tmp_path_factory: Any, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes") / "audit.yaml"
    path.write_bytes(raw)
    try:
        load_spec(path)
    except SpecError as exc:
        assert str(exc).startswith(str(path))
