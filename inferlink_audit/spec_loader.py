"""Load an audit spec (README): YAML with line positions -> a validated ``AuditSpec``.

Every problem a user can cause (unreadable file, YAML syntax, unknown key, wrong type,
impossible value) becomes one ``SpecError`` whose lines read ``file:line: key: problem``,
so an editor or CI log can jump straight to it. Nothing runs until the whole spec is valid.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import stat
import types
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from inferlink_audit.errors import AuditError, KeyPath, Location, SpecError, dotted_key
from inferlink_audit.spec import AuditSpec

__all__ = ["MAX_SPEC_BYTES", "load_spec", "locate_message", "located_errors", "parse_spec"]

# A real spec has a few hundred nodes; these bounds stop "billion laughs" alias bombs and
# pathological nesting long before they cost memory or hit Python's recursion limit.
MAX_NODES = 10_000
MAX_ALIASES = 100
MAX_DEPTH = 50
MAX_PROBLEMS = 20
MAX_SNIPPETS = 5
# A spec is a page of YAML; refusing big files up front keeps a mistyped path (a checkpoint,
# /dev/zero) from being read into memory.
MAX_SPEC_BYTES = 1 << 20
# torch.manual_seed takes an unsigned 64-bit number; larger seeds would fail mid-run.
MAX_SEED = 2**64 - 1
# Keys whose values are the user's own business (passed to their factory untouched).
_FREE_FORM: tuple[KeyPath, ...] = (("model", "kwargs"),)

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_STR_TAG = "tag:yaml.org,2002:str"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_REQUIRED = ("version", "name", "model", "data")


@dataclass(frozen=True)
class _Mark:
    line: int  # 1-based
    column: int  # 0-based, where the caret goes


class _SpecLoader(yaml.SafeLoader):
    """A SafeLoader that builds plain data itself, so it knows the key path of every node.

    PyYAML's constructors never learn where in the document a value sits, so the node graph
    is walked here instead, recording the line of each mapping key and sequence item and
    counting what aliases expand to.
    """

    def __init__(self, text: str, display: str) -> None:
        super().__init__(text)
        self._spec_text = text
        self.display = display
        self.key_marks: dict[KeyPath, _Mark] = {(): _Mark(1, 0)}
        self._aliases = 0
        self._composed = 0
        self._expanded = 0
        self._depth = 0

    # ----------------------------------------------------------------- composing
    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                event = self.peek_event()
                raise self._error(
                    event.start_mark,
                    f"uses more than {MAX_ALIASES} YAML aliases (*name); "
                    "an audit spec needs few, write the values out",
                )
            return super().compose_node(parent, index)
        self._composed += 1
        self._depth += 1
        try:
            if self._composed > MAX_NODES or self._depth > MAX_DEPTH:
                event = self.peek_event()
                raise self._error(
                    event.start_mark,
                    f"is too large for an audit spec (more than {MAX_NODES} values "
                    f"or {MAX_DEPTH} levels of nesting)",
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_single(self) -> yaml.Node | None:
        """Like ``get_single_node``, but a second document is a ``SpecError`` with its line."""
        self.get_event()  # StreamStartEvent
        node = None
        if not self.check_event(yaml.StreamEndEvent):
            node = self.compose_document()
        if not self.check_event(yaml.StreamEndEvent):
            event = self.get_event()
            raise self._error(
                event.start_mark,
                "holds more than one YAML document (a second '---'); "
                "an audit spec is one document, put other specs in their own files",
            )
        self.get_event()
        return node

    # ----------------------------------------------------------------- building data
    def build(
        self, node: yaml.Node, path: KeyPath = (), active: frozenset[int] = frozenset()
    ) -> Any:
        """Plain Python data for ``node``, recording the mark of every key path below it."""
        self._expanded += 1
        if self._expanded > MAX_NODES:
            raise self._error(
                node.start_mark,
                f"expands to more than {MAX_NODES} values through YAML aliases "
                "(an alias bomb?); write the values out",
            )
        if id(node) in active:
            raise self._error(node.start_mark, "a YAML alias refers to itself")
        if isinstance(node, yaml.MappingNode):
            return self._build_mapping(node, path, active | {id(node)})
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                raise self._unsupported_tag(node, path)
            items = []
            for index, item in enumerate(node.value):
                self.key_marks[(*path, index)] = _Mark(
                    item.start_mark.line + 1, item.start_mark.column
                )
                items.append(self.build(item, (*path, index), active | {id(node)}))
            return items
        try:
            return self.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise self._error(
                node.start_mark, f"cannot read this value: {exc.problem}", path
            ) from None
        except (ValueError, TypeError, AttributeError, OverflowError):
            # SafeConstructor lets int('abc') and friends escape for an explicit `!!int abc`.
            tag = node.tag.rsplit(":", 1)[-1]
            raise self._error(
                node.start_mark, f"cannot read {node.value!r} as {tag}", path
            ) from None

    def _build_mapping(
        self, node: yaml.MappingNode, path: KeyPath, active: frozenset[int]
    ) -> dict[str, Any]:
        if node.tag != _MAP_TAG:
            raise self._unsupported_tag(node, path)
        merged: dict[str, Any] = {}
        explicit: dict[str, Any] = {}
        # '<<: *defaults' keys come first so explicit keys override them, as YAML 1.1 says.
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                continue
            sources = (
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    raise self._error(key_node.start_mark, "'<<' merges mappings only", path)
                if id(source) in active:
                    raise self._error(source.start_mark, "a YAML alias refers to itself")
                merged.update(self._build_mapping(source, path, active | {id(source)}))
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self._key(key_node, path)
            if key in explicit:
                first = self.key_marks[(*path, key)].line
                raise self._error(
                    key_node.start_mark,
                    f"key {key!r} is given twice (first on line {first}); keep one",
                    path,
                )
            self.key_marks[(*path, key)] = _Mark(
                key_node.start_mark.line + 1, key_node.start_mark.column
            )
            explicit[key] = self.build(value_node, (*path, key), active)
        return {**merged, **explicit}

    def _key(self, node: yaml.Node, path: KeyPath) -> str:
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _STR_TAG:
                return str(node.value)
            # YAML 1.1 reads a plain `on:`/`yes:`/`off:` as a boolean; as a key it is a word
            # (`max_fragile_fraction: {value: 0.4, on: adversarial}`).
            if node.tag == _BOOL_TAG and node.style is None:
                return str(node.value)
        shown = node.value if isinstance(node, yaml.ScalarNode) else f"a {node.id}"
        raise self._error(
            node.start_mark,
            f"keys must be words, got {shown}; quote it if it is meant as text",
            path,
        )

    def _unsupported_tag(self, node: yaml.Node, path: KeyPath) -> SpecError:
        return self._error(
            node.start_mark,
            f"unsupported YAML tag {node.tag!r}; an audit spec uses plain mappings and lists",
            path,
        )

    def _error(self, mark: yaml.Mark, problem: str, path: KeyPath = ()) -> SpecError:
        line, key = mark.line + 1, dotted_key(path)
        message = f"{self.display}:{line}: " + (f"{key}: " if key else "") + problem
        snippet = _snippet(self._spec_text, _Mark(line, mark.column))
        message += "\n" + snippet if snippet else ""
        return SpecError(message, path=self.display, line=line, key=path)


# PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; read it as the number people mean,
# so it is a float inside `model.kwargs` too, not only where pydantic coerces it.
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


# --------------------------------------------------------------------------- public API
def load_spec(path: str | os.PathLike[str]) -> AuditSpec:
    """Read, parse and validate the audit spec at ``path``; any user mistake is a ``SpecError``."""
    display = os.fspath(path)
    file = Path(display)
    try:
        info = file.stat()
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(info.st_mode):
            raise SpecError(
                f"{display}: is not a regular file (a device, pipe or socket); "
                "pass an audit spec (.yaml file)",
                path=display,
            )
        if info.st_size > MAX_SPEC_BYTES:
            raise SpecError(
                f"{display}: is {info.st_size:,} bytes, too large for an audit spec (at most "
                f"{MAX_SPEC_BYTES:,}); is this the right file?",
                path=display,
            )
        with file.open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(
            f"{display}: no such audit spec; check the path (relative to {Path.cwd()}) "
            "or write one with 'inferlink-audit init'",
            path=display,
        ) from None
    except IsADirectoryError:
        raise SpecError(
            f"{display}: is a folder, not an audit spec; pass one .yaml file", path=display
        ) from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError(
            f"{display}: cannot read the audit spec ({reason}); check the path and its permissions",
            path=display,
        ) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(
            f"{display}: is larger than {MAX_SPEC_BYTES:,} bytes, too large for an audit spec; "
            "is this the right file?",
            path=display,
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(
            f"{display}:{line}: is not UTF-8 text (byte {exc.start}); save the spec as UTF-8",
            path=display,
            line=line,
        ) from None
    return parse_spec(text, path=file)


def parse_spec(text: str, *, path: Path) -> AuditSpec:
    """Parse and validate spec ``text``; ``path`` names it in messages and anchors relative
    paths."""
    display = os.fspath(path)
    data, marks = _parse_yaml(text, display)
    try:
        spec = AuditSpec.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, data, marks, text, display) from None

    _check_values(spec, marks, text, display)
    source_path = Path(os.path.abspath(path))
    spec = _resolve_paths(spec, source_path.parent)
    _check_files_exist(spec, marks, text, display)
    spec._source_path = source_path
    spec._positions = {key: mark.line for key, mark in marks.items()}
    spec._sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return spec


# --------------------------------------------------------------------------- YAML
def _parse_yaml(text: str, display: str) -> tuple[dict[str, Any], dict[KeyPath, _Mark]]:
    try:
        loader = _SpecLoader(text, display)
    except yaml.reader.ReaderError as exc:
        raise _unprintable(exc, text, display) from None
    try:
        node = loader.compose_single()
        data = loader.build(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, text, display) from None
    except yaml.reader.ReaderError as exc:
        raise _unprintable(exc, text, display) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{display}: cannot read YAML: {exc}", path=display) from None
    finally:
        loader.dispose()
    if data is None:
        raise SpecError(
            f"{display}: is empty; an audit spec needs at least {', '.join(_REQUIRED)} "
            "('inferlink-audit init' writes a starter spec)",
            path=display,
        )
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the value {data!r}"
        line = node.start_mark.line + 1 if node is not None else 1
        raise SpecError(
            f"{display}:{line}: an audit spec is a YAML mapping of keys "
            f"({', '.join(_REQUIRED)}, ...), but this file holds {kind}",
            path=display,
            line=line,
        )
    return data, loader.key_marks


def _unprintable(exc: yaml.reader.ReaderError, text: str, display: str) -> SpecError:
    """YAML refuses control characters (NUL, escape, ...) anywhere in the text."""
    position = max(0, min(int(exc.position), len(text)))
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1)
    character = exc.character if isinstance(exc.character, int) else 0
    message = (
        f"{display}:{line}:{column + 1}: contains the control character U+{character:04X}, "
        'which YAML does not allow; remove it (write it as an escape such as "\\t" inside '
        "double quotes if it is meant)"
    )
    snippet = _snippet(text, _Mark(line, column))
    return SpecError(message + ("\n" + snippet if snippet else ""), path=display, line=line)


def _syntax_error(exc: yaml.MarkedYAMLError, text: str, display: str) -> SpecError:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or "invalid YAML"
    if exc.context and exc.context_mark is not None and exc.problem_mark is not None:
        problem += f" ({exc.context} on line {exc.context_mark.line + 1})"
    elif exc.context:
        problem = f"{exc.context}: {problem}"
    if mark is None:
        return SpecError(f"{display}: YAML syntax error: {problem}", path=display)
    line, column = mark.line + 1, mark.column
    message = f"{display}:{line}:{column + 1}: YAML syntax error: {problem}"
    snippet = _snippet(text, _Mark(line, column))
    return SpecError(message + ("\n" + snippet if snippet else ""), path=display, line=line)


# --------------------------------------------------------------------------- validation errors
@dataclass
class _Problem:
    path: KeyPath
    text: str
    got: str | None = None  # appended as ", got X"; kept apart so union branches can share it

    def render(self) -> str:
        return self.text + (f", got {self.got}" if self.got is not None else "")


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "path_type": "a path (a string)",
    "none_required": "nothing (null)",
}
_BOUNDS = {
    "greater_than": ("gt", "greater than"),
    "greater_than_equal": ("ge", "at least"),
    "less_than": ("lt", "less than"),
    "less_than_equal": ("le", "at most"),
}


def _validation_error(
    exc: ValidationError,
    data: dict[str, Any],
    marks: dict[KeyPath, _Mark],
    text: str,
    display: str,
) -> SpecError:
    problems: list[_Problem] = []
    for error in exc.errors(include_url=False):
        problem = _describe(error, data, marks)
        last = problems[-1] if problems else None
        # A value that fits no branch of a union (lbfgs target: 'next' | 'random' | int)
        # yields one error per branch; say it once, with every accepted form.
        if last is not None and last.path == problem.path and last.got == problem.got:
            if problem.text not in last.text:
                last.text += ", or " + problem.text.removeprefix("expected ")
            continue
        problems.append(problem)
    return _problems_error(problems, marks, text, display)


def _describe(error: Any, data: dict[str, Any], marks: dict[KeyPath, _Mark]) -> _Problem:
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    path = _document_path(tuple(error["loc"]), data, kind)
    got = _show(value)
    if kind == "missing":
        if path and isinstance(path[-1], int):
            return _Problem(path[:-1], f"too few items (nothing at index {path[-1]})")
        return _Problem(path, "required key missing")
    if kind == "extra_forbidden":
        return _Problem(path, _unknown_key(path))
    if kind in ("value_error", "assertion_error"):
        message = str(error["msg"])
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        return _Problem(_mentioned_key(path, message, marks), message)
    if kind in _EXPECTED:
        return _Problem(path, f"expected {_EXPECTED[kind]}", got)
    if kind == "literal_error":
        return _Problem(path, f"expected {ctx.get('expected', 'one of the listed values')}", got)
    if kind in _BOUNDS:
        name, words = _BOUNDS[kind]
        return _Problem(path, f"must be {words} {_number(ctx.get(name))}", got)
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return _Problem(path, "must not be empty")
    if kind in ("too_short", "string_too_short"):
        unit = "characters" if kind.startswith("string") else "items"
        return _Problem(path, f"needs at least {ctx.get('min_length')} {unit}", _count(value))
    if kind in ("too_long", "string_too_long"):
        unit = "characters" if kind.startswith("string") else "items"
        return _Problem(path, f"takes at most {ctx.get('max_length')} {unit}", _count(value))
    message = str(error["msg"])
    return _Problem(path, message[:1].lower() + message[1:], got)


def _document_path(loc: KeyPath, data: Any, kind: str) -> KeyPath:
    """The part of a pydantic ``loc`` that names keys of the YAML document.

    pydantic puts union branches and validator names into ``loc`` (``constrained-int``,
    ``literal['next','random']``); walking the data alongside keeps only real keys.
    """
    path: list[str | int] = []
    current: Any = data
    for index, part in enumerate(loc):
        in_mapping = isinstance(current, dict) and isinstance(part, str) and part in current
        in_list = isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        if in_mapping or in_list:
            current = current[part]
        elif kind == "missing" and index == len(loc) - 1 and isinstance(current, dict | list):
            current = None
        else:
            continue
        path.append(part)
    return tuple(path)


def _unknown_key(path: KeyPath) -> str:
    model = _model_at(path[:-1])
    if model is None or not isinstance(path[-1], str):
        return "unknown key"
    valid = list(model.model_fields)
    close = difflib.get_close_matches(path[-1], valid, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; valid keys here: {', '.join(valid)}"


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``path`` of the document, if any."""
    annotation: Any = AuditSpec
    for part in path:
        annotation = _unwrap(annotation)
        if isinstance(part, int):
            if get_origin(annotation) in (Union, types.UnionType):
                # one value or a list of mappings (min_adversarial_accuracy): the list's items
                lists = [a for a in map(_unwrap, get_args(annotation)) if get_origin(a) is list]
                annotation = lists[0] if len(lists) == 1 else annotation
            origin, args = get_origin(annotation), get_args(annotation)
            if origin is list and args:
                annotation = args[0]
            elif origin is tuple and part < len(args):
                annotation = args[part]
            else:
                return None
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        else:
            return None
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated[...]`` and ``X | None`` down to the one type a mapping would match."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or origin is types.UnionType:
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            if len(members) == 1:
                annotation = members[0]
            elif len(models) == 1:
                annotation = models[0]
            else:
                return annotation
        else:
            return annotation


