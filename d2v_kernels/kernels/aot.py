"""Ahead-of-time compile of every Triton kernel configuration for real GPUs, on any machine.

The Triton interpreter accepts programs the GPU compiler rejects (a ``tl.dot`` on tiles under 16,
say), so CI also compiles each configuration a launcher can pick (listed in
:mod:`d2v_kernels.kernels.aot_variants`), for sm_80 and sm_90, with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``. Must run with
``TRITON_INTERPRET`` unset (the interpreter replaces ``@triton.jit`` functions).

    python -m d2v_kernels.kernels.aot [--arch 80 90] [--op NAME] [--spills [ARCH ...]] [--jobs N] [--space]

``--space`` compiles instead every candidate of the autotuning spaces (``autotune.SPACES``) at every
input of the tables (``aot_variants.SPACE_VARIANTS``; CI compiles the defaults and a few candidates).

Each line reports the registers and spilled bytes from the ``ptxas -v`` report of Triton's own
ptxas run (the flags the kernel runs with). ``--spills`` fails on a register spill the variant does
not allow (``AotVariant.allowed_spill_bytes``, with its reason where the variant is listed), and on
a persistent kernel whose registers and shared memory leave an SM fewer programs than its grid
assumes (``AotVariant.min_programs_per_sm``). CI
checks sm_90, the H100 the tiles are chosen for; sm_80 only compiles (its mma.sync code needs more
registers: a few configurations spill there). Compiles run in ``--jobs`` processes (default: one
per CPU) and go through Triton's cache (``TRITON_CACHE_DIR``), which keeps each report beside its
kernel: an unchanged kernel is not compiled again. Two configurations with the same PTX are
reported, as one of them adds nothing to the check.

A variant is compiled as it runs where its table says how it is called (``as_run``): the unit
strides and 16-divisible arguments that Triton's launcher specialises at run time change the
layouts the compiler picks, and so the registers ptxas reports.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import multiprocessing
import os
import re
import sys
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
    # Programs of it an SM must hold at once (its registers and shared memory), checked with the
    # spills: a persistent kernel's grid assumes them (0: no check).
    min_programs_per_sm: int = 0


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


def compile_variant(variant: AotVariant, arch: int) -> tuple[object, str]:
    """(compiled kernel, the ``ptxas -v`` report of its compile for ``arch``).

    The report is Triton's own ptxas run (the flags the kernel really runs with), kept beside the
    kernel in Triton's cache (``TRITON_CACHE_DIR``) so that a cache hit has it too; a cached kernel
    without it is compiled again."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.cache import get_cache_manager

    names = list(variant.fn.arg_names)
    attrs = {(names.index(arg),): [["tt.divisibility", 16]] for arg in variant.divisible_by_16}
    src = ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs, attrs=attrs)
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    for always_compile in (False, True):
        log = io.StringIO()
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # printed by the cubin stage, which a cache hit skips
            knobs.compilation.always_compile = always_compile
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        cache = get_cache_manager(compiled.hash)
        if _PTXAS_RESOURCES.search(log.getvalue()):
            cache.put(log.getvalue(), _PTXAS_REPORT)
            return compiled, log.getvalue()
        if (path := cache.get_file(_PTXAS_REPORT)) is not None:
            return compiled, Path(path).read_text()
    raise RuntimeError(
        f"{variant.name} sm_{arch}: no ptxas -v report in Triton's compile log: {log.getvalue()[-2000:]}"
    )


_PTXAS_REPORT = "ptxas-v.log"
_PTXAS_RESOURCES = re.compile(r"(\d+) bytes spill stores.*?Used (\d+) registers", re.S)


def resource_usage(ptxas_report: str) -> tuple[int, int]:
    """(registers, spill-store bytes) from a ``ptxas -v`` report of one kernel."""
    match = _PTXAS_RESOURCES.search(ptxas_report)
    return int(match.group(2)), int(match.group(1))


