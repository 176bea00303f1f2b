"""Benchmark d2v_kernels' fused attention against what a user would otherwise run.

Implementations: ``d2v`` (the public ops.attention under default dispatch: what a user gets, the
backend the measured rule picks), ``d2v_triton`` (forced: the Triton kernel, table bias gathered
in-kernel), ``d2v_triton_dense`` (the Triton kernel fed the table gathered once into a dense
(1, H, N, N) bias with aligned rows), ``d2v_sdpa`` (forced: ops.attention's sdpa backend), ``eager`` (the reference:
matmul + materialised bias + softmax, as transformers' eager path), ``sdpa_bias``
(F.scaled_dot_product_attention as transformers' sdpa path calls it: the table's (1, H, N, N)
bias shared by the batch, or the padding as a (B, 1, 1, N) additive mask), ``flex`` (compiled
FlexAttention whose score_mod gathers the table and applies the padding mask; uncompiled off the
GPU), ``sdpa_nobias`` (SDPA without any bias or mask on the full padded length: the flash
kernel's speed of light, checked against the reference without bias).

Cases: vision base (B=64, H=12, N=197, d=64, table bias), vision large (B=32, H=16, N=197, d=64,
table bias), audio base (B=8, H=12, N=499, d=64, right padding, lengths 499 down to 250), text
base (B=32, H=12, N=512, d=64, right padding with bench.models' text lengths: uniform in
[128, 512], the first row full), audio base without a mask (bench.models' audio batch); fp16 and bf16; forward and forward+backward (gradients of q, k,
v and the table). Every implementation's output and gradients are checked against a float64 run
before it is timed (error at most twice eager's own plus a small floor). Reports median / p20 /
p80 ms, the CUDA-graph replay (``ms_graph``), TFLOP/s of the valid work only (4 B H L_q L_k d
summed over the rows' valid lengths for the forward, 3.5x that for forward+backward; the padded
total is ``flops_padded``) and peak memory. Writes ``bench/results/<gpu>/<date>-attention.json``;
``python -m bench.attention_rule <that file>`` prints the dispatch rule's rows from it.

    python -m bench.attention [--quick] [--cases vision_base,...] [--dtypes fp16,bf16] [--modes fwd,fwd+bwd]
                              [--impls d2v,d2v_triton,d2v_sdpa,d2v_triton_dense,eager,sdpa_bias,flex,sdpa_nobias]
    python -m bench.attention --check-only --tiny --device cpu     # the output checks on a CPU
"""

from __future__ import annotations

import functools
import sys
import warnings

import torch
import torch.nn.functional as F

from bench import common, op_benchmark

# name: (batch, heads, seq, head_dim, bias kind)
CASES = {
    "vision_base": (64, 12, 197, 64, "table"),
    "vision_large": (32, 16, 197, 64, "table"),
    "audio_base": (8, 12, 499, 64, "padding"),
    "text_base": (32, 12, 512, 64, "padding"),
    "audio_base_nomask": (8, 12, 499, 64, "none"),  # bench.models' audio batch: equal lengths, no mask
}
QUICK_CASES = ("vision_base", "text_base")
# For --check-only --tiny (CPU; d2v_triton runs there under TRITON_INTERPRET=1): a 4 x 4 grid + CLS.
TINY_CASES = {"tiny_table": (2, 2, 17, 16, "table"), "tiny_padding": (2, 3, 11, 16, "padding")}
SHAPES = {**CASES, **TINY_CASES}
# d2v_triton_dense: our kernel fed the relative position bias gathered once into a dense
# (1, H, N, N) tensor with 16-element aligned rows (shared by the batch, L2-resident, the one
# ops.attention's sdpa backend passes) instead of gathering it in the kernel (an index load, then
# a dependent table load, per score): which is faster decides what the Triton path should do with
# a table. The same as d2v_triton for the other cases.
IMPLS = ("d2v", "d2v_triton", "d2v_sdpa", "d2v_triton_dense", "eager", "sdpa_bias", "flex", "sdpa_nobias")
# The forced ops.attention rows: impl -> backend.
FORCED = {"d2v_triton": "triton", "d2v_sdpa": "sdpa"}


def relative_position_index(window: int) -> torch.Tensor:
    """BEiT / Data2VecVision (N, N) index for a window x window patch grid plus CLS."""
    from transformers.models.data2vec.modeling_data2vec_vision import Data2VecVisionRelativePositionBias

    return Data2VecVisionRelativePositionBias.generate_relative_position_index((window, window))


def make_inputs(case: str, dtype: torch.dtype, device: str = "cuda", seed: int = 0) -> dict:
    """q, k, v as strided views of one fused (B, N, 3, H, d) projection, plus the case's bias."""
    batch, heads, seq, head_dim, kind = SHAPES[case]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    inputs = {"q": qkv[:, :, 0], "k": qkv[:, :, 1], "v": qkv[:, :, 2], "bias_table": None, "bias_index": None}
    inputs["key_padding_mask"] = None
    if kind == "table":
        window = round((seq - 1) ** 0.5)
        index = relative_position_index(window)
        table = 0.5 * torch.randn(int(index.max()) + 1, heads, generator=gen)
        inputs["bias_table"] = table.to(device=device, dtype=dtype)
        inputs["bias_index"] = index.to(device=device, dtype=torch.int32)  # as the vision model passes it
    elif kind == "padding":
        lengths = padded_lengths(case)
        mask = torch.arange(seq)[None, :] < lengths[:, None]
        inputs["key_padding_mask"] = mask.to(device=device, dtype=torch.int64)
    return inputs


