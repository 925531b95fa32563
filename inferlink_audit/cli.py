"""``inferlink-audit``: the same engine and checks as the pytest plugin, without pytest.

Exit codes (README): 0 every check passed, 1 a check failed, 2 a usage or input error.
User mistakes print one paragraph and no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from . import __version__
from .errors import AuditError, OutputError, SpecError

if TYPE_CHECKING:
    from .distributed import Ranks
    from .spec import AuditSpec

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
# 128 + signal number, as a shell reports a process ended by that signal.
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferlink-audit",
        description="Audit a PyTorch classifier's robustness: synaptic filtering and attacks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run the audit a spec describes; write results.json and report.html"
    )
    run.add_argument("spec", type=Path, help="the audit spec (YAML)")
    run.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the spec's report.dir)"
    )
    run.add_argument(
        "--device",
        default=None,
        help="override the spec's device (auto, cpu, cuda, cuda:N, xla, mps)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    run.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    run.add_argument(
        "--shard",
        metavar="I/N",
        default=None,
        help="run shard I of N (a share of the sweeps, balanced by cost) and write its "
        "results.json only; join the N shards with 'inferlink-audit merge'",
    )
    run.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep finished sweeps in DIR and reuse them (keyed by checkpoint, data, spec and "
        "versions), e.g. a folder a CI cache restores",
    )
    init = sub.add_parser(
        "init",
        help="write a starter spec; with a model, checkpoint and data, fill the layers and "
        "estimate the cost",
    )
    init.add_argument(
        "path",
        type=Path,
        nargs="?",
        default=Path("audit.yaml"),
        help="the spec to write (default: audit.yaml)",
    )
    init.add_argument("--name", default="my-model", help="the spec's name (default: my-model)")
    init.add_argument(
        "--factory",
        help='module.path:Name, file.py:Name (next to the spec), "torchvision: resnet18" or '
        '"torchscript: model.pt"',
    )
    init.add_argument(
        "--kwargs", help='the factory\'s arguments: "num_classes: 10" or num_classes=10'
    )
    init.add_argument("--checkpoint", help="the weights: .safetensors, .pt, .pth, .ckpt")
    init.add_argument(
        "--data",
        help="(paths relative to the current folder) the test set: a .pt dict {x, y} or .npz, "
        "an image folder, sklearn_digits, or "
        "NAME:ROOT (CIFAR10:~/datasets)",
    )
    init.add_argument(
        "--input-range",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        default=(0.0, 1.0),
        help="the inputs' box, before normalisation; attacks' eps is in its units (default 0 1)",
    )
    init.add_argument(
        "--normalize",
        nargs=2,
        metavar=("MEAN", "STD"),
        help="per-channel, comma-separated: --normalize 0.485,0.456,0.406 0.229,0.224,0.225",
    )
    init.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, xla, mps")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    schema = sub.add_parser(
        "schema",
        help="print the spec's JSON Schema (editors complete and check keys with it)",
    )
    schema.add_argument(
        "--out", type=Path, default=None, help="write it to this file instead of printing it"
    )
    merge = sub.add_parser("merge", help="one report from several runs' results.json")
    merge.add_argument(
        "results",
        type=Path,
        nargs="+",
        help="results.json files: the N shards of one audit (joined, every check evaluated "
        "again), or whole runs of different models (side by side)",
    )
    merge.add_argument(
        "--out", type=Path, required=True, help="folder for the merged results.json and report"
    )
    merge.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    return parser


def _run(args: argparse.Namespace) -> int:
    from .spec_loader import load_spec, locate_message

    # The spec first: a mistake in it is reported before torch is imported (seconds).
    spec = load_spec(args.spec)
    shard = None
    if args.shard is not None:
        from .shards import parse_shard

        shard = parse_shard(args.shard)
    ranks = _join_torchrun(args, spec, shard)
    try:
        from tqdm.auto import tqdm

        from .audit import run_audit
        from .devices import out_of_memory_as_error
        from .progress import TqdmProgress, reset_progress, set_progress
        from .report import render_report
        from .results import write_results
        from .summary import text_summary

        out = Path(args.out if args.out is not None else spec.report.dir)
        # Checked before any work, and without creating anything: a run that cannot write its
        # results fails now, not after the sweeps.
        _check_output_folder(out, "--out" if args.out is not None else "report.dir")
        _refuse_overwriting_inputs(spec, out)
        _check_baseline(spec)
        rank0 = ranks is None or ranks.rank == 0
        show_progress = not args.quiet and sys.stderr.isatty() and rank0
        bar = tqdm(
            desc=f"audit {spec.name}", unit="variant", disable=not show_progress, leave=False
        )
        # Below the run's variant count, a bar per long step: sweep, attack, retraining, bounds.
        steps = TqdmProgress(disable=not show_progress, first_position=1)
        steps_token = set_progress(steps)
        oom = out_of_memory_as_error(
            batch_size=spec.data.batch_size,
            device=args.device or spec.device,
            where=locate_message(spec, ("data", "batch_size"), "").rstrip(": "),
            examples=spec.data.limit,
        )
        try:
            cache = None
            if args.cache is not None:
                from .cache import DiskSweepCache

                try:
                    args.cache.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise OutputError(
                        f"--cache {args.cache} cannot be created ({exc.strerror or exc}); "
                        "choose another folder."
                    ) from exc
                cache = DiskSweepCache(args.cache)
            device = args.device if ranks is None else ranks.device_name(args.device or spec.device)
            with oom:
                if shard is None:
                    result, _, _ = run_audit(
                        spec,
                        device=device,
                        cache=cache,
                        on_variant=lambda where: bar.update(1),
                        output_dir=out,
                        ranks=ranks,
                    )
                else:
                    from .shards import run_shard

                    result = run_shard(
                        spec,
                        shard,
                        device=args.device,
                        cache=cache,
                        on_variant=lambda where: bar.update(1),
                        output_dir=out,
                    )
        finally:
            steps.close()
            reset_progress(steps_token)
            bar.close()
            if ranks is not None:
                ranks.leave()
        if ranks is not None and ranks.rank != 0:
            return EXIT_PASS  # rank 0 writes and prints the whole audit's results
        try:
            results_path = write_results(result, out / "results.json")
            # A shard's report would show a part of the audit: merge writes the whole one.
            report_path = render_report(result, out) if shard is None else None
        except OSError as exc:
            raise OutputError(
                f"cannot write the results to {out} ({exc.strerror or exc}); free some space or "
                "choose another --out. Files already there are complete (each is replaced whole)."
            ) from exc
    except SpecError:
        raise
    except AuditError as exc:
        _name_the_spec(exc, spec, args.spec)
        raise
    if shard is not None:
        from .shards import shard_note

        info = result.meta["shard"]
        note = shard_note(shard, len(info["sweeps"]), len(info["all_sweeps"]))
        print(f"{note}; results: {results_path}")
        return EXIT_PASS if result.passed else EXIT_FAIL
    if not args.quiet:
        print(text_summary(result))
    print(f"results: {results_path}\nreport:  {report_path}")
    return EXIT_PASS if result.passed else EXIT_FAIL


def _join_torchrun(args: argparse.Namespace, spec: AuditSpec, shard: object) -> Ranks | None:
    """Under torchrun, this process's rank in the process group (README, "Several
    processes"); None in a plain run, which never imports torch.distributed."""
    from .distributed import join, launched, refuse_unsplittable

    if not launched():
        return None
    if shard is not None:
        raise AuditError(
            "--shard splits the sweeps over CI jobs and torchrun splits the test set over "
            "processes; use one of them: drop --shard, or run the shard without torchrun."
        )
    refuse_unsplittable(spec)
    ranks = join(args.device or spec.device)
    args.joined = True  # from now on an error may be this rank's own: every rank reports it
    return ranks


