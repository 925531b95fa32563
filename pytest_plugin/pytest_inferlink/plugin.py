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

import pytest

from .items import MARKER, SpecFile
from .runner import AuditPlugin
from .stash import PLUGIN_KEY

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
    "configured_specs",
]

GROUP = "inferlink"
OPTION_AUDIT = "--inferlink-audit"
OPTION_REPORT = "--inferlink-report"
OPTION_DEVICE = "--inferlink-device"
INI_AUDIT = "inferlink_audit"
INI_REPORT = "inferlink_report"
INI_DEVICE = "inferlink_device"
DEFAULT_REPORT_DIR = "inferlink-report"
SPEC_SUFFIXES = (".yaml", ".yml")

_PLUGIN_NAME = "inferlink-audit"
_XDIST_PLUGIN_NAME = "inferlink-audit-xdist"


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
    parser.addini(INI_DEVICE, type="string", default="", help="device for every audit spec.")


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
    plugin = AuditPlugin(config, specs, report_dir=_report_dir(config), device=_device(config))
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


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = config.stash.get(PLUGIN_KEY, None)
    if plugin is not None:
        del config.stash[PLUGIN_KEY]
        config.pluginmanager.unregister(plugin)
        xdist_hooks = config.pluginmanager.get_plugin(_XDIST_PLUGIN_NAME)
        if xdist_hooks is not None:
            config.pluginmanager.unregister(xdist_hooks)