def collect(ops: list[str] | None = None, space: bool = False) -> list[tuple[str, AotVariant]]:
    """(op, variant) for every configuration in :data:`d2v_kernels.kernels.aot_variants.VARIANTS` (with
    ``space``: ``SPACE_VARIANTS``), or only those of ``ops``."""
    from d2v_kernels.kernels.aot_variants import SPACE_VARIANTS, VARIANTS

    table = SPACE_VARIANTS if space else VARIANTS
    unknown = set(ops or ()) - set(table)
    if unknown:
        raise ValueError(f"no AOT variants for {sorted(unknown)}; known: {sorted(table)}")
    return [(name, v) for name, variants in table.items() if not ops or name in ops for v in variants()]


def check(op: str, variant: AotVariant, arch: int, spills: bool) -> tuple[bool, str, str]:
    """Compiles ``variant`` for ``arch``: (passed, report line, PTX digest). With ``spills`` it fails
    on more spilled bytes than the variant allows."""
    t0 = time.perf_counter()
    try:
        compiled, report = compile_variant(variant, arch)
    except Exception as e:  # report every failing configuration, not just the first
        return False, f"FAIL {op}:{variant.name} sm_{arch}: {type(e).__name__}: {str(e).splitlines()[:3]}", ""
    registers, spilled = resource_usage(report)
    line = f"{op}:{variant.name} sm_{arch} shared={compiled.metadata.shared}B registers={registers} spills={spilled}B"
    digest = hashlib.sha256(compiled.asm["ptx"].encode()).hexdigest()
    if spills and spilled > variant.allowed_spill_bytes:
        return False, f"FAIL {line}: spills more than the {variant.allowed_spill_bytes}B it allows", digest
    if spills and variant.min_programs_per_sm:
        from d2v_kernels.kernels._launch import programs_per_sm

        resident = programs_per_sm(registers, compiled.metadata.shared, variant.num_warps, *_SM_RESOURCES[arch])
        line += f" programs/SM={resident}"
        if resident < variant.min_programs_per_sm:
            return False, f"FAIL {line}: its grid assumes {variant.min_programs_per_sm} programs an SM", digest
    return True, f"ok   {line} {time.perf_counter() - t0:.1f}s", digest


# Registers, threads and shared memory of an SM (A100, H100), for the occupancy check.
_SM_RESOURCES = {80: (65536, 2048, 167936), 90: (65536, 2048, 233472)}


_VARIANTS: list[tuple[str, AotVariant]] = []  # what the worker processes compile, by index


def _check_indexed(index: int, arch: int, spills: bool) -> tuple[bool, str, str]:
    op, variant = _VARIANTS[index]
    return check(op, variant, arch, spills)


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
        help="fail on register spills a variant does not allow, for these archs (all given with --arch when none)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="compile in this many processes (default: one per CPU this process may run on)",
    )
    parser.add_argument(
        "--space", action="store_true", help="every candidate of the autotuning spaces, not the CI table"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces @triton.jit functions", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    _VARIANTS[:] = collect(args.op, args.space)
    spill_archs = set(args.arch if args.spills == [] else args.spills or ())
    work = [(i, arch, arch in spill_archs) for arch in args.arch for i in range(len(_VARIANTS))]
    # Forked workers inherit _VARIANTS (the kernels are imported once); no torch op or CUDA call
    # has run in this process.
    context = multiprocessing.get_context("fork")
    failures, first_with_ptx = 0, {}
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=context) as pool:
        for (index, arch, _), (passed, line, digest) in zip(work, pool.map(_check_indexed, *zip(*work))):
            print(line, flush=True)
            failures += not passed
            name = f"{_VARIANTS[index][0]}:{_VARIANTS[index][1].name} sm_{arch}"
            if digest and first_with_ptx.setdefault(digest, name) != name:
                print(f"     same PTX as {first_with_ptx[digest]}: one of the two configurations is redundant")
    print(
        f"{len(_VARIANTS)} variants x {len(args.arch)} archs, {failures} failed, "
        f"{time.perf_counter() - t0:.0f}s with {args.jobs} jobs"
    )
    return 1 if failures or not _VARIANTS else 0


if __name__ == "__main__":
    sys.exit(main())