def _name_the_spec(exc: AuditError, spec: AuditSpec, given: Path) -> None:
    """Every message names the spec it came from (the loaders only know their own file)."""
    message = str(exc)
    names = {str(given), str(spec.source_path or given)}
    if not any(name and name in message for name in names):
        exc.args = (f"{given}: {message}",)


def _check_baseline(spec: AuditSpec) -> None:
    """Read the baseline now: a wrong file stops the run before the sweeps, not after them."""
    from .results import read_results
    from .spec_loader import locate_message

    if spec.baseline is None:
        return
    try:
        read_results(spec.baseline)  # its errors name the file
    except AuditError as exc:
        problem = str(exc)
    else:
        return
    raise AuditError(
        locate_message(
            spec,
            ("baseline",),
            f"{problem.splitlines()[0]}; point baseline at the results.json of the released "
            "model's audit.",
        )
    )


def _check_output_folder(out: Path, option: str) -> None:
    """Refuse an output folder that is a file or cannot be created or written, creating nothing."""
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(
            f"{option} {out} is a file, not a folder; choose a folder for results.json and "
            "report.html."
        )
    existing = out
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(
            f"{option} {out} cannot be created: {existing} is not a folder; choose another path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"{option} {out} cannot be written: {existing} is not writable by this user; choose "
            "another folder."
        )


def _refuse_overwriting_inputs(spec: AuditSpec, out: Path) -> None:
    """The audited checkpoint, data and spec are only ever read, whatever --out is."""
    inputs = [spec.source_path, spec.model.checkpoint, spec.data.path, spec.baseline]
    protected = {Path(p).resolve() for p in inputs if p is not None}
    for name in ("results.json", "report.html"):
        target = (out / name).resolve()
        if target in protected:
            raise OutputError(
                f"writing {out / name} would replace {target}, an input of this audit; choose "
                "another --out."
            )


