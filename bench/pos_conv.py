"""Benchmark the audio positional conv embedding: d2v_kernels' Triton kernels vs transformers'
``Data2VecAudioPositionalConvEmbedding`` (cuDNN grouped conv with transposes, eager LayerNorm +
GELU), torch.compile of it, and a channels-last cuDNN conv (NHWC conv2d on the (B, T, C) memory,
no transposes).

Cases: base (B=8, T=499 frames = 10 s, C=768, 16 groups, k=19, 5 layers) and large (C=1024),
fp16 and bf16, forward and forward+backward (gradients for the input, every weight and bias).
Every implementation's output (and gradients) is checked against a float64 run before it is
timed: its error may be at most twice eager's own error in the same dtype plus a small floor.
Reports median / p20 / p80 ms, TFLOP/s of the convolutions (2 x MACs, x3 for fwd+bwd) and the
fraction of the GPU's dense fp16/bf16 tensor-core peak, and peak memory. Writes JSON to
``bench/results/<gpu>/pos_conv.json``.

    python bench/pos_conv.py [--quick] [--cases base,large] [--dtypes fp16,bf16]
                             [--modes fwd,fwd+bwd] [--impls d2v_triton,hf_eager,hf_compile,cudnn_channels_last]
"""

from __future__ import annotations