def _mentioned_key(path: KeyPath, message: str, marks: dict[KeyPath, _Mark]) -> KeyPath:
    """Point a model validator's error at a key its message names, rather than the mapping.

    A validator on the whole spec reports at the document root (line 1); its message names
    the keys involved (``add 'local' to filtering.scopes``), and the first of those the file
    has is the better line to show.
    """
    words = re.findall(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", message)
    for word in (w for w in words if "." in w):
        parts = tuple(word.split("."))
        for candidate in ((*path, *parts), parts):
            if candidate in marks:
                return candidate
    for word in (w for w in words if "." not in w):
        if (*path, word) in marks:
            return (*path, word)
    return path


def _check_files_exist(
    spec: AuditSpec, marks: dict[KeyPath, _Mark], text: str, display: str
) -> None:
    """Regression inputs are cheap to check now and have a line to point at; models and data
    are checked by their loaders, which can say more."""
    files: list[tuple[KeyPath, Path]] = []
    if spec.baseline is not None:
        files.append((("baseline",), spec.baseline))
    files.extend((("compare", index), path) for index, path in enumerate(spec.compare))
    for key_path, file in files:
        try:
            if file.is_file():
                continue
            problem = "is a folder, not a file" if file.is_dir() else "file not found"
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problem = f"cannot be read ({reason})"
        mark = _mark_of(key_path, marks)
        key = dotted_key(key_path)
        message = (
            f"{display}:{mark.line}: {key}: {problem}: {file} "
            "(relative paths start at the spec's folder)"
        )
        snippet = _snippet(text, mark)
        raise SpecError(
            message + ("\n" + snippet if snippet else ""),
            path=display,
            line=mark.line,
            key=key_path,
        )


def _check_values(spec: AuditSpec, marks: dict[KeyPath, _Mark], text: str, display: str) -> None:
    """What the pydantic models accept but a run could not use: NaN or infinite numbers,
    NUL bytes in text, a ``~user`` that does not exist, a seed torch cannot take, a name
    with control characters (it is printed to terminals and used in report titles).

    Every such problem is reported at once, in file order, like validation errors.
    """
    problems: list[_Problem] = []

    def walk(value: Any, key_path: KeyPath) -> None:
        if key_path in _FREE_FORM:
            return
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), (*key_path, name))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*key_path, str(key)))
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                walk(item, (*key_path, index))
        elif isinstance(value, float) and not math.isfinite(value):
            hint = (
                "leave the key out to not check it"
                if key_path[:1] == ("checks",)
                else "give a finite number"
            )
            problems.append(
                _Problem(key_path, f"is {value}; numbers in an audit spec must be finite ({hint})")
            )
        elif isinstance(value, str | Path):
            shown = os.fspath(value)
            if "\x00" in shown:
                problems.append(_Problem(key_path, "contains a NUL character; remove it"))
            elif isinstance(value, Path) and shown.startswith("~"):
                try:
                    value.expanduser()
                except RuntimeError:
                    problems.append(
                        _Problem(
                            key_path,
                            f"cannot expand {shown.split('/')[0]!r}: no such user's home "
                            "folder; write the path out",
                        )
                    )

    walk(spec, ())
    if spec.seed > MAX_SEED:
        problems.append(
            _Problem(("seed",), f"must be at most {MAX_SEED} (2**64 - 1), got {spec.seed}")
        )
    bad = sorted(
        {
            f"U+{ord(char):04X}"
            for char in spec.name
            if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")
        }
    )
    if bad and "\x00" not in spec.name:
        problems.append(
            _Problem(
                ("name",),
                f"contains control or invisible characters ({', '.join(bad[:5])}); "
                "a name is one line of printable text",
            )
        )
    if problems:
        raise _problems_error(problems, marks, text, display)


