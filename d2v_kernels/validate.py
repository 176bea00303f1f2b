"""``d2v-kernels validate``: check every op and every Data2Vec model on the hardware present.

On a GPU: every backend that can run (CUDA, Triton, eager) at real sizes. On a CPU: the eager
path, and the Triton kernels through the interpreter at small sizes. Each row: what was checked,
the backend that ran, dtype, shape, max error against a float64 reference, and the bound it must
meet (twice eager PyTorch's own error in that dtype plus a small floor; about 1e-5 relative in
fp32).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import torch

from d2v_kernels import dispatch
from d2v_kernels.testing import error_bound, max_abs_err


@dataclasses.dataclass
class Row:
    check: str
    backend: str
    dtype: str
    shape: str
    max_err: float
    bound: float
    passed: bool
    note: str = ""

    @property
    def skipped(self) -> bool:
        return self.note.startswith(SKIPPED)


SKIPPED = "skipped: "
# The ops ``validate_ops`` checks (``--op`` takes these).
OPS = ("layer_norm_gelu", "add_layer_norm", "attention", "pos_conv", "conv_feature_extractor")


# ----------------------------------------------------------------------------------- op cases


def _op_cases(device: str, real: bool) -> list[tuple[str, str, Callable, Callable]]:
    """(op, shape label, make_inputs(dtype) -> (args, kwargs), call(args, kwargs))."""
    from d2v_kernels import ops

    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    cases = []
    rows, channels = ((8 * 3199, 512), (8 * 499, 768)) if real else ((2 * 37, 48), (2 * 19, 500))
    for n_rows, c in (rows, channels):

        def lng(dtype, n_rows=n_rows, c=c):
            return (randn(n_rows, c, dtype=dtype), randn(c, scale=0.5) + 1, randn(c, scale=0.1)), {}

        cases.append(("layer_norm_gelu", f"({n_rows}, {c}) last", lng, lambda a, k: ops.layer_norm_gelu(*a, **k)))
    t = 3199 if real else 37

    def lng_cf(dtype, t=t):
        c = 512 if real else 48
        return (randn(2, c, t, dtype=dtype), None, None), {"channels_dim": 1}

    cases.append(
        ("layer_norm_gelu", f"(2, {512 if real else 48}, {t}) first", lng_cf, lambda a, k: ops.layer_norm_gelu(*a, **k))
    )

    def aln(dtype):
        shape = (8, 499, 768) if real else (2, 37, 48)
        return (randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), randn(shape[-1]) + 1, randn(shape[-1])), {}

    cases.append(
        ("add_layer_norm", "(8, 499, 768)" if real else "(2, 37, 48)", aln, lambda a, k: ops.add_layer_norm(*a, **k))
    )

    def attn_table(dtype):
        b, n, h, d = (64, 197, 12, 64) if real else (2, 50, 3, 32)
        window = 14 if real else 7
        r = (2 * window - 1) ** 2 + 3
        from transformers.models.data2vec.modeling_data2vec_vision import Data2VecVisionRelativePositionBias

        index = Data2VecVisionRelativePositionBias.generate_relative_position_index((window, window)).to(device)
        q, k, v = (randn(b, n, h, d, dtype=dtype) for _ in range(3))
        return (q, k, v), {"bias_table": randn(r, h), "bias_index": index}

    cases.append(
        (
            "attention",
            "vision B64 N197 H12 d64 table" if real else "B2 N50 H3 d32 table",
            attn_table,
            lambda a, k: ops.attention(*a, **k),
        )
    )

    def attn_pad(dtype):
        b, n, h, d = (8, 499, 12, 64) if real else (2, 45, 3, 16)
        mask = torch.ones(b, n, dtype=torch.bool, device=device)
        mask[-1, n // 2 :] = False
        q, k, v = (randn(b, n, h, d, dtype=dtype) for _ in range(3))
        return (q, k, v), {"key_padding_mask": mask}

    cases.append(
        (
            "attention",
            "audio B8 N499 H12 d64 pad" if real else "B2 N45 H3 d16 pad",
            attn_pad,
            lambda a, k: ops.attention(*a, **k),
        )
    )

    def attn_causal(dtype):
        b, nq, nk, h, d = (4, 128, 512, 12, 64) if real else (1, 5, 19, 2, 64)
        q = randn(b, nq, h, d, dtype=dtype)
        k, v = randn(b, nk, h, d, dtype=dtype), randn(b, nk, h, d, dtype=dtype)
        return (q, k, v), {"causal": True}

    cases.append(("attention", "causal Nq<Nk", attn_causal, lambda a, k: ops.attention(*a, **k)))

    def pos(dtype):
        b, t, c, groups, kk, layers = (8, 499, 768, 16, 19, 5) if real else (2, 50, 48, 4, 5, 2)
        ws = [randn(c, c // groups, kk, scale=(c // groups * kk) ** -0.5) for _ in range(layers)]
        bs = [randn(c, scale=0.1) for _ in range(layers)]
        return (randn(b, t, c, dtype=dtype), [w.to(dtype) for w in ws], [x.to(dtype) for x in bs]), {"groups": groups}

    cases.append(
        (
            "pos_conv",
            "B8 T499 C768 g16 k19 x5" if real else "B2 T50 C48 g4 k5 x2",
            pos,
            lambda a, k: ops.pos_conv(*a, **k),
        )
    )

    def fe(dtype):
        if real:
            dims, kernels, strides, s = [512] * 7, (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2), 16001
        else:
            dims, kernels, strides, s = [40, 40, 40], (10, 3, 2), (5, 2, 2), 1601
        c_in, ws = 1, []
        for c, kk in zip(dims, kernels):
            ws.append(randn(c, c_in, kk, scale=(c_in * kk) ** -0.5).to(dtype))
            c_in = c
        lw = [(randn(c, scale=0.2) + 1).to(dtype) for c in dims]
        lb = [randn(c, scale=0.1).to(dtype) for c in dims]
        return (randn(2, s, dtype=dtype), ws, lw, lb), {"strides": list(strides)}

    cases.append(
        (
            "conv_feature_extractor",
            "B2 S16001 base" if real else "B2 S1601 small",
            fe,
            lambda a, k: ops.conv_feature_extractor(*a, **k),
        )
    )
    return cases


def _to64(obj):
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to64(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to64(v) for k, v in obj.items()}
    return obj


def validate_ops(device: str, dtypes, real: bool, only: set[str] | None = None) -> list[Row]:
    rows = []
    for op, label, make, call in _op_cases(device, real):
        if only and op not in only:
            continue
        for dtype in dtypes:
            args, kwargs = make(dtype)
            with dispatch.use_backend(**{op: "eager"}):
                ref = call(_to64(args), _to64(kwargs))
                eager = call(args, kwargs)
            eager_err = max_abs_err(eager, ref)
            bound = error_bound(dtype, eager_err, ref.abs().max().item())
            for impl in dispatch.implementations(op):
                reasons = dispatch.reasons_for(impl, torch.device(device), *args, forced=True, **kwargs)
                if reasons:
                    if impl.backend != "eager":
                        rows.append(
                            Row(
                                op,
                                impl.backend,
                                _dt(dtype),
                                label,
                                float("nan"),
                                bound,
                                True,
                                SKIPPED + "; ".join(reasons),
                            )
                        )
                    continue
                t0 = time.perf_counter()
                try:
                    with dispatch.use_backend(**{op: impl.backend}):
                        out = call(args, kwargs)
                    err = max_abs_err(out, ref)
                    ok = bool(torch.isfinite(out).all()) and err <= bound
                    note = f"{time.perf_counter() - t0:.1f}s"
                except Exception as e:  # a crash is a failure with its message, not an abort
                    err, ok, note = float("nan"), False, f"{type(e).__name__}: {e}"[:120]
                rows.append(Row(op, impl.backend, _dt(dtype), label, err, bound, ok, note))
    return rows


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


# -------------------------------------------------------------------------------- model cases


def validate_models(device: str, dtypes, backends: list[str | None]) -> list[Row]:
    """Every Data2Vec class, optimize()d, against transformers' eager model in float64."""
    import transformers

    import d2v_kernels
    from d2v_kernels import testing

    rows = []
    for class_name in testing.ALL_CLASSES:
        config = testing.config_for(class_name)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        reference = testing.randomize_(getattr(transformers, class_name)(config)).eval()
        inputs = testing.inputs_for(class_name, config, labels=False)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        ref64 = copy.deepcopy(reference).double().to(device)
        with torch.no_grad():
            expected = _main_output(ref64(**_to64(inputs)))
        for dtype in dtypes:
            hf_model = copy.deepcopy(reference).to(device=device, dtype=dtype)
            fused = d2v_kernels.optimize(copy.deepcopy(hf_model), attn_implementation="d2v_kernels")
            cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
            with torch.no_grad():
                eager_err = max_abs_err(_main_output(hf_model(**cast)), expected)
            bound = error_bound(dtype, eager_err, expected.abs().max().item())
            for backend in backends:
                with torch.no_grad(), d2v_kernels.record_dispatch() as calls:
                    try:
                        if backend is None:
                            out = _main_output(fused(**cast))
                        else:
                            with d2v_kernels.use_backend(backend):
                                out = _main_output(fused(**cast))
                        err = max_abs_err(out, expected)
                        ok, note = bool(torch.isfinite(out).all()) and err <= bound, ""
                    except Exception as e:
                        err, ok, note = float("nan"), False, f"{type(e).__name__}: {e}"[:120]
                ran = sorted({b for (_, b) in calls})
                note = note or ", ".join(f"{op}:{b} x{n}" for (op, b), n in sorted(calls.items()))
                label = "/".join(ran) if ran else (backend or "auto")
                rows.append(Row(class_name, label, _dt(dtype), _shape(inputs), err, bound, ok, note))
    return rows


