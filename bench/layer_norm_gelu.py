"""Benchmark LayerNorm + GELU over channels: d2v_kernels (``d2v``: the public op under default
dispatch, which follows the op's measured rule; ``d2v_triton``: the Triton kernel forced) vs what
transformers runs (transpose, LayerNorm, transpose, GELU), torch.compile of that (default and
``max-autotune-no-cudagraphs``), and Liger-Kernel's LayerNorm (+ eager GELU) when
``liger_kernel`` is importable.

Cases are the audio model's (B*T, C) rows: the feature encoder's conv outputs (B=8, T in 32000,
16000, 3199, 499 frames, C=512, affine) and the positional conv's (B=8, T=499 and 1499, C=768,
no affine). Layout ``channels_first`` is how the model holds them, (B, C, T) with the norm over
dim 1 (our kernel reads it in place); ``channels_last`` is (B, T, C) contiguous. fp16 and bf16,
forward and forward+backward (gradients for x, weight, bias). Every implementation's output (and
gradients) is checked against a float64 run before it is timed: at most twice eager's own error
in the same dtype plus a small floor. Reports median / p20 / p80 ms, the GB/s of the bytes the op
must move (fwd: read x, write y; fwd+bwd adds read x, dy and write dx) and that as a fraction of
the device copy bandwidth measured in the same run (a large ``copy_``). Writes JSON to
``bench/results/<gpu>/<date>-layer_norm_gelu.json``.

    python -m bench.layer_norm_gelu [--quick] [--cases ...] [--dtypes fp16,bf16] [--modes fwd,fwd+bwd]
                                    [--layouts channels_first,channels_last] [--impls ...]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import common, op_benchmark
from d2v_kernels.testing import assert_close_to_reference

# name: (batch, frames, channels, affine)
CASES = {
    "encoder-T32000": (8, 32000, 512, True),
    "encoder-T16000": (8, 16000, 512, True),
    "encoder-T3199": (8, 3199, 512, True),
    "encoder-T499": (8, 499, 512, True),
    "posconv-T499": (8, 499, 768, False),
    "posconv-T1499": (8, 1499, 768, False),
}
QUICK_CASES = ("encoder-T3199", "posconv-T499")
# CPU-sized cases for bench.tune --check-only --tiny (name:layout, as setup_case takes them)
TINY_SHAPES = {"tiny": (2, 37, 48, True)}
TINY_CASES = ("tiny:channels_first", "tiny:channels_last")
DTYPES = ("fp16", "bf16")
MODES = ("fwd", "fwd+bwd")
LAYOUTS = ("channels_first", "channels_last")
IMPLS = ("d2v", "d2v_triton", "hf_eager", "hf_compile", "hf_compile_max_autotune", "liger")
EPS = 1e-5


def liger_missing() -> str | None:
    """Why Liger-Kernel's LayerNorm cannot run here, or None."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction  # noqa: F401
    except Exception as e:  # not installed, or its import fails on this stack
        return f"liger_kernel not importable ({type(e).__name__}: {e})"
    return None


def make_inputs(case: str, dtype: torch.dtype, layout: str, device: str = "cuda", seed: int = 0):
    """(x, weight or None, bias or None, channels_dim) for one case."""
    batch, frames, channels, affine = {**CASES, **TINY_SHAPES}[case]
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, channels, frames) if layout == "channels_first" else (batch, frames, channels)
    x = (torch.randn(shape, device=device, generator=generator) * 2.0 + 0.5).to(dtype)
    channels_dim = 1 if layout == "channels_first" else -1
    if not affine:
        return x, None, None, channels_dim
    weight = (1.0 + 0.2 * torch.randn(channels, device=device, generator=generator)).to(dtype)
    bias = (0.2 * torch.randn(channels, device=device, generator=generator)).to(dtype)
    return x, weight, bias, channels_dim