def _problems_error(
    problems: list[_Problem], marks: dict[KeyPath, _Mark], text: str, display: str
) -> SpecError:
    """One ``SpecError`` listing ``problems`` in file order, each as ``file:line: key: ...``."""
    located = sorted(
        enumerate(problems), key=lambda pair: (_mark_of(pair[1].path, marks).line, pair[0])
    )
    lines: list[str] = []
    for shown, (_, problem) in enumerate(located[:MAX_PROBLEMS]):
        mark = _mark_of(problem.path, marks)
        key = dotted_key(problem.path)
        lines.append(f"{display}:{mark.line}: " + (f"{key}: " if key else "") + problem.render())
        if shown < MAX_SNIPPETS and _has_key_mark(problem.path, marks):
            snippet = _snippet(text, mark)
            if snippet:
                lines.append(snippet)
    if len(located) > MAX_PROBLEMS:
        lines.append(f"... and {len(located) - MAX_PROBLEMS} more problems")
    first = located[0][1]
    return SpecError(
        "\n".join(lines),
        path=display,
        line=_mark_of(first.path, marks).line,
        key=first.path,
    )


@contextmanager
def located_errors(
    spec: AuditSpec, key: KeyPath | Callable[[AuditError], KeyPath] = ()
) -> Iterator[None]:
    """Place a loader's error in ``spec``, so its message starts ``spec:line: key:``.

    Model, data and device errors are found after the spec was validated, by code that knows
    the file it read but not which spec and line asked for it. The error's own key names the
    spec key responsible; ``key`` (or a function of the error that picks it) stands in for
    errors raised without one.
    """
    try:
        yield
    except SpecError:
        raise
    except AuditError as exc:
        if exc.location is None:
            if not exc.key_path:
                exc.key_path = key(exc) if callable(key) else key
            exc.location = spec_location(spec, exc.key_path)
        raise


