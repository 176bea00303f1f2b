"""End-to-end benchmarks: whole Data2Vec models with ``d2v_kernels.optimize`` against what a user
would otherwise run (transformers eager, sdpa, flash-attention 2, torch.compile).

Models (base configs, random weights; every parameter perturbed so no bias table is zero):

- ``audio_ctc``: Data2VecAudioForCTC base on B=8 x 10 s and B=1 x 30 s of 16 kHz audio.
- ``vision_base`` / ``vision_large``: Data2VecVisionForImageClassification at 224 px, B=64 and
  B=1, ``use_relative_position_bias=True`` as in the released checkpoints, 1000 classes.
- ``text_base``: Data2VecTextForSequenceClassification base, B=32 x 512 tokens, rows padded to
  lengths between 128 and 512 (the first row full).

Modes: ``inference`` (eval, no grad, logits) and ``train`` (train mode with the config's
dropouts, forward + loss + backward + AdamW step). ``--train-precision pure`` (default) casts the
model to the dtype (what the fused kernels are built for); ``autocast`` keeps fp32 weights under
``torch.autocast`` (the Trainer's ``bf16=True``), where some fused paths decline and fall back.

Before anything is timed, each implementation's logits (inference mode, no dropout) are checked
against a float64 run of transformers' eager model on the same weights: the max error may be at
most ``--check-factor`` (default 4) x the error of transformers eager in the same dtype, plus a
floor. Train steps are checked for a finite loss and finite gradients.

Rows: median / p20 / p80 ms per call, throughput (audio seconds/s, images/s, tokens/s with
padding excluded), peak memory, max error, and for our models the dispatch counts of one call
(which backend ran each op). B=1 rows are the batch-1 latency.

    python -m bench.models [--model audio_ctc,vision_base,...] [--dtype fp16,bf16] [--mode inference,train]
                           [--impls d2v,hf_sdpa,...] [--case b1] [--quick] [--check-only] [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import common
from d2v_kernels.testing import CheckFailed, assert_close_to_reference

SAMPLE_RATE = 16_000
MODES = ("inference", "train")
# Ours first; the report computes the speedup of every d2v* row over every other row.
IMPLS = (
    "d2v",
    "hf_eager",
    "hf_sdpa",
    "hf_flash",
    "xformers",
    "hf_compile",
    "hf_compile_max_autotune",
    "hf_compile_cudagraphs",
    "d2v_compile",
    "d2v_compile_cudagraphs",
)
# Everything but torch.compile of our model in its default mode (our kernels are opaque custom ops
# to the compiler; what it adds is CUDA graphs, which d2v_compile_cudagraphs measures). On a GPU
# whose host is slow, every eager step is bound by the host's Python and launch time (bench/NOTES.md),
# so the CUDA-graph pair is in the quick list too.
DEFAULT_IMPLS = tuple(i for i in IMPLS if i != "d2v_compile")
QUICK_IMPLS = ("d2v", "hf_eager", "hf_sdpa", "hf_compile", "d2v_compile_cudagraphs", "hf_compile_cudagraphs")
IMPL_DESCRIPTIONS = {
    "d2v": "d2v_kernels.optimize(model) (fused Triton / CUDA kernels)",
    "hf_eager": 'transformers, attn_implementation="eager"',
    "hf_sdpa": 'transformers, attn_implementation="sdpa" (torch scaled_dot_product_attention)',
    "hf_flash": 'transformers, attn_implementation="flash_attention_2" (flash-attn package)',
    "xformers": "xformers memory-efficient attention",
    "hf_compile": "torch.compile(transformers sdpa model), default mode",
    "hf_compile_max_autotune": 'torch.compile(transformers sdpa model, mode="max-autotune-no-cudagraphs")',
    "hf_compile_cudagraphs": 'torch.compile(transformers sdpa model, mode="reduce-overhead"): CUDA graphs, the batch-1 latency choice',
    "d2v_compile": "torch.compile(d2v_kernels.optimize(model)), default mode",
    "d2v_compile_cudagraphs": 'torch.compile(d2v_kernels.optimize(model), mode="reduce-overhead"): CUDA graphs',
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: its class, base config, cases and throughput unit."""

    name: str
    class_name: str
    modality: str  # "audio", "vision" or "text"
    config_kwargs: dict[str, Any]
    cases: dict[str, dict[str, Any]]
    tiny_case: dict[str, Any]
    unit: str

    def config(self, *, tiny: bool = False):
        """The transformers config: the real base / large size, or a small one for CPU smoke runs."""
        import transformers

        from d2v_kernels import testing

        if tiny:
            make = {"audio": testing.audio_config, "vision": testing.vision_config, "text": testing.text_config}
            keep = {k: v for k, v in self.config_kwargs.items() if k in ("use_relative_position_bias",)}
            return make[self.modality](**keep)
        cls = getattr(transformers, f"Data2Vec{self.modality.capitalize()}Config")
        return cls(**self.config_kwargs)