import argparse
import copy
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
# name: (batch, frames, hidden size, groups, kernel size, layers)
CASES = {"base": (8, 499, 768, 16, 19, 5), "large": (8, 499, 1024, 16, 19, 5)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
IMPLS = ("d2v_triton", "hf_eager", "hf_compile", "cudnn_channels_last")
ABS_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Dense (no sparsity) fp16/bf16 tensor-core peak in TFLOP/s, by a substring of the GPU name.
DENSE_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def build_module(case: str, dtype: torch.dtype, device: str = "cuda", seed: int = 0):
    """transformers' positional conv embedding for the case, random weights and biases."""
    from transformers import Data2VecAudioConfig
    from transformers.models.data2vec.modeling_data2vec_audio import Data2VecAudioPositionalConvEmbedding

    _, _, hidden, groups, kernel_size, layers = CASES[case]
    config = Data2VecAudioConfig(
        hidden_size=hidden,
        num_conv_pos_embedding_groups=groups,
        conv_pos_kernel_size=kernel_size,
        num_conv_pos_embeddings=layers,
    )
    torch.manual_seed(seed)
    module = Data2VecAudioPositionalConvEmbedding(config)
    with torch.no_grad():
        for layer in module.layers:
            layer.conv.bias.normal_(0.0, 0.2)
    return module.eval().to(device=device, dtype=dtype)


def _layer_params(module):
    layers = list(module.layers)
    conv = layers[0].conv
    return (
        [layer.conv.weight for layer in layers],
        [layer.conv.bias for layer in layers],
        conv.groups,
        conv.kernel_size[0],
        layers[0].layer_norm.eps,
    )


def embedding_fn(module, impl: str):
    """hidden (B, T, C) -> positional embedding (B, T, C) for one implementation."""
    weights, biases, groups, kernel_size, eps = _layer_params(module)
    if impl == "d2v_triton":
        import d2v_kernels
        from d2v_kernels import ops

        def run(hidden):
            with d2v_kernels.use_backend(pos_conv="triton"):
                return ops.pos_conv(hidden, weights, biases, groups=groups, eps=eps)

        return run
    if impl == "hf_eager":
        return module
    if impl == "hf_compile":
        return torch.compile(module)
    if impl == "cudnn_channels_last":
        # The (B, T, C) memory seen as NHWC (B, C, 1, T): cuDNN's channels-last kernels read and
        # write it directly, and LayerNorm runs on the contiguous last dim. No transposed copies.
        weights_nhwc = [w.unsqueeze(2).contiguous(memory_format=torch.channels_last) for w in weights]

        def run(hidden):
            h = hidden
            for weight, bias in zip(weights_nhwc, biases):
                y = F.conv2d(h.transpose(1, 2).unsqueeze(2), weight, bias, padding=(0, kernel_size // 2), groups=groups)
                y = y.squeeze(2).transpose(1, 2)  # (B, T', C), channel stride 1
                if kernel_size % 2 == 0:
                    y = y[:, :-1]
                h = F.gelu(F.layer_norm(y, (y.shape[-1],), None, None, eps))
            return h

        return run
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


def conv_flops(case: str) -> float:
    """Multiply-adds x 2 of the forward convolutions."""
    batch, frames, hidden, groups, kernel_size, layers = CASES[case]
    return 2.0 * batch * frames * hidden * (hidden // groups) * kernel_size * layers


def dense_peak_tflops(gpu_name: str) -> float | None:
    for key, peak in DENSE_PEAK_TFLOPS.items():
        if key in gpu_name:
            return peak
    return None


def run_once(fn, hidden, grad_out, params, mode):
    """Forward (and backward); returns the output and the gradients (or None)."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(hidden), None
    hidden = hidden.detach().requires_grad_(True)
    out = fn(hidden)
    grads = torch.autograd.grad(out, [hidden, *params], grad_out)
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


def peak_memory_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def environment() -> dict:
    def git_commit():
        try:
            return subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    import transformers
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "driver": _driver_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def bench_case(case, dtype_name, mode, impls, *, peak_tflops=None, check_outputs=True, quick=False) -> list[dict]:
    batch, frames, hidden_size = CASES[case][:3]
    dtype = DTYPES[dtype_name]
    module = build_module(case, dtype)
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(mode == "fwd+bwd")
    torch.manual_seed(1)
    hidden = torch.randn(batch, frames, hidden_size, device="cuda", dtype=dtype)
    hidden[1:, frames * 3 // 4 :] = 0.0  # padded frames, zeroed as the encoder does
    flops = conv_flops(case) * (3.0 if mode == "fwd+bwd" else 1.0)

    rows = []
    references = None
    grad_out = torch.randn_like(hidden) if mode == "fwd+bwd" else None
    if check_outputs:
        # float64 reference on the very same (already rounded) weights
        module64 = copy.deepcopy(module).double()
        out64, grads64 = run_once(
            module64,
            hidden.double(),
            None if grad_out is None else grad_out.double(),
            list(module64.parameters()),
            mode,
        )
        eager_out, eager_grads = run_once(module, hidden, grad_out, params, mode)
        references = (out64, grads64, eager_out, eager_grads)
        del module64

    for impl in impls:
        fn = embedding_fn(module, impl)
        row = dict(case=case, batch=batch, frames=frames, channels=hidden_size, dtype=dtype_name, mode=mode, impl=impl)
        try:
            out, grads = run_once(fn, hidden, grad_out, params, mode)
            if references:
                out64, grads64, eager_out, eager_grads = references
                row["max_err"] = check(f"{impl} output", out, out64, eager_out)
                if grads is not None:
                    row["max_grad_err"] = max(
                        check(f"{impl} grad {i}", g, g64, ge)
                        for i, (g, g64, ge) in enumerate(zip(grads, grads64, eager_grads))
                    )
            del out, grads

            def step(fn=fn):
                return run_once(fn, hidden, grad_out, params, mode)

            median, p20, p80 = time_ms(step, quick=quick)
            tflops = flops / (median * 1e-3) / 1e12
            row.update(
                ms=median,
                ms_p20=p20,
                ms_p80=p80,
                tflops=tflops,
                fraction_of_dense_peak=None if peak_tflops is None else tflops / peak_tflops,
                peak_mem_mb=peak_memory_bytes(step) / 2**20,
            )
        except Exception as e:  # one implementation failing must not hide the others' numbers
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="base case, fp16 only, shorter timing")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list of {list(DTYPES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)}")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 output check (not recommended)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results root (default bench/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.dtypes = "base", "fp16"
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
        print("pos_conv benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    peak = dense_peak_tflops(env["gpu"])
    env["dense_peak_tflops"] = peak
    rows = []
    for case in args.cases:
        for dtype_name in args.dtypes:
            for mode in args.modes:
                rows += bench_case(
                    case,
                    dtype_name,
                    mode,
                    args.impls,
                    peak_tflops=peak,
                    check_outputs=not args.no_check,
                    quick=args.quick,
                )
                torch.cuda.empty_cache()
    out_dir = args.out / re.sub(r"[^A-Za-z0-9_.-]+", "_", env["gpu"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("pos_conv_quick.json" if args.quick else "pos_conv.json")
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
