"""Ahead-of-time compile of every Triton kernel configuration for real GPUs, on any machine.

The Triton interpreter accepts programs the GPU compiler rejects (a ``tl.dot`` on tiles under 16,
say), so CI also compiles each configuration a launcher can pick, for sm_80 and sm_90, with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``. Must run with
``TRITON_INTERPRET`` unset (the interpreter replaces ``@triton.jit`` functions).

    python -m d2v_kernels.kernels.aot [--arch 80 90] [--op NAME] [--spills [ARCH ...]]

``--spills`` also runs ptxas -v on each configuration (Triton's own ptxas) and fails on a register
spill the variant does not allow (``AotVariant.allowed_spill_bytes``, with its reason where the
variant is listed). CI checks sm_90, the H100 the tiles are chosen for; sm_80 only compiles (its
mma.sync code needs more registers: a few configurations spill there).

A variant is compiled as it runs where its module says how it is called (``as_run``): the unit
strides and 16-divisible arguments that Triton's launcher specialises at run time change the
layouts the compiler picks, and so the registers ptxas reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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
    # Register spill bytes ptxas may report for it (0: none); a non-zero value carries its reason
    # where the variant is listed.
    allowed_spill_bytes: int = 0
    # Arguments the launch path specialises as multiples of 16 (pointers, sizes, strides), as
    # Triton's launcher does at run time; arguments it specialises as 1 (unit strides) are given
    # as constexprs of value 1. Together they make the compiled program the one that runs: a
    # unit stride decides which axis a load is contiguous along, hence the layouts and registers.
    divisible_by_16: tuple[str, ...] = ()


def as_run(variant: AotVariant, unit_strides=(), divisible_by_16=(), *, pointers_divisible: bool = True) -> AotVariant:
    """``variant`` specialised as Triton's launcher specialises it for the usual call: arguments of
    ``unit_strides`` (equal to 1 there) become constexprs of value 1, those of ``divisible_by_16``
    (and every pointer, unless told otherwise) carry the 16-divisibility attribute. Names the
    kernel does not take are skipped."""
    names = set(variant.fn.arg_names)
    ones = [a for a in unit_strides if a in names and variant.signature.get(a) == "i32"]
    signature = {**variant.signature, **dict.fromkeys(ones, "constexpr")}
    constexprs = {**variant.constexprs, **dict.fromkeys(ones, 1)}
    pointers = [a for a, t in signature.items() if t.startswith("*")] if pointers_divisible else []
    divisible = [a for a in (*pointers, *divisible_by_16) if a in names and signature[a] != "constexpr"]
    return dataclasses.replace(
        variant, signature=signature, constexprs=constexprs, divisible_by_16=tuple(dict.fromkeys(divisible))
    )


def compile_variant(variant: AotVariant, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(variant.fn.arg_names)
    attrs = {(names.index(arg),): [["tt.divisibility", 16]] for arg in variant.divisible_by_16}
    src = ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs, attrs=attrs)
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


_PTXAS_RESOURCES = re.compile(r"(\d+) bytes spill stores.*?Used (\d+) registers", re.S)


def resource_usage(compiled, arch: int) -> tuple[int, int] | None:
    """(registers, spill-store bytes) of a compiled kernel, from Triton's own ptxas run with -v on its
    PTX; None when this Triton does not say which ptxas it uses."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return None
    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        result = subprocess.run(
            [get_ptxas(arch).path, f"-arch={target}", "-v", str(ptx), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    match = _PTXAS_RESOURCES.search(result.stderr)
    return (int(match.group(2)), int(match.group(1))) if match else None


def collect(ops: list[str] | None = None) -> list[tuple[str, AotVariant]]:
    """(op, variant) for every configuration in :data:`d2v_kernels.kernels.aot_variants.VARIANTS`, or
    only those of ``ops``."""
    from d2v_kernels.kernels.aot_variants import VARIANTS

    unknown = set(ops or ()) - set(VARIANTS)
    if unknown:
        raise ValueError(f"no AOT variants for {sorted(unknown)}; known: {sorted(VARIANTS)}")
    return [(name, v) for name, variants in VARIANTS.items() if not ops or name in ops for v in variants()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--op", action="append", default=None)
    parser.add_argument(
        "--spills",
        type=int,
        nargs="*",
        default=None,
        metavar="ARCH",
        help="also run ptxas -v for these archs (all given with --arch when none): fail on register spills a "
        "variant does not allow",
    )
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
            line = f"{op}:{variant.name} sm_{arch} shared={compiled.metadata.shared}B"
            if args.spills is not None and (not args.spills or arch in args.spills):
                usage = resource_usage(compiled, arch)
                if usage is None:
                    print(f"FAIL {line}: no ptxas resource report (this Triton has no get_ptxas)")
                    failures += 1
                    continue
                registers, spilled = usage
                line += f" registers={registers} spills={spilled}B"
                if spilled > variant.allowed_spill_bytes:
                    print(f"FAIL {line}: spills more than the {variant.allowed_spill_bytes}B it allows")
                    failures += 1
                    continue
            print(f"ok   {line} {time.perf_counter() - t0:.1f}s")
    print(f"{len(variants)} variants x {len(args.arch)} archs, {failures} failed")
    return 1 if failures or not variants else 0


if __name__ == "__main__":
    sys.exit(main())
