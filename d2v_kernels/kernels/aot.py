"""Ahead-of-time compile of every Triton kernel configuration for real GPUs, on any machine.

The Triton interpreter accepts programs the GPU compiler rejects (a ``tl.dot`` on tiles under 16,
say), so CI also compiles each configuration a launcher can pick, for sm_80 and sm_90, with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``. Must run with
``TRITON_INTERPRET`` unset (the interpreter replaces ``@triton.jit`` functions).

    python -m d2v_kernels.kernels.aot [--arch 80 90] [--op NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time


@dataclasses.dataclass(frozen=True)
class AotVariant:
    """One compilable configuration of a kernel.

    ``signature`` maps every argument name to a Triton type ("*fp16", "i32", "fp32",
    "constexpr"); ``constexprs`` gives the value of each constexpr argument.
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3


def compile_variant(variant: AotVariant, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs)
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def collect(ops: list[str] | None = None) -> list[tuple[str, AotVariant]]:
    from d2v_kernels.kernels import KERNEL_MODULES

    out = []
    for name in KERNEL_MODULES:
        if ops and name not in ops:
            continue
        try:
            module = importlib.import_module(f"d2v_kernels.kernels.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"d2v_kernels.kernels.{name}":
                continue  # op has no Triton kernel (yet)
            raise
        out.extend((name, v) for v in module.aot_variants())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--op", action="append", default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces @triton.jit functions", file=sys.stderr)
        return 2
    failures = 0
    variants = collect(args.op)
    for op, variant in variants:
        for arch in args.arch:
            t0 = time.perf_counter()
            try:
                compiled = compile_variant(variant, arch)
            except Exception as e:  # report every failing configuration, not just the first
                failures += 1
                print(f"FAIL {op}:{variant.name} sm_{arch}: {type(e).__name__}: {str(e).splitlines()[:3]}")
                continue
            shared = compiled.metadata.shared
            print(f"ok   {op}:{variant.name} sm_{arch} shared={shared}B {time.perf_counter() - t0:.1f}s")
    print(f"{len(variants)} variants x {len(args.arch)} archs, {failures} failed")
    return 1 if failures or not variants else 0


if __name__ == "__main__":
    sys.exit(main())