# Dropouts stay at the configs' defaults (the train step is a real fine-tuning step), except
# layerdrop, which skips whole layers at random and would make the step's work vary.
MODELS: dict[str, ModelSpec] = {
    "audio_ctc": ModelSpec(
        "audio_ctc",
        "Data2VecAudioForCTC",
        "audio",
        {"layerdrop": 0.0, "vocab_size": 32, "ctc_loss_reduction": "mean"},
        {"b8x10s": {"batch": 8, "seconds": 10.0}, "b1x30s": {"batch": 1, "seconds": 30.0}},
        {"batch": 2, "seconds": 0.1},
        "audio s/s",
    ),
    "vision_base": ModelSpec(
        "vision_base",
        "Data2VecVisionForImageClassification",
        "vision",
        {"use_relative_position_bias": True, "use_mean_pooling": True, "num_labels": 1000, "image_size": 224},
        {"b64": {"batch": 64}, "b1": {"batch": 1}},
        {"batch": 2},
        "images/s",
    ),
    "vision_large": ModelSpec(
        "vision_large",
        "Data2VecVisionForImageClassification",
        "vision",
        {
            "use_relative_position_bias": True,
            "use_mean_pooling": True,
            "num_labels": 1000,
            "image_size": 224,
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
        },
        {"b64": {"batch": 64}, "b1": {"batch": 1}},
        {"batch": 2},
        "images/s",
    ),
    "text_base": ModelSpec(
        "text_base",
        "Data2VecTextForSequenceClassification",
        "text",
        # as facebook/data2vec-text-base: RoBERTa's vocabulary and 514 positions (ids start after padding_idx)
        {"num_labels": 2, "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1},
        {"b32x512": {"batch": 32, "length": 512, "min_length": 128}},
        {"batch": 2, "length": 13, "min_length": 7},
        "tokens/s",
    ),
}


# ------------------------------------------------------------------------------------------ inputs


@dataclasses.dataclass
class Batch:
    """Model inputs (floating ones in fp32; cast per variant), labels, and the throughput units."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    units: float

    def to(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.inputs.items()}


def make_batch(spec: ModelSpec, case: dict[str, Any], config, device: str, seed: int = 1) -> Batch:
    """Seeded inputs and labels for one case; ``units`` = audio seconds, images or real tokens."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch = case["batch"]
    if spec.modality == "audio":
        samples = int(case["seconds"] * SAMPLE_RATE)
        wave = torch.randn(batch, samples, generator=gen)
        wave = (wave - wave.mean(-1, keepdim=True)) / wave.std(-1, keepdim=True)  # as the feature extractor does
        label_len = max(2, int(case["seconds"] * 15))  # about 15 characters per second of speech
        labels = torch.randint(1, config.vocab_size, (batch, label_len), generator=gen)
        inputs, units = {"input_values": wave}, batch * case["seconds"]
    elif spec.modality == "vision":
        pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=gen)
        labels = torch.randint(0, config.num_labels, (batch,), generator=gen)
        inputs, units = {"pixel_values": pixels}, float(batch)
    else:
        length, min_length = case["length"], case["min_length"]
        if config.pad_token_id + length >= config.max_position_embeddings:  # position ids start at pad + 1
            raise ValueError(
                f"{spec.name}: {length} tokens need max_position_embeddings > {config.pad_token_id + length}, "
                f"the config has {config.max_position_embeddings}"
            )
        lengths = torch.randint(min_length, length + 1, (batch,), generator=gen)
        lengths[0] = length
        ids = torch.randint(3, config.vocab_size, (batch, length), generator=gen)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, config.pad_token_id))
        labels = torch.randint(0, config.num_labels, (batch,), generator=gen)
        inputs, units = {"input_ids": ids, "attention_mask": mask}, float(lengths.sum())
    return Batch({k: v.to(device) for k, v in inputs.items()}, labels.to(device), units)