def _init(args: argparse.Namespace) -> int:
    from . import starter
    from .fileio import atomic_write_text
    from .spec_loader import parse_spec

    if args.path.exists() and not args.force:
        raise AuditError(
            f"{args.path} already exists; pass --force to overwrite it or choose another path."
        )
    if args.path.is_dir():
        raise OutputError(f"{args.path} is a folder; give the path of the spec file to write.")
    normalize = None
    if args.normalize is not None:
        normalize = (
            starter.parse_floats(args.normalize[0], "--normalize MEAN"),
            starter.parse_floats(args.normalize[1], "--normalize STD"),
        )
    options = starter.StarterOptions(
        name=args.name,
        factory=args.factory,
        kwargs=starter.parse_kwargs(args.kwargs),
        checkpoint=starter.relative_to_spec(args.checkpoint, args.path),
        data=starter.parse_data(args.data, args.path),
        input_range=(args.input_range[0], args.input_range[1]),
        normalize=normalize,
        device=args.device,
    )
    # A value the spec refuses is reported (file:line: key) and nothing is written.
    spec = parse_spec(starter.render_spec(options), path=args.path)
    try:
        inspection = starter.inspect(spec, options)
    except AuditError as exc:
        raise AuditError(f"{exc}\n{args.path} was not written.") from exc
    text = starter.render_spec(options, inspection.layers)
    parse_spec(text, path=args.path)
    try:
        atomic_write_text(args.path, text)
    except OSError as exc:
        raise OutputError(
            f"cannot write {args.path} ({exc.strerror or exc}); choose another path."
        ) from exc
    for line in inspection.report:
        print(line)
    print(f"wrote {args.path}")
    _write_schema_next_to(args.path)
    if inspection.todo:
        print("still to edit:")
        for item in inspection.todo:
            print(f"  - {item}")
    print(f"then: inferlink-audit run {args.path}")
    return EXIT_PASS


def _schema(args: argparse.Namespace) -> int:
    from .fileio import atomic_write_text
    from .schema import spec_schema_text

    text = spec_schema_text()
    if args.out is None:
        sys.stdout.write(text)
        return EXIT_PASS
    try:
        atomic_write_text(args.out, text)
    except OSError as exc:
        raise OutputError(
            f"cannot write {args.out} ({exc.strerror or exc}); choose another path."
        ) from exc
    print(f"wrote {args.out}")
    return EXIT_PASS


def _write_schema_next_to(spec_path: Path) -> None:
    """The JSON Schema that the spec's first line points editors to, in the spec's folder
    (rewritten only when this version's schema differs from the file there)."""
    from .fileio import atomic_write_text
    from .schema import SCHEMA_FILENAME, spec_schema_text

    path = spec_path.parent / SCHEMA_FILENAME
    text = spec_schema_text()
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return
        atomic_write_text(path, text)
    except OSError as exc:
        raise OutputError(
            f"wrote {spec_path} but not {path}, the schema its first line points editors to "
            f"({exc.strerror or exc}); run 'inferlink-audit schema --out {path}' to write it."
        ) from exc
    print(f"wrote {path} (the schema the spec's first line points editors to)")


def _merge(args: argparse.Namespace) -> int:
    from .report import render_report
    from .results import AuditResult, read_results, write_results

    _check_output_folder(args.out, "--out")
    runs = []
    for path in args.results:
        runs.append(read_results(path))  # its errors name the file
    from .shards import is_shard, merge_shards

    if any(is_shard(run) for run in runs):
        merged = merge_shards(list(zip(args.results, runs, strict=True)))
    else:
        merged = AuditResult(
            meta={**runs[0].meta, "merged_from": [str(p) for p in args.results]},
            models=[model for run in runs for model in run.models],
        )
    try:
        write_results(merged, args.out / "results.json")
        report = render_report(merged, args.out)
    except OSError as exc:
        raise OutputError(
            f"cannot write the merged report to {args.out} ({exc.strerror or exc}); choose "
            "another --out."
        ) from exc
    print(f"report: {report}")
    return EXIT_PASS if merged.passed else EXIT_FAIL


def _printable(message: str) -> str:
    """Control characters from file names or file contents shown escaped (``\\x1b``), so an
    error message cannot drive the terminal that displays it."""
    return "".join(
        char
        if char in "\n\t" or unicodedata.category(char) not in ("Cc", "Cf")
        else ascii(char)[1:-1]
        for char in message
    )


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``finally`` runs (temporary files are removed)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (CI cancelling a job, ``kill``) into a clean exit for the call's duration.

    Without it the process dies between two bytecodes, skipping the clean-up of a write in
    progress. Only the main thread may install handlers; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _torchrun_rank() -> int:
    from .distributed import environment_rank

    return environment_rank()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"run": _run, "init": _init, "merge": _merge, "schema": _schema}[args.command]
    try:
        with _sigterm_as_interrupt():
            return handler(args)
    except AuditError as exc:
        if getattr(args, "debug", False):
            raise
        rank = _torchrun_rank()
        if rank == 0 or getattr(args, "joined", False):
            where = f" (rank {rank})" if rank else ""
            print(f"inferlink-audit{where}: error: {_printable(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        print(
            f"inferlink-audit: {'terminated (SIGTERM)' if terminated else 'interrupted'}; "
            "no file was left half-written (each output is the previous version or the new "
            "one).",
            file=sys.stderr,
        )
        return EXIT_SIGTERM if terminated else EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