def padded_lengths(case: str) -> torch.Tensor:
    """The valid length of each row of a padding case: text as bench.models draws its batch
    (uniform in [128, N] from seed 1, the first row full), the others N down to N / 2."""
    batch, _, seq, _, _ = SHAPES[case]
    if case == "text_base":
        lengths = torch.randint(128, seq + 1, (batch,), generator=torch.Generator(device="cpu").manual_seed(1))
        lengths[0] = seq
        return lengths
    return torch.linspace(seq, seq // 2, batch).long()  # every row keeps at least half its keys


def attention_fn(impl: str, inputs: dict):
    """(q, k, v, table) -> (B, N, H, d) for one implementation."""
    index, mask = inputs["bias_index"], inputs["key_padding_mask"]

    def dense_bias(q, table):
        """The additive bias transformers' sdpa path passes: the table's (1, H, N, N) bias shared by
        the batch (a case has a table or padding, never both), or the (B, 1, 1, N) padding mask."""
        if table is not None:
            return table[index].permute(2, 0, 1).unsqueeze(0).contiguous()
        if mask is not None:
            return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                mask == 0, torch.finfo(q.dtype).min
            )[:, None, None, :]
        return None

    if impl == "d2v" or impl in FORCED:
        import contextlib

        import d2v_kernels
        from d2v_kernels import ops

        forced = d2v_kernels.use_backend(attention=FORCED[impl]) if impl in FORCED else contextlib.nullcontext()

        def run(q, k, v, table):
            with forced:
                return ops.attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=mask)

        return run
    if impl == "d2v_triton_dense":
        import d2v_kernels
        from d2v_kernels import ops
        from d2v_kernels.ops.attention_op import gathered_bias

        def run(q, k, v, table):
            # (1, H, N, N) with rows padded to 16 elements (aligned vector loads), kept in inference
            bias = None if table is None else gathered_bias(table, index, q.dtype)
            with d2v_kernels.use_backend(attention="triton"):
                return ops.attention(q, k, v, bias=bias, key_padding_mask=mask)

        return run
    if impl == "eager":
        from d2v_kernels.ops.attention_op import attention_reference

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

        if inputs["q"].is_cuda:
            flex = torch.compile(flex_attention, dynamic=False)
        else:  # eager FlexAttention (the CPU check of the score_mod): forward only, and it warns once
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            flex = flex_attention

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


def attention_flops(case: str, mode: str, valid_only: bool = False) -> float:
    """2 x multiply-adds of QK^T and PV on the padded shape; the backward does 2.5x the forward's.
    ``valid_only``: over each row's valid queries and keys only (padding cases)."""
    batch, heads, seq, head_dim, kind = SHAPES[case]
    pairs = float(batch * seq * seq)
    if valid_only and kind == "padding":
        pairs = float((padded_lengths(case).double() ** 2).sum())
    return 4.0 * heads * head_dim * pairs * (3.5 if mode == "fwd+bwd" else 1.0)


def setup_case(case: str, dtype_name: str, mode: str, device: str = "cuda") -> op_benchmark.OpCase:
    """Inputs of one case; steps return [out] or [out, dq, dk, dv(, dtable)]."""
    dtype = common.DTYPES[dtype_name]
    inputs = make_inputs(case, dtype, device)
    without_bias = {**inputs, "bias_index": None, "key_padding_mask": None}
    leaves = [inputs["q"], inputs["k"], inputs["v"], inputs["bias_table"]]
    gen = torch.Generator(device="cpu").manual_seed(1)
    grad_out = torch.randn(inputs["q"].shape, generator=gen).to(device, dtype) if mode == "fwd+bwd" else None

    def impl_inputs(impl: str):
        """sdpa_nobias runs (and is checked) without the bias."""
        return (inputs, leaves) if impl != "sdpa_nobias" else (without_bias, leaves[:3] + [None])

    def make_step(impl: str):
        if impl == "flex" and mode == "fwd+bwd" and device != "cuda":
            raise op_benchmark.Skip("FlexAttention has no backward on the CPU")
        impl_in, impl_leaves = impl_inputs(impl)
        fn = attention_fn(impl, impl_in)
        return lambda: op_benchmark.forward_backward(fn, impl_leaves, grad_out, mode)

    @functools.cache
    def reference_for(with_bias: bool):
        ref_in, ref_leaves = impl_inputs("eager" if with_bias else "sdpa_nobias")
        eager = attention_fn("eager", ref_in)
        leaves64 = [None if t is None else t.double() for t in ref_leaves]
        grad64 = None if grad_out is None else grad_out.double()
        return (
            op_benchmark.forward_backward(eager, leaves64, grad64, mode),
            op_benchmark.forward_backward(eager, ref_leaves, grad_out, mode),
        )

    batch, heads, seq, head_dim, kind = SHAPES[case]
    row = dict(case=case, batch=batch, heads=heads, seq=seq, head_dim=head_dim, bias=kind, dtype=dtype_name, mode=mode)
    row["flops_padded"] = attention_flops(case, mode)
    return op_benchmark.OpCase(
        row=row,
        make_step=make_step,
        reference=lambda impl: reference_for(impl != "sdpa_nobias"),
        flops=attention_flops(case, mode, valid_only=True),
    )


BENCHMARK = op_benchmark.OpBenchmark(
    "attention", __doc__, setup_case, tuple(CASES), QUICK_CASES, tuple(TINY_CASES), IMPLS
)
# main(argv) -> exit status
main, parse_args = BENCHMARK.main, BENCHMARK.parse_args


if __name__ == "__main__":
    sys.exit(main())