# ---------------------------------------------------------------------------------------- variants


def impl_reasons(spec: ModelSpec, impl: str, dtype: torch.dtype, device: str) -> list[str]:
    """Why ``impl`` cannot run this model here ([] when it can)."""
    if impl not in IMPLS:
        return [f"unknown implementation {impl!r}"]
    reasons = []
    if impl == "hf_flash":
        if spec.modality == "vision":
            reasons.append("transformers' Data2VecVision has no flash-attention path (relative position bias)")
        if dtype not in (torch.float16, torch.bfloat16):
            reasons.append("flash-attention takes fp16 / bf16 only")
        try:
            import flash_attn  # noqa: F401
        except Exception as e:
            reasons.append(f"flash_attn not importable ({type(e).__name__}: {e})")
        if device != "cuda":
            reasons.append("flash-attention needs a CUDA GPU")
    if impl == "xformers":
        try:
            import xformers.ops  # noqa: F401

            reasons.append(
                "transformers has no xformers attention for Data2Vec models; "
                "xformers is compared per kernel in bench/attention.py"
            )
        except Exception as e:
            reasons.append(f"xformers not importable ({type(e).__name__}: {e})")
    return reasons


def _attn_implementation(impl: str) -> str:
    """The attention transformers builds the model with (d2v variants are built as sdpa, then optimized)."""
    return {"hf_eager": "eager", "hf_flash": "flash_attention_2"}.get(impl, "sdpa")


def instantiate(spec: ModelSpec, config, attn_implementation: str, device: str):
    """A model of ``spec`` in fp32 on ``device`` with the given transformers attention."""
    import transformers

    cls = getattr(transformers, spec.class_name)
    # transformers 5.x may build on the CPU whatever the device context says: move it explicitly.
    with torch.device(device):
        model = cls._from_config(copy.deepcopy(config), attn_implementation=attn_implementation, dtype=torch.float32)
    return model.to(device)