def hf_layer_norm_gelu(x, weight, bias, channels_dim):
    """What transformers' conv layers run: transpose to channels-last, LayerNorm, back, GELU."""
    h = x.transpose(1, 2) if channels_dim == 1 else x
    h = F.layer_norm(h, (h.shape[-1],), weight, bias, EPS)
    h = h.transpose(1, 2) if channels_dim == 1 else h
    return F.gelu(h)


def liger_layer_norm_gelu(x, weight, bias, channels_dim):
    """Liger's LayerNorm as a drop-in for nn.LayerNorm (it needs weight and bias tensors)."""
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    channels = x.shape[channels_dim]
    if weight is None:
        weight = torch.ones(channels, device=x.device, dtype=x.dtype)
        bias = torch.zeros(channels, device=x.device, dtype=x.dtype)
    h = x.transpose(1, 2) if channels_dim == 1 else x
    h = LigerLayerNormFunction.apply(h, weight, bias, EPS)
    h = h.transpose(1, 2) if channels_dim == 1 else h
    return F.gelu(h)


def implementation(impl: str):
    """fn(x, weight, bias, channels_dim) -> y for one implementation."""
    if impl == "d2v":  # the public op under default dispatch (the measured rule): what a user gets
        from d2v_kernels import ops

        def run(x, weight, bias, channels_dim):
            return ops.layer_norm_gelu(x, weight, bias, eps=EPS, channels_dim=channels_dim)

        return run
    if impl == "d2v_triton":
        import d2v_kernels
        from d2v_kernels import ops

        def run(x, weight, bias, channels_dim):
            with d2v_kernels.use_backend(layer_norm_gelu="triton"):
                return ops.layer_norm_gelu(x, weight, bias, eps=EPS, channels_dim=channels_dim)

        return run
    if impl == "hf_eager":
        return hf_layer_norm_gelu
    if impl == "hf_compile":
        return torch.compile(hf_layer_norm_gelu, dynamic=False)  # a graph per shape
    if impl == "hf_compile_max_autotune":
        return torch.compile(hf_layer_norm_gelu, mode="max-autotune-no-cudagraphs", dynamic=False)
    if impl == "liger":
        return liger_layer_norm_gelu
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


def run_once(fn, x, weight, bias, channels_dim, grad_out, mode):
    """Forward (and backward): [y] or [y, dx, dweight, dbias] (entries for absent params dropped)."""
    if mode == "fwd":
        with torch.no_grad():
            return [fn(x, weight, bias, channels_dim)]
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    x_leaf, params = leaves[0], leaves[1:]
    y = fn(x_leaf, *(params or [None, None]), channels_dim)
    return [y.detach(), *torch.autograd.grad(y, leaves, grad_out)]


def bytes_moved(x: torch.Tensor, mode: str) -> int:
    """Bytes the op must move at the least: fwd reads x and writes y; the backward reads x and dy
    and writes dx (parameters and fp32 row statistics are negligible next to them)."""
    tensor_bytes = x.numel() * x.element_size()
    return tensor_bytes * (2 if mode == "fwd" else 5)


def bench_case(case, dtype_name, layout, mode, impls, *, copy_gbps=None, check=True, quick=False) -> list[dict]:
    op_case = setup_case(f"{case}:{layout}", dtype_name, mode)
    nbytes = op_case.nbytes
    base = dict(op_case.row, case=case, bytes=nbytes)
    rows = []
    for impl in impls:
        row = dict(base, impl=impl)
        if impl == "liger" and (why := liger_missing()):
            row["skipped"] = why
            rows.append(row)
            common.print_row(row)
            continue
        try:
            step = op_case.make_step(impl)
            if check:
                label = f"{impl} {case} {dtype_name} {layout} {mode}"
                row.update(assert_close_to_reference(step(), *op_case.reference(impl), name=label))
            timing = common.time_ms(step, rep_ms=50.0 if quick else 200.0)
            row.update(timing.as_row(), gbps=common.gbps(nbytes, timing.ms))
            if copy_gbps:
                row["fraction_of_copy_bw"] = row["gbps"] / copy_gbps
            row["peak_mem_mb"] = common.peak_memory_mb(step)
            row.update(common.graph_row(step))
            if "ms_graph" in row:
                row["gbps_graph"] = common.gbps(nbytes, row["ms_graph"])
        except Exception as e:  # one implementation failing must not hide the others' numbers
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        common.print_row(row)
    return rows


