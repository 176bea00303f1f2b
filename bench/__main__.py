"""``d2v-kernels bench`` / ``python -m bench``: run the kernel and end-to-end benchmarks.

    d2v-kernels bench                                  # every op, then every model, then the report
    d2v-kernels bench --quick                          # the short version (minutes)
    d2v-kernels bench --op attention --op pos_conv --dtype bf16
    d2v-kernels bench --model vision_base,text_base --quick
    d2v-kernels bench --op pos_conv -- --modes fwd     # after "--": passed to the op's own script
    d2v-kernels bench --list                           # what exists (no GPU needed)

``--op NAME`` runs ``bench/<NAME>.py``'s ``main(argv)`` (imported only when asked for; a module that
is missing or fails to import is reported and skipped), ``--model NAME`` runs ``bench/models.py``.
Each writes ``bench/results/<gpu>/<date>-<what>.json``; then ``bench/report.py`` regenerates
``bench/results/README.md`` (tables and plots) unless ``--no-report``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

from bench import common

# The kernel benchmarks, one module each (bench/<op>.py with main(argv) and --quick).
OPS = ("attention", "pos_conv", "layer_norm_gelu", "add_layer_norm", "conv_feature_extractor")
NOT_OPS = {
    "__init__",
    "__main__",
    "common",
    "op_benchmark",
    "models",
    "report",
    "headline",
    "tune",
    "profile",
    "host_overhead",
    "activation_memory",
}


def discovered_ops() -> list[str]:
    """The known ops, then any other ``bench/<name>.py`` that is not part of the harness."""
    extra = sorted(
        p.stem
        for p in common.BENCH_DIR.glob("*.py")
        if p.stem not in NOT_OPS and p.stem not in OPS and not p.stem.startswith("_")
    )
    return [*OPS, *extra]


def _split_list(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2v-kernels bench",
        description="Kernel and end-to-end benchmarks of d2v_kernels against the alternatives (needs a GPU).",
        epilog="Arguments after '--' go unchanged to every op script run (see python -m bench.<op> --help).",
    )
    parser.add_argument("--op", action="append", help="op benchmark bench/<NAME>.py (repeatable, comma list, 'all')")
    parser.add_argument("--model", action="append", help="end-to-end model (repeatable, comma list, 'all')")
    parser.add_argument(
        "--dtype", "--dtypes", dest="dtype", help="comma list of fp16,bf16,fp32 (default: each script's)"
    )
    parser.add_argument("--quick", action="store_true", help="small case list and shorter timing")
    parser.add_argument("--out", type=Path, default=None, help="results root (default bench/results)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate bench/results/README.md")
    parser.add_argument("--no-device-info", action="store_true", help="skip the copy-bandwidth measurement")
    parser.add_argument("--list", action="store_true", help="list the ops and models and exit (no GPU needed)")
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        split = argv.index("--")
        argv, passthrough = argv[:split], argv[split + 1 :]
    else:
        passthrough = []
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rest:
        parser.error(f"unrecognized arguments: {' '.join(args.rest)} (put arguments for op scripts after '--')")
    args.passthrough = passthrough
    from bench import models  # argument checks only; imports torch and transformers, no GPU work

    ops, model_names = _split_list(args.op), _split_list(args.model)
    if args.op is None and args.model is None:
        ops, model_names = ["all"], ["all"]
    args.ops = discovered_ops() if "all" in ops else ops
    args.models = list(models.MODELS) if "all" in model_names else model_names
    unknown = [m for m in args.models if m not in models.MODELS]
    if unknown:
        parser.error(f"--model: unknown {unknown}; choose from {list(models.MODELS)}")
    bad_ops = [op for op in args.ops if not op.isidentifier() or op in NOT_OPS]
    if bad_ops:
        parser.error(f"--op: not an op benchmark: {bad_ops}; choose from {discovered_ops()}")
    try:
        args.dtypes = common.parse_list(args.dtype, common.DTYPES, "--dtype") if args.dtype else None
    except ValueError as e:
        parser.error(str(e))
    args.explicit_ops = args.op is not None
    return args


def op_argv(args: argparse.Namespace) -> list[str]:
    """The arguments every op script gets: only what the user asked for, then the passthrough."""
    argv = ["--quick"] if args.quick else []
    if args.dtypes:
        argv += ["--dtypes", ",".join(args.dtypes)]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    return argv + list(args.passthrough)


def model_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--model", ",".join(args.models)]
    if args.quick:
        argv.append("--quick")
    if args.dtypes:
        argv += ["--dtype", ",".join(args.dtypes)]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    return argv


def import_op(name: str):
    """(module, None) or (None, why it cannot be run)."""
    if not (common.BENCH_DIR / f"{name}.py").exists() and f"bench.{name}" not in sys.modules:
        return None, f"bench/{name}.py does not exist"
    try:
        module = importlib.import_module(f"bench.{name}")
    except Exception as e:
        return None, f"bench/{name}.py failed to import: {type(e).__name__}: {e}"
    if not callable(getattr(module, "main", None)):
        return None, f"bench/{name}.py has no main(argv)"
    return module, None


def run_entry(label: str, main, argv: list[str]) -> str:
    """Run one script's main(argv); returns "ok", "failed (...)" for the summary."""
    print(f"\n=== {label}: {' '.join(argv)}", flush=True)
    try:
        status = main(argv)
    except SystemExit as e:  # argparse rejecting an argument, or a script calling sys.exit
        status = e.code
    except Exception:
        traceback.print_exc()
        return "failed (exception, see above)"
    return "ok" if status in (0, None) else f"failed (exit status {status})"