def master_weights(spec: ModelSpec, config, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights shared by every variant; every parameter perturbed (bias tables start at 0)."""
    torch.manual_seed(seed)
    model = instantiate(spec, config, "eager", device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "relative_position_bias_table" in name else 0.02
            p.add_(torch.randn(p.shape, generator=gen, device=device) * scale)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    return state


def build_variant(spec: ModelSpec, config, impl: str, state: dict, dtype: torch.dtype, device: str, *, train_precision):
    """(module, callable) for one implementation; the callable is what gets called (maybe compiled)."""
    import d2v_kernels

    model = instantiate(spec, config, _attn_implementation(impl), device)
    model.load_state_dict(state, strict=True)
    if not (train_precision == "autocast"):
        model.to(dtype)
    if impl.startswith("d2v"):
        d2v_kernels.optimize(model)
    call = model
    if impl in ("hf_compile", "d2v_compile"):
        call = torch.compile(model, dynamic=False)
    elif impl == "hf_compile_max_autotune":
        call = torch.compile(model, mode="max-autotune-no-cudagraphs", dynamic=False)
    elif impl in ("hf_compile_cudagraphs", "d2v_compile_cudagraphs"):
        call = torch.compile(model, mode="reduce-overhead", dynamic=False)
    return model, call


def _precision_context(train_precision: str, dtype: torch.dtype, device: str):
    if train_precision == "autocast":
        return torch.autocast(device_type=device, dtype=dtype)
    return contextlib.nullcontext()


def infer_logits(call, batch: Batch, dtype: torch.dtype, *, train_precision: str = "pure", device: str = "cuda"):
    with torch.no_grad(), _precision_context(train_precision, dtype, device):
        return call(**batch.to(torch.float32 if train_precision == "autocast" else dtype)).logits


def reference_logits(spec: ModelSpec, config, state: dict, batch: Batch, device: str):
    """Logits of transformers' eager model in float64 on the shared weights."""
    model = instantiate(spec, config, "eager", device)
    model.load_state_dict(state, strict=True)
    model.double().eval()
    with torch.no_grad():
        logits = model(**batch.to(torch.float64)).logits
    del model
    return logits


def train_step_fn(model, call, batch: Batch, dtype: torch.dtype, *, train_precision: str, device: str):
    """A zero-argument fine-tuning step: forward with labels, backward, AdamW step, zero grads."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused) if fused else torch.optim.AdamW(params, lr=1e-5)
    inputs = batch.to(torch.float32 if train_precision == "autocast" else dtype)

    def step():
        with _precision_context(train_precision, dtype, device):
            loss = call(**inputs, labels=batch.labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def check():
        with _precision_context(train_precision, dtype, device):
            loss = call(**inputs, labels=batch.labels).loss
        loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise CheckFailed(f"train step: loss is {loss.item()}")
        if bad:
            raise CheckFailed(f"train step: non-finite gradients in {bad[:3]}{'...' if len(bad) > 3 else ''}")
        return {"loss": loss.item()}

    return step, check


# ------------------------------------------------------------------------------------------ running


@dataclasses.dataclass
class Options:
    dtypes: list[str]
    modes: list[str]
    impls: list[str]
    cases: list[str] | None = None
    quick: bool = False
    check_only: bool = False
    tiny: bool = False
    check_factor: float = 4.0
    train_precision: str = "pure"
    device: str = "cuda"


def _timing_kwargs(quick: bool) -> dict[str, Any]:
    return (
        {"warmup_ms": 50.0, "rep_ms": 200.0, "min_runs": 5}
        if quick
        else {"warmup_ms": 200.0, "rep_ms": 1000.0, "min_runs": 20}
    )


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def selected_cases(spec: ModelSpec, options: Options) -> dict[str, dict[str, Any]]:
    if options.tiny:
        return {"tiny": spec.tiny_case}
    cases = spec.cases
    if options.cases:
        cases = {k: v for k, v in cases.items() if k in options.cases}
    elif options.quick:
        cases = dict(list(cases.items())[:1])
    return cases


def bench_model(
    spec: ModelSpec,
    options: Options,
    rows: list[dict[str, Any]] | None = None,
    saved: Callable[[list[dict[str, Any]]], Any] = lambda rows: None,
) -> list[dict[str, Any]]:
    """Every (case, dtype, implementation, mode) of one model; a row each, printed as it comes,
    appended to ``rows``, and ``saved(rows)`` called after each implementation."""
    rows = [] if rows is None else rows
    config = spec.config(tiny=options.tiny)
    device = options.device
    for case_name, case in selected_cases(spec, options).items():
        batch = make_batch(spec, case, config, device)
        state = master_weights(spec, config, device)
        ref64 = reference_logits(spec, config, state, batch, device)
        for dtype_name in options.dtypes:
            dtype = common.DTYPES[dtype_name]
            base = dict(
                what=spec.name,
                model=spec.class_name,
                case=case_name,
                batch=case["batch"],
                dtype=dtype_name,
                precision=options.train_precision,
            )
            precision = options.train_precision
            _, eager_model = build_variant(spec, config, "hf_eager", state, dtype, device, train_precision=precision)
            eager_logits = infer_logits(eager_model.eval(), batch, dtype, train_precision=precision, device=device)
            del eager_model
            _free(device)
            for impl in options.impls:
                rows += bench_variant(spec, config, state, batch, ref64, eager_logits, impl, dtype, base, options)
                _free(device)
                saved(rows)
        del state, ref64
        _free(device)
    return rows


def bench_variant(spec, config, state, batch, ref64, eager_logits, impl, dtype, base, options) -> list[dict]:
    device = options.device
    rows = []
    reasons = impl_reasons(spec, impl, dtype, device)
    if reasons:
        print(f"skip {spec.name} {base['dtype']} {impl}: {'; '.join(reasons)}", file=sys.stderr)
        return [dict(base, mode=mode, impl=impl, skipped="; ".join(reasons)) for mode in options.modes]
    try:
        model, call = build_variant(spec, config, impl, state, dtype, device, train_precision=options.train_precision)
    except Exception as e:
        return [dict(base, mode=m, impl=impl, error=f"build: {type(e).__name__}: {e}") for m in options.modes]
    checked: dict[str, Any] = {
        "attn_implementation": "d2v_kernels" if impl.startswith("d2v") else _attn_implementation(impl)
    }
    try:
        model.eval()
        started = time.perf_counter()
        logits = infer_logits(call, batch, dtype, train_precision=options.train_precision, device=device)
        checked["first_call_s"] = time.perf_counter() - started  # includes torch.compile
        checked.update(
            assert_close_to_reference(logits, ref64, eager_logits, name=f"{impl} logits", factor=options.check_factor)
        )
        del logits
    except Exception as e:  # not timed when its output is wrong
        checked["error"] = f"{type(e).__name__}: {e}"
    # Inference before train: the train step changes the weights.
    for mode in [m for m in MODES if m in options.modes]:
        row = dict(base, mode=mode, impl=impl, **checked)
        if "error" not in checked:
            try:
                row.update(time_mode(spec, model, call, batch, dtype, mode, options))
                if impl.endswith("_cudagraphs") and "peak_mem_mb" in row:
                    # A graph replay allocates nothing: its memory sits in the graph's pool, which
                    # max_memory_allocated around one call does not see.
                    row["peak_mem_mb"] = None
                    row["peak_mem_note"] = "CUDA graph pool, not measured per call"
            except Exception as e:  # one implementation failing must not hide the others' numbers
                row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        common.print_row(row)
    del model, call
    return rows


def time_mode(spec, model, call, batch, dtype, mode, options) -> dict[str, Any]:
    """Timing, throughput and peak memory of one mode (after a train-step check for ``train``)."""
    device, precision = options.device, options.train_precision
    out: dict[str, Any] = {}
    if mode == "inference":
        model.eval()

        def fn():
            return infer_logits(call, batch, dtype, train_precision=precision, device=device)

    else:
        model.train()
        fn, check = train_step_fn(model, call, batch, dtype, train_precision=precision, device=device)
        out.update(check())
    if spec_uses_our_ops(model):
        out["dispatch"] = dispatch_counts(fn)
    if options.check_only:
        return out
    timing = common.time_ms(fn, **_timing_kwargs(options.quick))
    out.update(timing.as_row())
    out.update(
        throughput=batch.units / (timing.ms * 1e-3),
        throughput_unit=spec.unit,
        peak_mem_mb=common.peak_memory_mb(fn),
    )
    return out


def spec_uses_our_ops(model) -> bool:
    """Whether ``model`` holds a module of ``d2v_kernels.models`` (its calls are worth recording)."""
    return any(type(m).__module__.startswith("d2v_kernels.") for m in model.modules())


def dispatch_counts(fn: Callable[[], object]) -> dict[str, int]:
    """``{"op/backend": calls}`` of one call of ``fn``: which implementation ran each op (a compiled
    model's ops record nothing once traced: its row shows what the eager warm-up ran)."""
    import d2v_kernels

    with d2v_kernels.record_dispatch() as calls:
        fn()
    return {f"{op}/{backend}": n for (op, backend), n in sorted(calls.items())}


# ---------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.models",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="implementations:\n" + "\n".join(f"  {k:<24} {v}" for k, v in IMPL_DESCRIPTIONS.items()),
    )
    parser.add_argument("--model", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    parser.add_argument(
        "--dtype", "--dtypes", dest="dtype", default=None, help="comma list of fp16,bf16 (default both)"
    )
    parser.add_argument("--mode", "--modes", dest="mode", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    parser.add_argument("--impls", default=None, help=f"comma list of {list(IMPLS)} (default: all but d2v_compile)")
    parser.add_argument("--case", "--cases", dest="case", default=None, help="comma list of case names (per model)")
    parser.add_argument(
        "--quick", action="store_true", help="bf16, first case of each model, fewer impls, shorter timing"
    )
    parser.add_argument("--check-only", action="store_true", help="check outputs, time nothing (runs on a CPU)")
    parser.add_argument("--tiny", action="store_true", help="small random configs (for a smoke run, with --check-only)")
    parser.add_argument("--check-factor", type=float, default=4.0, help="bound = factor x eager's error + floor")
    parser.add_argument("--train-precision", choices=("pure", "autocast"), default="pure")
    parser.add_argument("--device", default=None, help="default cuda; cpu only with --check-only")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="results root (default bench/results)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.models = common.parse_list(args.model, MODELS, "--model")
        default_dtypes = "bf16" if args.quick else "fp16,bf16"
        args.dtypes = common.parse_list(args.dtype or default_dtypes, ("fp16", "bf16", "fp32"), "--dtype")
        args.modes = common.parse_list(args.mode, MODES, "--mode")
        default_impls = QUICK_IMPLS if args.quick else DEFAULT_IMPLS
        args.impls = common.parse_list(args.impls or ",".join(default_impls), IMPLS, "--impls")
        all_cases = sorted({c for m in args.models for c in MODELS[m].cases})
        args.cases = common.parse_list(args.case, all_cases, "--case") if args.case else None
    except ValueError as e:
        parser.error(str(e))
    if not (args.models and args.dtypes and args.modes and args.impls):
        parser.error("--model, --dtype, --mode and --impls must each name at least one")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() or not args.check_only else "cpu"
    if args.device != "cuda" and not args.check_only:
        parser.error("timing needs --device cuda; use --check-only for a CPU run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda":
        refused = common.require_gpu("bench.models")
        if refused is not None:
            return refused
    options = Options(
        dtypes=args.dtypes,
        modes=args.modes,
        impls=args.impls,
        cases=args.cases,
        quick=args.quick,
        check_only=args.check_only,
        tiny=args.tiny,
        check_factor=args.check_factor,
        train_precision=args.train_precision,
        device=args.device,
    )
    env = common.environment(argv)
    status = 0
    for name in args.models:
        rows: list[dict[str, Any]] = []
        what = f"model-{name}" + ("-quick" if args.quick else "")
        extra = dict(quick=args.quick, impls=IMPL_DESCRIPTIONS)
        save = common.progress_saver(what, env, args.out, enabled=not args.check_only, **extra)
        try:
            bench_model(MODELS[name], options, rows, save)
        except KeyboardInterrupt:
            print("interrupted: the result file holds the implementations that finished", flush=True)
            return common.INTERRUPTED
        save(rows, complete=True)
        if any("error" in row for row in rows):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
