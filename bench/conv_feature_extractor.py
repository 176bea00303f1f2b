"""Benchmark the audio feature encoder: d2v_kernels' fused CUDA extension vs transformers'
``Data2VecAudioFeatureEncoder`` (cuDNN convs, eager LayerNorm + GELU) and torch.compile of it.

Cases: B=8 x 10 s and B=1 x 30 s of 16 kHz audio, the base config (7 layers, 512 channels),
fp16 and bf16, forward and forward+backward (gradients for the waveform and every weight).
Every implementation's output (and, for fwd+bwd, gradients) is checked against a float64 run
before it is timed: its error may be at most twice eager's own error in the same dtype plus a
small floor. Reports median / p20 / p80 milliseconds, TFLOP/s of the convolutions, and peak
memory (torch.cuda.max_memory_allocated above what was allocated before the call). Writes JSON
to ``bench/results/<gpu>/conv_feature_extractor.json``.

    python bench/conv_feature_extractor.py [--cases b8x10s,b1x30s] [--dtypes fp16,bf16]
                                           [--modes fwd,fwd+bwd] [--impls d2v_cuda,hf_eager,hf_compile]
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

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {"b8x10s": (8, 160_000), "b1x30s": (1, 480_000)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
IMPLS = ("d2v_cuda", "hf_eager", "hf_compile")
ABS_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def build_encoder(dtype: torch.dtype, device: str = "cuda", seed: int = 0):
    """transformers' base feature encoder with random weights (LayerNorm affine randomised too)."""
    from transformers import Data2VecAudioConfig
    from transformers.models.data2vec.modeling_data2vec_audio import Data2VecAudioFeatureEncoder

    torch.manual_seed(seed)
    encoder = Data2VecAudioFeatureEncoder(Data2VecAudioConfig())
    with torch.no_grad():
        for layer in encoder.conv_layers:
            layer.layer_norm.weight.normal_(1.0, 0.2)
            layer.layer_norm.bias.normal_(0.0, 0.2)
    return encoder.eval().to(device=device, dtype=dtype)


def encoder_fn(encoder, impl: str):
    """wave (B, S) -> (B, T, C) for one implementation."""
    layers = list(encoder.conv_layers)
    if impl == "d2v_cuda":
        import d2v_kernels
        from d2v_kernels import ops

        params = dict(
            conv_weights=[layer.conv.weight for layer in layers],
            ln_weights=[layer.layer_norm.weight for layer in layers],
            ln_biases=[layer.layer_norm.bias for layer in layers],
        )
        strides = [layer.conv.stride[0] for layer in layers]

        def run(wave):
            with d2v_kernels.use_backend(conv_feature_extractor="cuda"):
                return ops.conv_feature_extractor(wave, **params, strides=strides, eps=layers[0].layer_norm.eps)

        return run
    if impl == "hf_eager":
        return lambda wave: encoder(wave).transpose(1, 2)
    if impl == "hf_compile":
        compiled = torch.compile(encoder)
        return lambda wave: compiled(wave).transpose(1, 2)
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


def frames(samples: int, encoder) -> int:
    for layer in encoder.conv_layers:
        samples = (samples - layer.conv.kernel_size[0]) // layer.conv.stride[0] + 1
    return samples


def conv_flops(batch: int, samples: int, encoder) -> float:
    """Multiply-adds x 2 of the forward convolutions."""
    flops, length = 0.0, samples
    for layer in encoder.conv_layers:
        c_out, c_in, k = layer.conv.weight.shape
        length = (length - k) // layer.conv.stride[0] + 1
        flops += 2.0 * batch * length * c_out * c_in * k
    return flops


def run_once(fn, wave, grad_out, params, mode):
    """Forward (and backward); returns the output and the gradients (or None)."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(wave), None
    wave = wave.detach().requires_grad_(True)
    out = fn(wave)
    grads = torch.autograd.grad(out, [wave, *params], grad_out)
    return out.detach(), grads


def check(name, out, ref64, eager):
    err = (out.double() - ref64).abs().max().item()
    bound = 2.0 * (eager.double() - ref64).abs().max().item() + ABS_FLOOR[out.dtype]
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3e} > bound {bound:.3e} (2 x eager's + floor)")
    return err


def time_ms(fn) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    try:
        from triton.testing import do_bench

        return tuple(do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    except ImportError:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(5):
            fn()
        times = []
        for _ in range(50):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return times[len(times) // 2], times[len(times) // 5], times[4 * len(times) // 5]


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

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_case(case: str, dtype_name: str, mode: str, impls, *, check_outputs: bool = True) -> list[dict]:
    batch, samples = CASES[case]
    dtype = DTYPES[dtype_name]
    encoder = build_encoder(dtype)
    params = list(encoder.parameters())
    for p in params:
        p.requires_grad_(mode == "fwd+bwd")
    torch.manual_seed(1)
    wave = torch.randn(batch, samples, device="cuda", dtype=dtype)
    flops = conv_flops(batch, samples, encoder) * (3.0 if mode == "fwd+bwd" else 1.0)

    rows = []
    references, grad_out = None, None
    if check_outputs:
        # float64 reference on the very same (already rounded) weights
        encoder64 = copy.deepcopy(encoder).double()
        params64 = list(encoder64.parameters())
        fn64 = encoder_fn(encoder64, "hf_eager")
        if mode == "fwd":
            with torch.no_grad():
                out64, grads64 = fn64(wave.double()), None
        else:
            wave64 = wave.double().requires_grad_(True)
            out64 = fn64(wave64)
            grad_out64 = torch.randn_like(out64)
            grads64 = torch.autograd.grad(out64, [wave64, *params64], grad_out64)
            out64, grad_out = out64.detach(), grad_out64.to(dtype)
        eager_out, eager_grads = run_once(encoder_fn(encoder, "hf_eager"), wave, grad_out, params, mode)
        references = (out64, grads64, eager_out, eager_grads)
        del encoder64, params64, fn64
    elif mode == "fwd+bwd":
        channels = encoder.conv_layers[-1].conv.out_channels
        grad_out = torch.randn(batch, frames(samples, encoder), channels, device="cuda", dtype=dtype)

    for impl in impls:
        fn = encoder_fn(encoder, impl)
        row = dict(case=case, batch=batch, samples=samples, dtype=dtype_name, mode=mode, impl=impl)
        try:
            out, grads = run_once(fn, wave, grad_out, params, mode)
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
                return run_once(fn, wave, grad_out, params, mode)

            median, p20, p80 = time_ms(step)
            row.update(
                ms=median,
                ms_p20=p20,
                ms_p80=p80,
                tflops=flops / (median * 1e-3) / 1e12,
                peak_mem_mb=peak_memory_bytes(step) / 2**20,
            )
        except Exception as e:  # one implementation failing must not hide the others' numbers
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list of {list(DTYPES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)}")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 output check (not recommended)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results root (default bench/results)")
    args = parser.parse_args(argv)
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
        print("conv_feature_extractor benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    rows = []
    for case in args.cases:
        for dtype_name in args.dtypes:
            for mode in args.modes:
                rows += bench_case(case, dtype_name, mode, args.impls, check_outputs=not args.no_check)
                torch.cuda.empty_cache()
    out_dir = args.out / re.sub(r"[^A-Za-z0-9_.-]+", "_", env["gpu"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "conv_feature_extractor.json"
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