def record_device(out_root: Path) -> None:
    """Measured copy bandwidth next to the datasheet peaks: the reference for the GB/s columns."""
    env = common.environment()
    row = {"what": "device", "case": "copy 1 GiB", "impl": "torch_copy", "gbps": common.copy_bandwidth_gbps()}
    peak = env.get("peak") or {}
    if peak.get("hbm_gbps"):
        row["fraction_of_peak"] = row["gbps"] / peak["hbm_gbps"]
    common.print_row(row)
    path = common.write_results("device", [row], env, out_root)
    print(f"wrote {path}")


def list_entries() -> None:
    from bench import models

    print("ops (--op):")
    for name in discovered_ops():
        exists = (common.BENCH_DIR / f"{name}.py").exists()
        print(f"  {name:<24} {'bench/' + name + '.py' if exists else '(not written yet)'}")
    print("models (--model):")
    for spec in models.MODELS.values():
        print(f"  {spec.name:<24} {spec.class_name}: {', '.join(spec.cases)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.list:
        list_entries()
        return 0
    refused = common.require_gpu("d2v-kernels bench")
    if refused is not None:
        return refused
    out_root = args.out or common.RESULTS_DIR
    summary: dict[str, str] = {}
    if not args.no_device_info:
        summary["device copy bandwidth"] = run_entry("device", lambda _: record_device(out_root), [])
    for name in args.ops:
        module, why = import_op(name)
        if module is None:
            print(f"\n=== op {name}: skipped: {why}", file=sys.stderr, flush=True)
            missing = why.endswith("does not exist") and not args.explicit_ops
            summary[f"op {name}"] = f"skipped ({why})" if missing else f"failed ({why})"
            continue
        summary[f"op {name}"] = run_entry(f"op {name}", module.main, op_argv(args))
    if args.models:
        from bench import models

        summary["models " + ",".join(args.models)] = run_entry("models", models.main, model_argv(args))
    if not args.no_report:
        try:
            from bench import report

            summary["report"] = run_entry("report", report.main, ["--results", str(out_root)])
        except ImportError as e:
            summary["report"] = f"skipped ({e}; pip install -e '.[bench]')"
    print("\nsummary:")
    for label, outcome in summary.items():
        print(f"  {label:<40} {outcome}")
    return 1 if any(outcome.startswith("failed") for outcome in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
