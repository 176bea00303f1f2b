"""The ``d2v-kernels`` command: ``info``, ``validate``, ``bench``."""

from __future__ import annotations

import argparse
import os
import platform
import sys


def _use_interpreter_without_gpu() -> None:
    """For ``validate`` on a machine without a GPU: check the Triton kernels through the
    interpreter (set before triton loads)."""
    if "triton" in sys.modules:
        return
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _versions() -> dict[str, str]:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "numpy"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError as e:
            out[name] = f"not importable ({e.__class__.__name__})"
    out["torch CUDA"] = torch.version.cuda or "none (CPU build)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["GPU"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        out["driver"] = _driver_version()
    else:
        out["GPU"] = "none"
    out["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "unset")
    return out


def _driver_version() -> str:
    try:
        import subprocess

        return subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cmd_info(args) -> int:
    import torch

    import d2v_kernels
    from d2v_kernels import dispatch

    print(f"d2v-kernels {d2v_kernels.__version__}")
    for key, value in _versions().items():
        print(f"  {key:<17} {value}")
    try:
        from d2v_kernels import _extension

        print(f"  {'d2v_kernels._C':<17} {_extension.build_info()}")
    except ImportError:
        print(f"  {'d2v_kernels._C':<17} no CUDA extension in this build")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\nBackends per op on {device.type}, in dispatch order (default dispatch runs the first that can")
    print("run and takes the input; use_backend() forces one):")
    for op in dispatch.ops():
        print(f"  {op}")
        default_found = False
        for impl in dispatch.implementations(op):
            reasons = dispatch.device_reasons(impl, device, forced=False)
            forced_reasons = dispatch.device_reasons(impl, device, forced=True)
            if not reasons:
                status = "can run" + ("" if default_found else " (the default here)")
                default_found = True
            elif not forced_reasons:
                status = "runs only when forced: " + "; ".join(reasons)
            else:
                status = "cannot run: " + "; ".join(forced_reasons)
            print(f"    {impl.backend:<7} {status}")
        measured = dispatch.rule(op)
        if measured is not None:
            print(f"    measured rule: some inputs go to another backend first ({measured.evidence})")
    return 0


def cmd_validate(args) -> int:
    from d2v_kernels import validate

    only = set(args.op) if args.op else None
    rows, ok = validate.run(ops_only=args.ops_only, models_only=args.models_only, quick=args.quick, only=only)
    print(validate.format_table(rows))
    print("\n" + validate.summary(rows))
    return 0 if ok else 1


def _bench_main(argv: list[str]) -> int:
    """Run ``bench/`` (lives in the repository checkout, not in the installed package)."""
    import torch

    if not torch.cuda.is_available() and "--list" not in argv and not {"-h", "--help"} & set(argv):
        print("d2v-kernels bench: no CUDA GPU on this machine; benchmarks need one.", file=sys.stderr)
        return 2
    from pathlib import Path

    import d2v_kernels

    for root in (Path.cwd(), Path(d2v_kernels.__file__).resolve().parents[1]):
        if (root / "bench" / "__main__.py").is_file():
            sys.path.insert(0, str(root))
            break
    try:
        from bench.__main__ import main as bench_main
    except ImportError as e:
        print(f"d2v-kernels bench: run it from a checkout of the repository ({e})", file=sys.stderr)
        return 2
    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2v-kernels", description="Fused kernels for Data2Vec models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, and which backend of each op can run here").set_defaults(fn=cmd_info)
    from d2v_kernels import validate

    v = sub.add_parser("validate", help="check every op and model against float64 references; non-zero on failure")
    only = v.add_mutually_exclusive_group()
    only.add_argument("--ops-only", action="store_true")
    only.add_argument("--models-only", action="store_true")
    v.add_argument("--quick", action="store_true", help="small sizes even on a GPU")
    v.add_argument("--op", action="append", choices=validate.OPS, help="only this op's checks (repeatable)")
    v.set_defaults(fn=cmd_validate)
    sub.add_parser("bench", help="run the benchmarks in bench/ (needs a GPU); options go to `python -m bench`")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "validate":
        if args.op and args.models_only:
            parser.error("validate: --op picks op checks; --models-only runs none")
        _use_interpreter_without_gpu()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
