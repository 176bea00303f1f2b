"""Benchmark d2v_kernels' fused attention against what a user would otherwise run.

Implementations: ``d2v_triton`` (ops.attention, table bias gathered in-kernel), ``eager`` (the
reference: matmul + materialised bias + softmax, as transformers' eager path), ``sdpa_bias``
(F.scaled_dot_product_attention with the (B|1, H, N, N) bias and padding mask materialised, as
transformers' sdpa path), ``flex`` (compiled FlexAttention whose score_mod gathers the table and
applies the padding mask), ``sdpa_nobias`` (SDPA without any bias: the flash kernel's
speed of light, checked against the reference without bias).

Cases: vision base (B=64, H=12, N=197, d=64, table bias), vision large (B=32, H=16, N=197, d=64,
table bias), audio base (B=8, H=12, N=499, d=64, padding mask), text base (B=32, H=12, N=512,
d=64, padding mask); fp16 and bf16; forward and forward+backward (gradients of q, k, v and the
table). Every implementation's output and gradients are checked against a float64 run before it
is timed (error at most twice eager's own plus a small floor). Reports median / p20 / p80 ms and
TFLOP/s (4 B H Nq Nk d for the forward, 3.5x that for forward+backward). JSON to
``bench/results/<gpu>/attention.json``.

    python bench/attention.py [--quick] [--cases vision_base,...] [--dtypes fp16,bf16]
                              [--modes fwd,fwd+bwd] [--impls d2v_triton,eager,sdpa_bias,flex,sdpa_nobias]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
# name: (batch, heads, seq, head_dim, bias kind)
CASES = {
    "vision_base": (64, 12, 197, 64, "table"),
    "vision_large": (32, 16, 197, 64, "table"),
    "audio_base": (8, 12, 499, 64, "padding"),
    "text_base": (32, 12, 512, 64, "padding"),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
IMPLS = ("d2v_triton", "eager", "sdpa_bias", "flex", "sdpa_nobias")
ABS_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def relative_position_index(window: int) -> torch.Tensor:
    """BEiT / Data2VecVision (N, N) index for a window x window patch grid plus CLS."""
    from transformers.models.data2vec.modeling_data2vec_vision import Data2VecVisionRelativePositionBias

    return Data2VecVisionRelativePositionBias.generate_relative_position_index((window, window))


def make_inputs(case: str, dtype: torch.dtype, device: str = "cuda", seed: int = 0) -> dict:
    """q, k, v as strided views of one fused (B, N, 3, H, d) projection, plus the case's bias."""
    batch, heads, seq, head_dim, kind = CASES[case]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    inputs = {"q": qkv[:, :, 0], "k": qkv[:, :, 1], "v": qkv[:, :, 2], "bias_table": None, "bias_index": None}
    inputs["key_padding_mask"] = None
    if kind == "table":
        window = round((seq - 1) ** 0.5)
        index = relative_position_index(window)
        table = 0.5 * torch.randn(int(index.max()) + 1, heads, generator=gen)
        inputs["bias_table"] = table.to(device=device, dtype=dtype)
        inputs["bias_index"] = index.to(device)
    else:
        lengths = torch.linspace(seq, seq // 2, batch).long()  # every row keeps at least half its keys
        mask = torch.arange(seq)[None, :] < lengths[:, None]
        inputs["key_padding_mask"] = mask.to(device=device, dtype=torch.int64)
    return inputs


def attention_fn(impl: str, inputs: dict):
    """(q, k, v, table) -> (B, N, H, d) for one implementation."""
    index, mask = inputs["bias_index"], inputs["key_padding_mask"]

    def dense_bias(q, table):
        """The additive (B|1, H, N, N) bias transformers' sdpa path materialises."""
        bias = None
        if table is not None:
            bias = table[index].permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            pad = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                mask == 0, torch.finfo(q.dtype).min
            )[:, None, None, :]
            bias = pad if bias is None else bias + pad
        return bias

    if impl == "d2v_triton":
        import d2v_kernels
        from d2v_kernels import ops

        def run(q, k, v, table):
            with d2v_kernels.use_backend(attention="triton"):
                return ops.attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=mask)

        return run
    if impl == "eager":
        from d2v_kernels.ops.attention import attention_reference

        return lambda q, k, v, table: attention_reference(
            q, k, v, bias_table=table, bias_index=index, key_padding_mask=mask
        )
    if impl == "sdpa_bias":

        def run(q, k, v, table):
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=dense_bias(q, table)).transpose(1, 2)

        return run
    if impl == "sdpa_nobias":
        return lambda q, k, v, table: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)
    if impl == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

        def run(q, k, v, table):
            def score_mod(score, b, h, q_idx, kv_idx):
                if table is not None:
                    score = score + table[index[q_idx, kv_idx], h].to(score.dtype)
                if mask is not None:
                    score = torch.where(mask[b, kv_idx] != 0, score, torch.finfo(score.dtype).min)
                return score

            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            return flex(qh, kh, vh, score_mod=score_mod).transpose(1, 2)

        return run
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