def spec_location(spec: AuditSpec, key_path: KeyPath) -> Location:
    """The spec's file and the line of ``key_path`` (None when the file does not set it)."""
    display = os.fspath(spec.source_path) if spec.source_path is not None else ""
    line = spec._positions.get(key_path) if key_path else None
    return Location(display, line)


def locate_message(spec: AuditSpec, key_path: KeyPath, message: str) -> str:
    """``spec.yaml:LINE: key: message`` (the line only when the file sets that key)."""
    return spec_location(spec, key_path).prefix(key_path, message)


# --------------------------------------------------------------------------- paths
def _resolve_paths(spec: AuditSpec, spec_dir: Path) -> AuditSpec:
    """Anchor relative paths at the spec's folder, so a spec runs the same from any cwd."""

    def fix(path: Path | None) -> Path | None:
        if path is None:
            return None
        path = path.expanduser()
        return path if path.is_absolute() else Path(os.path.normpath(spec_dir / path))

    def changes(model: BaseModel, *names: str) -> dict[str, Any]:
        # Only touch fields that hold a path, so model_fields_set still says what the file set.
        return {
            name: fix(getattr(model, name)) for name in names if getattr(model, name) is not None
        }

    train = spec.data.train
    if train is not None:
        train = train.model_copy(update=changes(train, "path", "root"))
    data_update = changes(spec.data, "path", "root")
    if train is not None:
        data_update["train"] = train
    update: dict[str, Any] = {
        "model": spec.model.model_copy(update=changes(spec.model, "checkpoint")),
        "data": spec.data.model_copy(update=data_update),
        "report": spec.report.model_copy(update=changes(spec.report, "dir")),
        **changes(spec, "baseline"),
    }
    if spec.compare:
        update["compare"] = [fix(path) for path in spec.compare]
    return spec.model_copy(update=update)