def setup_case(case: str, dtype_name: str, mode: str, device: str = "cuda") -> op_benchmark.OpCase:
    """One case as an OpCase for ``bench.tune``: ``case`` is ``NAME:LAYOUT``
    (e.g. ``encoder-T3199:channels_first``); steps return [y] or [y, dx, dweight, dbias]."""
    name, _, layout = case.partition(":")
    shapes = {**CASES, **TINY_SHAPES}
    if name not in shapes or layout not in LAYOUTS:
        raise ValueError(f"case must be NAME:LAYOUT with NAME in {list(shapes)} and LAYOUT in {list(LAYOUTS)}")
    dtype = common.DTYPES[dtype_name]
    x, weight, bias, channels_dim = make_inputs(name, dtype, layout, device)
    grad_out = torch.randn_like(x) if mode == "fwd+bwd" else None

    def make_step(impl: str):
        fn = implementation(impl)
        return lambda: run_once(fn, x, weight, bias, channels_dim, grad_out, mode)

    @functools.cache
    def reference():
        as64 = [t.double() if t is not None else None for t in (x, weight, bias)]
        ref64 = run_once(hf_layer_norm_gelu, *as64, channels_dim, None if grad_out is None else grad_out.double(), mode)
        return ref64, run_once(hf_layer_norm_gelu, x, weight, bias, channels_dim, grad_out, mode)

    batch, frames, channels, affine = shapes[name]
    row = dict(case=case, batch=batch, frames=frames, channels=channels, affine=affine, layout=layout)
    row.update(dtype=dtype_name, mode=mode)
    return op_benchmark.OpCase(
        row=row, make_step=make_step, reference=lambda impl: reference(), nbytes=bytes_moved(x, mode)
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.layer_norm_gelu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"cases {list(QUICK_CASES)}, fp16, shorter timing")
    parser.add_argument("--cases", help=f"comma list of {list(CASES)}")
    parser.add_argument("--dtypes", help=f"comma list of {list(DTYPES)} (fp32 also accepted)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {list(LAYOUTS)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)}")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 output check (not recommended)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="results root (default bench/results)")
    args = parser.parse_args(argv)
    try:
        args.cases = common.parse_list(args.cases, CASES, "--cases") or list(QUICK_CASES if args.quick else CASES)
        args.dtypes = common.parse_list(args.dtypes, common.DTYPES, "--dtypes") or (
            ["fp16"] if args.quick else list(DTYPES)
        )
        args.modes = common.parse_list(args.modes, MODES, "--modes")
        args.layouts = common.parse_list(args.layouts, LAYOUTS, "--layouts")
        args.impls = common.parse_list(args.impls, IMPLS, "--impls")
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    refused = common.require_gpu("layer_norm_gelu benchmark")
    if refused is not None:
        return refused
    env = common.environment(argv)
    copy_gbps = common.copy_bandwidth_gbps()
    common.print_row({"what": "device", "impl": "torch_copy", "gbps": copy_gbps})
    rows = []
    for case in args.cases:
        for dtype_name in args.dtypes:
            for layout in args.layouts:
                for mode in args.modes:
                    rows += bench_case(
                        case, dtype_name, layout, mode, args.impls,
                        copy_gbps=copy_gbps, check=not args.no_check, quick=args.quick,
                    )  # fmt: skip
                    torch.cuda.empty_cache()
    path = common.write_results("layer_norm_gelu", rows, env, args.out, copy_gbps=copy_gbps)
    print(f"wrote {path}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
