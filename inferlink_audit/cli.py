"""``inferlink-audit``: the same engine and checks as the pytest plugin, without pytest.

Exit codes (DESIGN §2.3): 0 every check passed, 1 a check failed, 2 a usage or input error.
User mistakes print one paragraph and no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import AuditError

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2

STARTER_SPEC = """\
# inferlink-audit spec: see README.md ("Spec reference") for every key.
version: 1
name: {name}
model:
  factory: {factory}          # module.path:Name | file.py:Name | "torchvision: resnet18" | "torchscript: model.pt"
  kwargs: {{}}
  checkpoint: {checkpoint}    # .safetensors, or .pt/.pth/.ckpt (loaded with weights_only=True)
data:
  source: sklearn_digits      # sklearn_digits | tensors (path: test.pt) | torchvision (name, root)
  split: test
  limit: 512
  batch_size: 256
  input_range: [0, 1]
filtering:
  scopes: [local, global]
  filters: [low_pass, high_pass, pulse]
  thresholds: 25
attacks:
  - fgsm: {{eps: 0.1}}
checks:
  min_clean_accuracy: 0.90
  max_fragile_fraction: {{value: 0.40, on: adversarial}}
"""


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
        "--device", default=None, help="override the spec's device (auto, cpu, cuda:N, xla)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    run.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    init = sub.add_parser("init", help="write a starter spec")
    init.add_argument("path", type=Path, nargs="?", default=Path("audit.yaml"))
    init.add_argument("--name", default="my-model")
    init.add_argument("--factory", default="models.py:Net")
    init.add_argument("--checkpoint", default="model.safetensors")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    merge = sub.add_parser("merge", help="one report from several runs' results.json")
    merge.add_argument("results", type=Path, nargs="+")
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--debug", action="store_true")
    return parser


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .audit import run_audit
    from .report import render_report
    from .results import write_results
    from .spec_loader import load_spec
    from .summary import text_summary

    spec = load_spec(args.spec)
    out = args.out if args.out is not None else spec.report.dir
    show_progress = not args.quiet and sys.stderr.isatty()
    bar = tqdm(desc=f"audit {spec.name}", unit="variant", disable=not show_progress, leave=False)
    try:
        result, _, _ = run_audit(spec, device=args.device, on_variant=lambda where: bar.update(1))
    finally:
        bar.close()
    results_path = write_results(result, Path(out) / "results.json")
    report_path = render_report(result, Path(out))
    if not args.quiet:
        print(text_summary(result))
    print(f"results: {results_path}\nreport:  {report_path}")
    return EXIT_PASS if result.passed else EXIT_FAIL


def _init(args: argparse.Namespace) -> int:
    from .fileio import atomic_write_text

    if args.path.exists() and not args.force:
        raise AuditError(
            f"{args.path} already exists; pass --force to overwrite it or choose another path."
        )
    atomic_write_text(
        args.path,
        STARTER_SPEC.format(name=args.name, factory=args.factory, checkpoint=args.checkpoint),
    )
    print(
        f"wrote {args.path}; edit model.factory and model.checkpoint, then: inferlink-audit run {args.path}"
    )
    return EXIT_PASS


def _merge(args: argparse.Namespace) -> int:
    from .report import render_report
    from .results import AuditResult, read_results, write_results

    runs = [read_results(path) for path in args.results]
    merged = AuditResult(
        meta={**runs[0].meta, "merged_from": [str(p) for p in args.results]},
        models=[model for run in runs for model in run.models],
    )
    write_results(merged, args.out / "results.json")
    print(f"report: {render_report(merged, args.out)}")
    return EXIT_PASS if merged.passed else EXIT_FAIL


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"run": _run, "init": _init, "merge": _merge}[args.command]
    try:
        return handler(args)
    except AuditError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"inferlink-audit: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("inferlink-audit: interrupted; files already written are complete.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