def attention_flops(case: str, mode: str) -> float:
    batch, heads, seq, head_dim, _ = CASES[case]
    forward = 4.0 * batch * heads * seq * seq * head_dim
    return forward * (3.5 if mode == "fwd+bwd" else 1.0)


def run_once(fn, inputs, leaves, grad_out, mode):
    """Forward (and backward) -> (output, gradients of the leaves or None)."""
    q, k, v, table = leaves
    if mode == "fwd":
        with torch.no_grad():
            return fn(q, k, v, table), None
    fresh = [None if t is None else t.detach().requires_grad_() for t in leaves]
    out = fn(*fresh)
    grads = torch.autograd.grad(out, [t for t in fresh if t is not None], grad_out)
    return out.detach(), grads


def check(name, out, ref64, eager):
    err = (out.double() - ref64).abs().max().item()
    bound = 2.0 * (eager.double() - ref64).abs().max().item() + ABS_FLOOR[out.dtype]
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3e} > bound {bound:.3e} (2 x eager's + floor)")
    return err


def time_ms(fn, *, quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    from triton.testing import do_bench

    warmup, rep = (10, 50) if quick else (25, 200)
    return tuple(do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8]))


def environment() -> dict:
    import transformers
    import triton

    def command(args):
        try:
            out = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
            return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "driver": command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": command(["git", "rev-parse", "HEAD"]),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_case(case, dtype_name, mode, impls, *, check_outputs=True, quick=False) -> list[dict]:
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(case, dtype)
    leaves = [inputs["q"], inputs["k"], inputs["v"], inputs["bias_table"]]
    torch.manual_seed(1)
    grad_out = torch.randn_like(inputs["q"]) if mode == "fwd+bwd" else None
    batch, heads, seq, head_dim, kind = CASES[case]
    flops = attention_flops(case, mode)

    references = {}
    if check_outputs:
        leaves64 = [None if t is None else t.double() for t in leaves]
        g64 = None if grad_out is None else grad_out.double()
        for with_bias in (True, False):  # sdpa_nobias is checked against the reference without bias
            ref_inputs = inputs if with_bias else {**inputs, "bias_index": None, "key_padding_mask": None}
            ref_leaves, ref_leaves64 = (leaves, leaves64) if with_bias else (leaves[:3] + [None], leaves64[:3] + [None])
            eager_fn = attention_fn("eager", ref_inputs)
            references[with_bias] = (
                run_once(eager_fn, ref_inputs, ref_leaves64, g64, mode),
                run_once(eager_fn, ref_inputs, ref_leaves, grad_out, mode),
            )

    rows = []
    for impl in impls:
        row = dict(case=case, batch=batch, heads=heads, seq=seq, head_dim=head_dim, bias=kind, dtype=dtype_name)
        row.update(mode=mode, impl=impl)
        try:
            with_bias = impl != "sdpa_nobias"
            impl_leaves = leaves if with_bias else leaves[:3] + [None]
            fn = attention_fn(impl, inputs)
            out, grads = run_once(fn, inputs, impl_leaves, grad_out, mode)
            if references:
                (out64, grads64), (eager_out, eager_grads) = references[with_bias]
                row["max_err"] = check(f"{impl} output", out, out64, eager_out)
                if grads is not None:
                    row["max_grad_err"] = max(
                        check(f"{impl} grad {i}", g, g64, ge)
                        for i, (g, g64, ge) in enumerate(zip(grads, grads64, eager_grads))
                    )
            del out, grads

            def step(fn=fn, impl_leaves=impl_leaves):
                return run_once(fn, inputs, impl_leaves, grad_out, mode)

            median, p20, p80 = time_ms(step, quick=quick)
            row.update(ms=median, ms_p20=p20, ms_p80=p80, tflops=flops / (median * 1e-3) / 1e12)
        except Exception as e:  # one implementation failing must not hide the others' numbers
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="vision_base and text_base, fp16, shorter timing")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list of {list(DTYPES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)}")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 output check (not recommended)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results root (default bench/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.dtypes = "vision_base,text_base", "fp16"
    for name, allowed in (("cases", CASES), ("dtypes", DTYPES), ("modes", MODES), ("impls", IMPLS)):
        values = [v for v in getattr(args, name).split(",") if v]
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; choose from {list(allowed)}")
        setattr(args, name, values)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("attention benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    rows = []
    for case in args.cases:
        for dtype_name in args.dtypes:
            for mode in args.modes:
                rows += bench_case(
                    case, dtype_name, mode, args.impls, check_outputs=not args.no_check, quick=args.quick
                )
                torch.cuda.empty_cache()
    out_dir = args.out / re.sub(r"[^A-Za-z0-9_.-]+", "_", env["gpu"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("attention_quick.json" if args.quick else "attention.json")
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