def _main_output(output) -> torch.Tensor:
    for key in ("logits", "last_hidden_state", "embeddings"):
        value = output.get(key) if hasattr(output, "get") else None
        if value is not None:
            return value
    return output[0]


def _shape(inputs) -> str:
    first = next(iter(inputs.values()))
    return "x".join(str(s) for s in first.shape)


# ------------------------------------------------------------------------------------- report


def format_table(rows: list[Row]) -> str:
    header = ("check", "backend", "dtype", "shape", "max err", "bound", "result", "note")
    body = [
        (
            r.check,
            r.backend,
            r.dtype,
            r.shape,
            "-" if r.max_err != r.max_err else f"{r.max_err:.2e}",
            f"{r.bound:.2e}",
            "skip" if r.skipped else ("PASS" if r.passed else "FAIL"),
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    widths[-1] = 0
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths[:-1]] + ["----"]), *map(line, body)])


def summary(rows: list[Row]) -> str:
    """The counts of passed, failed and skipped rows, then a line per skipped row with its reason."""
    skipped = [r for r in rows if r.skipped]
    failed = sum(1 for r in rows if not r.passed)
    passed = len(rows) - failed - len(skipped)
    head = f"{len(rows)} checks: {passed} passed, {failed} failed, {len(skipped)} skipped" + (
        " -> FAIL" if failed else ""
    )
    lines = [f"  {r.check} {r.backend} {r.dtype}: {r.note.removeprefix(SKIPPED)}" for r in skipped]
    return "\n".join([head, *(["skipped:", *lines] if lines else [])])


def run(
    *, ops_only: bool = False, models_only: bool = False, quick: bool = False, only: set[str] | None = None
) -> tuple[list[Row], bool]:
    """Run the checks for this machine; returns (rows, all passed). ``only``: ops among ``OPS``."""
    if ops_only and models_only:
        raise ValueError("ops_only and models_only: at most one may be set (together they check nothing)")
    unknown = sorted(set(only or ()) - set(OPS))
    if unknown:
        raise ValueError(f"only: unknown ops {unknown}; the known ones are {list(OPS)}")
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    rows: list[Row] = []
    if not models_only:
        rows += validate_ops(device, dtypes, real=on_gpu and not quick, only=only)
    if not ops_only:
        model_dtypes = dtypes if on_gpu else [torch.float32]
        backends: list[str | None] = [None]
        if dispatch.triton_interpreter_enabled() or on_gpu:
            backends.append("triton")
        rows += validate_models(device, model_dtypes, backends)
    return rows, all(r.passed for r in rows)