# --------------------------------------------------------------------------- formatting
def _mark_of(path: KeyPath, marks: dict[KeyPath, _Mark]) -> _Mark:
    """The mark of ``path`` or of its nearest ancestor the file has (a missing key: its parent)."""
    while path not in marks:
        path = path[:-1]
    return marks[path]


def _has_key_mark(path: KeyPath, marks: dict[KeyPath, _Mark]) -> bool:
    while path and path not in marks:
        path = path[:-1]
    return bool(path)


def _snippet(text: str, mark: _Mark) -> str:
    """The offending line with a caret under the key, as Tavern and Dagster show it.

    Lines are split where YAML splits them, and control characters are shown as ``?`` (a
    tab as a space), so the caret stays under its column and a hostile file cannot send
    escape sequences to the terminal that shows the error.
    """
    source = _YAML_LINE_BREAK.split(text)
    if not 1 <= mark.line <= len(source):
        return ""
    line = "".join(
        " " if char == "\t" else "?" if unicodedata.category(char) in ("Cc", "Cf") else char
        for char in source[mark.line - 1].rstrip()
    )
    gutter = f"{mark.line:>5} | "
    caret = " " * (len(gutter) - 2) + "| " + " " * mark.column + "^"
    return f"{gutter}{line}\n{caret}"


_YAML_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def _show(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _count(value: Any) -> str | None:
    try:
        return str(len(value))
    except TypeError:
        return None


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
