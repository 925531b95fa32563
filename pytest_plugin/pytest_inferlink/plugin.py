"""The ``pytest11`` entry point: options, and the audit plugin registered when specs are given.

This module is imported by every pytest run in an environment where inferlink-audit is
installed, ``pytest --help`` included, so it imports nothing heavy: torch and the library
are imported only once a spec is collected (``items``) or an item runs (``runner``).

The life cycle follows pytest's own report plugins (``junitxml``): options in one group,
an ``AuditPlugin`` object registered in ``pytest_configure`` only when specs are configured,
kept in ``config.stash`` and unregistered in ``pytest_unconfigure``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .items import MARKER, CheckItem, SpecFile
from .progress import INI_PROGRESS_AFTER
from .runner import AuditPlugin
from .stash import PLUGIN_KEY

if TYPE_CHECKING:
    from inferlink_audit.shards import Shard

__all__ = [
    "DEFAULT_REPORT_DIR",
    "GROUP",
    "INI_AUDIT",
    "INI_DEVICE",
    "INI_REPORT",
    "MARKER",
    "OPTION_AUDIT",
    "OPTION_DEVICE",
    "OPTION_REPORT",
    "OPTION_SHARD",
    "configured_specs",
]

GROUP = "inferlink"
OPTION_AUDIT = "--inferlink-audit"
OPTION_REPORT = "--inferlink-report"
OPTION_DEVICE = "--inferlink-device"
OPTION_SHARD = "--inferlink-shard"
INI_AUDIT = "inferlink_audit"
INI_REPORT = "inferlink_report"
INI_DEVICE = "inferlink_device"
INI_SHARD = "inferlink_shard"
DEFAULT_REPORT_DIR = "inferlink-report"
SPEC_SUFFIXES = (".yaml", ".yml")

_PLUGIN_NAME = "inferlink-audit"
_XDIST_PLUGIN_NAME = "inferlink-audit-xdist"
_SHARD_KEY: pytest.StashKey[Shard] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP, "inferlink-audit: robustness gates for PyTorch classifiers")
    group.addoption(
        OPTION_AUDIT,
        action="append",
        dest="inferlink_audit",
        default=None,
        metavar="PATH",
        help="audit spec (YAML) or a folder of *.yaml/*.yml specs to run as test items; "
        "repeatable. Without positional paths, the specs are the whole run.",
    )
    group.addoption(
        OPTION_REPORT,
        dest="inferlink_report",
        default=None,
        metavar="DIR",
        help=f"where results.json and report.html go (default: {DEFAULT_REPORT_DIR}).",
    )
    group.addoption(
        OPTION_DEVICE,
        dest="inferlink_device",
        default=None,
        metavar="DEVICE",
        help="override the specs' device: auto, cpu, cuda, cuda:N, xla.",
    )
    parser.addini(
        INI_AUDIT,
        type="linelist",
        default=[],
        help="audit specs (or folders of specs) added to every run, relative to the rootdir.",
    )
    parser.addini(
        INI_REPORT, type="string", default="", help="report folder, relative to the rootdir."
    )
    group.addoption(
        OPTION_SHARD,
        dest="inferlink_shard",
        default=None,
        metavar="I/N",
        help="run shard I of N: each spec's items of a deterministic share of its sweeps, "
        "balanced by estimated cost as 'inferlink-audit run --shard' splits them (model-wide "
        "checks in shard 1); writes each spec's shard results.json for 'inferlink-audit merge'.",
    )
    parser.addini(INI_DEVICE, type="string", default="", help="device for every audit spec.")
    parser.addini(
        INI_PROGRESS_AFTER,
        type="string",
        default="",
        help="seconds after which a running sweep, attack or other long step shows its "
        "progress (live on a terminal, one line when it ends in CI logs); default 3, 0: all.",
    )
    parser.addini(INI_SHARD, type="string", default="", help="shard I/N of the audit items.")


def configured_specs(config: pytest.Config) -> list[Path]:
    """The spec files to audit, absolute, in the order given (folders expanded, sorted).

    Command-line paths are relative to the invocation directory and replace the ini list,
    whose paths are relative to the rootdir, as ``testpaths`` are.
    """
    given: list[str] = config.getoption("inferlink_audit") or []
    base, source = config.invocation_params.dir, OPTION_AUDIT
    if not given:
        given = [str(p) for p in config.getini(INI_AUDIT)]
        base, source = config.rootpath, f"{INI_AUDIT} (ini)"
    specs: list[Path] = []
    for raw in given:
        path = Path(raw).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in SPEC_SUFFIXES and p.is_file())
            if not found:
                raise pytest.UsageError(f"{source} {raw}: the folder holds no *.yaml spec")
            specs.extend(found)
        elif path.is_file():
            specs.append(path)
        else:
            raise pytest.UsageError(f"{source} {raw}: no such file or folder")
    return list(dict.fromkeys(_with_compared(specs)))


def _with_compared(specs: list[Path]) -> list[Path]:
    """Each spec followed by the specs its ``compare:`` names: they are audited too.

    A spec that does not load is left for collection to report, with its line and key.
    """
    from inferlink_audit.errors import AuditError
    from inferlink_audit.spec_loader import load_spec

    expanded: list[Path] = []
    for path in specs:
        expanded.append(path)
        try:
            expanded.extend(p.resolve() for p in load_spec(path).compare)
        except AuditError:
            continue
    return expanded


def _report_dir(config: pytest.Config) -> Path:
    option = config.getoption("inferlink_report")
    if option:
        return (config.invocation_params.dir / Path(option).expanduser()).resolve()
    ini = str(config.getini(INI_REPORT) or "")
    if ini:
        return (config.rootpath / Path(ini).expanduser()).resolve()
    return (config.invocation_params.dir / DEFAULT_REPORT_DIR).resolve()


def _device(config: pytest.Config) -> str | None:
    return config.getoption("inferlink_device") or str(config.getini(INI_DEVICE) or "") or None


def pytest_configure(config: pytest.Config) -> None:
    specs = configured_specs(config)
    if not specs:
        return
    config.addinivalue_line("markers", f"{MARKER}: an inferlink-audit check from an audit spec")
    if config.getoption("inferlink_audit") and config.args_source != pytest.Config.ArgsSource.ARGS:
        # `pytest --inferlink-audit audit.yaml`: the audit is the run, not testpaths as well.
        config.args = [str(p) for p in specs]
        config.args_source = pytest.Config.ArgsSource.ARGS  # so the header does not claim testpaths
    else:
        # Overlapping arguments (a spec inside a folder given positionally) are collected
        # once: pytest normalises them unless --keep-duplicates.
        config.args = [*config.args, *(str(p) for p in specs if str(p) not in config.args)]
    shard_text = config.getoption("inferlink_shard") or str(config.getini(INI_SHARD) or "")
    if shard_text:
        from inferlink_audit.shards import ShardError, parse_shard

        try:
            config.stash[_SHARD_KEY] = parse_shard(shard_text, OPTION_SHARD)
        except ShardError as exc:
            raise pytest.UsageError(str(exc)) from None
    plugin = AuditPlugin(config, specs, report_dir=_report_dir(config), device=_device(config))
    plugin.shard = config.stash.get(_SHARD_KEY, None)
    config.stash[PLUGIN_KEY] = plugin
    config.pluginmanager.register(plugin, _PLUGIN_NAME)
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        from .scheduling import XdistHooks

        config.pluginmanager.register(XdistHooks(specs), _XDIST_PLUGIN_NAME)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> SpecFile | None:
    """A configured spec becomes a ``SpecFile``; this module joins ``items`` and ``runner``."""
    plugin = parent.config.stash.get(PLUGIN_KEY, None)
    if plugin is None or not plugin.is_spec(file_path):
        return None
    return SpecFile.from_parent(parent, path=file_path)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With a shard, keep each spec's items of the sweep groups that spec's own plan gives
    this shard (the plan of ``inferlink-audit run SPEC --shard I/N``) and, in shard 1, its
    model-wide items; deselect the rest. Kept items carry a ``shard`` JUnit property.

    First among the hooks, so ``-k`` or a reordering plugin cannot change the plan."""
    shard = config.stash.get(_SHARD_KEY, None)
    if shard is None:
        return
    from inferlink_audit.shards import ShardError, refuse_unsplittable, shard_of_spec

    audit_items = [item for item in items if isinstance(item, CheckItem)]
    groups: dict[Path, set[tuple[str, str]]] = {}
    for item in audit_items:
        spec_file = item.spec_file
        if spec_file.path not in groups:
            try:
                refuse_unsplittable(spec_file.spec, OPTION_SHARD)
            except ShardError as exc:
                raise pytest.UsageError(str(exc)) from None
            groups[spec_file.path] = set(shard_of_spec(spec_file.spec, shard))

    def kept(item: CheckItem) -> bool:
        planned = item.planned
        if planned.filter is None:
            return shard.index == 1
        return (planned.filter, planned.attack or "") in groups[item.spec_file.path]

    deselected = [item for item in audit_items if not kept(item)]
    for item in audit_items:
        item.user_properties.append(("shard", str(shard)))
    if deselected:
        dropped = set(map(id, deselected))
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if id(item) not in dropped]


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = config.stash.get(PLUGIN_KEY, None)
    if plugin is not None:
        del config.stash[PLUGIN_KEY]
        config.pluginmanager.unregister(plugin)
        xdist_hooks = config.pluginmanager.get_plugin(_XDIST_PLUGIN_NAME)
        if xdist_hooks is not None:
            config.pluginmanager.unregister(xdist_hooks)
