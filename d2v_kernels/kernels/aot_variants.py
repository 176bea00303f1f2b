"""What the AOT check (:mod:`d2v_kernels.kernels.aot`) compiles: each configuration a launcher can
pick, per kernel module, as :class:`~d2v_kernels.kernels.aot.AotVariant`.

The tiles, warps and stages come from the launchers' own config functions (``fwd_config``,
``bwd_config``, ``tile_config``, ...), so what is compiled is what runs. ``VARIANTS`` maps each
kernel module's name to the function that lists its variants; tests/test_aot_compile.py checks that
every ``*_kernel`` of the kernel modules is in some list.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import torch

from d2v_kernels.kernels import _attention_backward, _attention_bias_grad, _row_norm, attention, pos_conv
from d2v_kernels.kernels import accumulate_target as acc_target
from d2v_kernels.kernels import conv_feature_extractor as cfe
from d2v_kernels.kernels._attention_common import tile_candidates
from d2v_kernels.kernels.aot import AotVariant, as_run
from d2v_kernels.kernels.autotune import SPACES

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(fn, types: dict, constexprs: dict) -> dict:
    """``fn``'s signature in argument order: its constexprs, then ``types``."""
    types = types | dict.fromkeys(constexprs, "constexpr")
    return {arg: types[arg] for arg in fn.arg_names}


# --------------------------------------------------------------------------------------------
# Row norm (layer_norm_gelu, add_layer_norm)
# --------------------------------------------------------------------------------------------

_ROW_NORM_FWD_POINTERS = ("X", "RES", "W", "B", "XS", "RS", "Y", "SUM", "MEAN", "RSTD")
_ROW_NORM_FWD_INTS = (
    ("n_pos", "n_channels", "tiles_per_batch")
    + tuple(f"stride_{t}_{a}" for t in ("x", "res", "y", "sum") for a in "bcp")
    + ("stride_w", "stride_bias", "stride_xs", "rows_per_scale")
)
_ROW_NORM_BWD_POINTERS = ("X", "RES", "W", "B", "XS", "RS", "DY", "DSUM", "MEAN", "RSTD", "DX", "DRES")
_ROW_NORM_PARTIALS = ("DW_PARTIAL", "DB_PARTIAL", "DXS_PARTIAL", "DXSUM_PARTIAL")
_ROW_NORM_BWD_INTS = (
    ("n_pos", "n_channels", "tiles_per_batch", "n_tiles")
    + tuple(f"stride_{t}_{a}" for t in ("x", "res", "dy", "dsum", "dx", "dres") for a in "bcp")
    + ("stride_w", "stride_bias", "stride_xs", "rows_per_scale")
)


def _every_tile(config) -> list[tuple[int, int, int]]:
    """Every (BLOCK_P, BLOCK_C, num_warps) ``config`` (a row-norm tile function) can return, over
    both layouts."""
    tiles = {
        config(2**log_c, contiguous) for log_c in range(_row_norm.MAX_CHANNELS.bit_length()) for contiguous in (0, 1)
    }
    return sorted(tiles, key=lambda t: (t[1], t[0]))


def row_norm_variants(prefix: str, feature_sets: Sequence[dict], channels: int = 512) -> list[AotVariant]:
    """Coverage by axis, not the full product (CI time): the first feature set (constexpr flags
    plus ``param_fp32``) in every dtype, every other feature set in fp16, all at the tile of a
    ``channels``-wide channels-first row (the audio encoder's); and every tile the launchers can
    pick in fp16 with the first feature set, forward and backward tiles each. The flags are
    independent constexpr branches, so the feature sets need only cover each value of each flag once.

    A feature set holds HAS_RESIDUAL, STORE_SUM (HAS_DSUM in the backward), HAS_WEIGHT, HAS_BIAS,
    ACTIVATION.
    """
    variants = []
    for direction, config in (("fwd", _row_norm.tile_config), ("bwd", _row_norm.backward_tile_config)):
        model_tile = config(channels, True)
        combos = [(dtype, feature_sets[0], model_tile) for dtype in _row_norm.KERNEL_DTYPES]
        combos += [(torch.float16, features, model_tile) for features in feature_sets[1:]]
        combos += [(torch.float16, feature_sets[0], t) for t in _every_tile(config) if t != model_tile]
        variants += [_row_norm_variant(prefix, direction, *combo) for combo in combos]
        variants.append(_row_norm_variant(prefix, direction, torch.float16, feature_sets[0], model_tile, wide=True))
    # Inference's forward (no statistics stored), at the model tile.
    fwd_tile = _row_norm.tile_config(channels, True)
    variants.append(_row_norm_variant(prefix, "fwd", torch.float16, feature_sets[0], fwd_tile, store_stats=False))
    return variants


def _row_norm_variant(
    prefix: str,
    direction: str,
    dtype,
    features: dict,
    tile,
    wide: bool = False,
    store_stats: bool = True,
    x_scale: bool = False,
    dropout: bool = False,
    sum_dx: bool = False,
    row_scale: bool = False,
) -> AotVariant:
    block_p, block_c, num_warps = tile
    x_type = "*" + TRITON_TYPES[dtype]
    param_type = "*fp32" if features.get("param_fp32") else x_type
    flags = {k: v for k, v in features.items() if k != "param_fp32"}
    name = f"{TRITON_TYPES[dtype]}_{'fp32params_' if features.get('param_fp32') else ''}"
    name += "_".join(f"{k.lower()}={int(v)}" for k, v in flags.items()) + f"_p{block_p}_c{block_c}_w{num_warps}"
    name += "_wide" if wide else ""
    name += "" if store_stats else "_inference"
    name += "_x_scale" if x_scale else ""
    name += "_dropout" if dropout else ""
    name += "_sum_dx" if sum_dx else ""
    name += "_row_scale" if row_scale else ""
    blocks = {"BLOCK_P": block_p, "BLOCK_C": block_c, "WIDE_OFFSETS": wide}
    vectors = {"W": param_type, "B": param_type, "XS": param_type}
    if direction == "fwd":
        constexprs = {k: flags[k] for k in ("HAS_RESIDUAL", "STORE_SUM", "HAS_WEIGHT", "HAS_BIAS", "ACTIVATION")}
        constexprs |= blocks | {"STORE_STATS": store_stats, "HAS_X_SCALE": x_scale, "HAS_DROPOUT": dropout}
        constexprs |= {"HAS_ROW_SCALE": row_scale}
        types = dict.fromkeys(_ROW_NORM_FWD_POINTERS, x_type) | vectors
        types |= {"MEAN": "*fp32", "RSTD": "*fp32"} | dict.fromkeys(_ROW_NORM_FWD_INTS, "i32")
        # Without dropout the launcher passes x as the (unread) seed.
        types |= {"eps": "fp32", "dropout_p": "fp32", "SEED": "*i64" if dropout else x_type}
        kernel = _row_norm.row_norm_fwd_kernel
    else:
        constexprs = {k: flags[k] for k in ("HAS_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS", "ACTIVATION")}
        constexprs = {"HAS_DSUM": flags["STORE_SUM"], **constexprs} | blocks
        constexprs |= {"HAS_X_SCALE": x_scale, "HAS_DROPOUT": dropout, "SUM_DX": sum_dx, "HAS_ROW_SCALE": row_scale}
        types = dict.fromkeys(_ROW_NORM_BWD_POINTERS, x_type) | vectors
        types |= dict.fromkeys(("MEAN", "RSTD", *_ROW_NORM_PARTIALS), "*fp32")
        types |= dict.fromkeys(_ROW_NORM_BWD_INTS, "i32")
        # Without dropout the launcher passes mean as the (unread) seed.
        types |= {"dropout_p": "fp32", "SEED": "*i64" if dropout else "*fp32"}
        kernel = _row_norm.row_norm_bwd_kernel
    # ptxas (Triton's flags, sm_90) keeps add_layer_norm's backward of 1024-wide rows (768 channels:
    # text and vision) at 80 registers and spills 4 bytes. Those that also sum dx's columns (the
    # layers') must not spill.
    spills = 8 if (prefix, direction, tile) == ("add_layer_norm", "bwd", (2, 1024, 8)) and not sum_dx else 0
    # The backward's persistent grid launches this many programs an SM at most, all meant to be
    # resident at once (the launch fits the grid to fewer where they are not).
    resident = _row_norm.BWD_PROGRAMS_PER_SM if direction == "bwd" else 0
    return AotVariant(
        f"{prefix}_{direction}_{name}",
        kernel,
        _signature(kernel, types, constexprs),
        constexprs,
        num_warps,
        1,
        spills,
        min_programs_per_sm=resident,
    )


def row_norm_param_grad_variants() -> list[AotVariant]:
    """The backward's dweight/dbias (/dx_scale) reduction (shared by both row-norm ops): both
    parameters in every dtype, each alone in fp16 (an absent parameter's pointers are fp32
    buffers), and all three in fp16 (vision's layer scale)."""
    kernel = _row_norm.row_norm_param_grad_kernel
    combos = [(dtype, True, True, False, False) for dtype in _row_norm.KERNEL_DTYPES]
    combos += [
        (torch.float16, True, False, False, False),
        (torch.float16, False, True, False, False),
        (torch.float16, True, True, True, False),
        (torch.float16, True, True, False, True),  # the post-LN layers' (dx's column sums)
        (torch.bfloat16, True, True, True, True),  # the vision layer's
    ]
    variants = []
    for dtype, weight, bias, x_scale, sum_dx in combos:
        param = "*" + TRITON_TYPES[dtype]
        types = dict.fromkeys(_ROW_NORM_PARTIALS, "*fp32") | dict.fromkeys(("n_rows", "n_channels"), "i32")
        types |= {"DW": param if weight else "*fp32", "DB": param if bias else "*fp32"}
        types |= {"DXS": param if x_scale else "*fp32", "DXSUM": param if sum_dx else "*fp32"}
        constexprs = {
            "HAS_WEIGHT": weight,
            "HAS_BIAS": bias,
            "BLOCK_R": _row_norm.PARAM_GRAD_BLOCK_R,
            "BLOCK_C": _row_norm.PARAM_GRAD_BLOCK_C,
            "HAS_X_SCALE": x_scale,
            "SUM_DX": sum_dx,
        }
        name = f"param_grad_{TRITON_TYPES[dtype]}_has_weight={int(weight)}_has_bias={int(bias)}"
        name += "_has_x_scale=1" if x_scale else ""
        name += "_sum_dx=1" if sum_dx else ""
        variant = AotVariant(name, kernel, _signature(kernel, types, constexprs), constexprs, 4, 3)
        variants.append(as_run(variant, divisible_by_16=("n_channels",)))
    return variants


def _row_norm_features(residual: bool, store_sum: bool, weight: bool, bias: bool, activation: int, param_fp32=False):
    return {
        "HAS_RESIDUAL": residual,
        "STORE_SUM": store_sum,
        "HAS_WEIGHT": weight,
        "HAS_BIAS": bias,
        "ACTIVATION": activation,
        "param_fp32": param_fp32,
    }


def layer_norm_gelu_variants() -> list[AotVariant]:
    """Exact GELU with affine in every dtype; tanh GELU without affine; fp32 weight only; bias only;
    and the parameter-gradient reduction both row-norm ops share (listed once)."""
    exact, tanh = _row_norm.ACTIVATIONS["none"], _row_norm.ACTIVATIONS["tanh"]
    feature_sets = [
        _row_norm_features(False, False, True, True, exact),
        _row_norm_features(False, False, False, False, tanh),
        _row_norm_features(False, False, True, False, exact, param_fp32=True),
        _row_norm_features(False, False, False, True, exact),
    ]
    return row_norm_variants("layer_norm_gelu", feature_sets) + row_norm_param_grad_variants()


def add_layer_norm_variants() -> list[AotVariant]:
    """Affine without the stored sum in every dtype; the sum without affine; fp32 weight only; the
    sum with bias only; vision's layer with its layer scale (x_scale, affine, the sum) at its
    768-channel tile, fp16: training's forward and backward, inference's forward; and text's
    post-LN layer with its hidden dropout in the kernels (affine, no sum) at the same tile, fp16:
    training's forward and backward (the dropout flag is one constexpr branch: no other axis); and
    the layer nodes' backwards with dx's column sums (text's with dropout, vision's with x_scale)
    at that tile in fp16 and bf16, vision's also with drop path's row scale (its training forward
    too)."""
    plain = _row_norm.ACTIVATIONS[None]
    feature_sets = [
        _row_norm_features(True, False, True, True, plain),
        _row_norm_features(True, True, False, False, plain),
        _row_norm_features(True, False, True, False, plain, param_fp32=True),
        _row_norm_features(True, True, False, True, plain),
    ]
    vision = _row_norm_features(True, True, True, True, plain)
    scaled = [
        _row_norm_variant("add_layer_norm", "fwd", torch.float16, vision, _row_norm.tile_config(768, False), x_scale=True),
        _row_norm_variant(
            "add_layer_norm", "fwd", torch.float16, vision, _row_norm.tile_config(768, False), store_stats=False,
            x_scale=True,
        ),
        _row_norm_variant(
            "add_layer_norm", "bwd", torch.float16, vision, _row_norm.backward_tile_config(768, False, True),
            x_scale=True,
        ),
    ]  # fmt: skip
    text = feature_sets[0]
    dropout = [
        _row_norm_variant(
            "add_layer_norm", "fwd", torch.float16, text, _row_norm.tile_config(768, False), dropout=True
        ),
        _row_norm_variant(
            "add_layer_norm", "bwd", torch.float16, text, _row_norm.backward_tile_config(768, False, True), dropout=True
        ),
    ]
    # The layer nodes' backwards, which also sum dx's columns (a dense layer's bias gradient): the
    # post-LN layers' with dropout, the vision layer's with x_scale, in both half dtypes. 768 and
    # 1024 channels (base and large models) share this tile and compile to the same program.
    # (dropout, x_scale and the row scale all take the narrow tile)
    layer_tile = _row_norm.backward_tile_config(768, False, narrow=True)
    assert layer_tile == _row_norm.backward_tile_config(1024, False, narrow=True)
    summed = [
        _row_norm_variant("add_layer_norm", "bwd", dtype, features, layer_tile, sum_dx=True, **flag)
        for dtype in (torch.float16, torch.bfloat16)
        for features, flag in (
            (text, {"dropout": True}), (vision, {"x_scale": True}), (vision, {"x_scale": True, "row_scale": True})
        )
    ]  # fmt: skip
    drop_path = [
        _row_norm_variant(
            "add_layer_norm", "fwd", dtype, vision, _row_norm.tile_config(768, False), x_scale=True, row_scale=True
        )
        for dtype in (torch.float16, torch.bfloat16)
    ]
    return row_norm_variants("add_layer_norm", feature_sets) + scaled + dropout + summed + drop_path


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

_ATTENTION_FLOAT_ARGS = {"scale", "scale_log2", "dropout_p"}
_ATTENTION_POINTER_TYPES = {
    "LSE": "*fp32", "DELTA": "*fp32", "DS": "*fp32", "VALUES": "*fp32", "INDEX": "*i64", "ORDER": "*i64",
    "OFFSETS": "*i64", "KEEP": "*u8", "KEEP_OUT": "*u8", "SEED": "*i64",
}  # fmt: skip
# Compiled as Data2Vec's calls run: head dim, index, bias and mask rows contiguous (unit
# strides), the other strides multiples of the 768-wide hidden size, head_dim 16 to 128.
_ATTENTION_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_dod", "stride_ij", "stride_bj", "stride_mj")
_ATTENTION_DIVISIBLE_BY_16 = tuple(f"stride_{t}{a}" for t in ("q", "k", "v", "o", "do") for a in ("b", "n", "h"))
_ATTENTION_DIVISIBLE_BY_16 += ("head_dim", "stride_gn")


def _attention_signature(fn, dtype: torch.dtype, constexprs: dict) -> dict:
    """Triton signature of ``fn``: data pointers in ``dtype``, statistics fp32, ints i32."""
    dt = TRITON_TYPES[dtype]
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper():
            signature[name] = _ATTENTION_POINTER_TYPES.get(name, f"*{dt}")
        elif name in _ATTENTION_FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _attention_variant(kind: str, fn, dtype: torch.dtype, config: dict, **constexprs) -> AotVariant:
    constexprs = {**{k: v for k, v in config.items() if k.isupper()}, **constexprs}
    flags = "".join(k[4].lower() if k.startswith("HAS_") else "" for k, v in constexprs.items() if v is True)
    name = f"{kind}_{TRITON_TYPES[dtype]}_d{constexprs.get('BLOCK_D', 0)}_{flags or 'plain'}"
    if constexprs.get("IS_CAUSAL"):
        name += "_causal"
    if "DS_MODE" in constexprs:
        name += f"_ds{constexprs['DS_MODE']}"
    if constexprs.get("STORE_LSE") is False:
        name += "_inference"
    return AotVariant(
        name=name,
        fn=fn,
        signature=_attention_signature(fn, dtype, constexprs),
        constexprs=constexprs,
        num_warps=config.get("num_warps", 4),
        num_stages=config.get("num_stages", 3),  # Triton's default, what a launch without it gets
    )


def _candidate(kernel: str, block_m: int, block_n: int, num_warps: int) -> dict:
    """The configuration of ``kernel``'s autotuning space with these sizes and warps."""
    (config,) = [
        c for c in SPACES[kernel] if (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) == (block_m, block_n, num_warps)
    ]
    return config


def _tile_suffix(config: dict) -> str:
    return f"_{config['BLOCK_M']}x{config['BLOCK_N']}w{config['num_warps']}s{config['num_stages']}"


def attention_variants(space: bool = False) -> list[AotVariant]:
    """The model configurations (vision: table bias in fp16 and fp32; audio/text: padding mask in bf16),
    every feature flag at once in fp16, the d=128 and d=16 tiles; the small kernels once per dtype
    they are launched with. Kept to ~40 compiles per arch for CI time: each input at its default
    tiles, and six other candidates of the autotuning space (``autotune.SPACES``) at the models'
    inputs, spill-free on sm_90. ``space``: every candidate at every input (``aot --space``)."""
    features = ("HAS_TABLE", "HAS_BIAS", "HAS_MASK", "IS_CAUSAL", "HAS_DROPOUT")

    def flags(*on):
        return {f: f in on for f in features}

    fwd, bwd = "attention_fwd", "attention_bwd"
    cases = [  # (dtype, BLOCK_D, flags, kernels, other candidates compiled in CI)
        (torch.float16, 64, flags("HAS_TABLE"), ("fwd", "dkdv", "dq", "ds"),
         {"fwd": (_candidate(fwd, 128, 64, 8), _candidate(fwd, 64, 64, 4)), "dkdv": (_candidate(bwd, 32, 128, 8),)}),
        (torch.float32, 64, flags("HAS_TABLE"), ("fwd", "dkdv", "dq", "ds"), {}),
        (torch.bfloat16, 64, flags("HAS_MASK"), ("fwd", "dkdv", "dq"),
         {"fwd": (_candidate(fwd, 64, 64, 4),), "dkdv": (_candidate(bwd, 32, 32, 4),),
          "dq": (_candidate(bwd, 32, 32, 4),)}),
        (torch.bfloat16, 64, flags("HAS_MASK", "HAS_DROPOUT"), ("fwd", "dkdv", "dq"), {}),  # audio/text training
        (torch.float16, 64, flags(*features), ("fwd", "dkdv", "dq", "ds"), {}),
        (torch.float16, 128, flags("HAS_MASK"), ("fwd", "dkdv", "dq"), {}),
        (torch.float16, 16, flags("HAS_MASK"), ("fwd", "dkdv"), {}),
    ]  # fmt: skip
    kernels = {
        "fwd": attention.attention_fwd_kernel,
        "dkdv": _attention_backward.attention_bwd_dkdv_kernel,
        "dq": _attention_backward.attention_bwd_dq_kernel,
        "ds": _attention_bias_grad.attention_bwd_ds_kernel,
    }
    variants = []
    for dtype, block_d, case_flags, names, in_ci in cases:
        common = {
            "BLOCK_D": block_d,
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": False,
            **case_flags,
        }
        for name in names:
            bias_tile = case_flags["HAS_TABLE"] or case_flags["HAS_BIAS"]
            dropout = case_flags["HAS_DROPOUT"]
            if name == "fwd":
                default = attention.fwd_config(dtype, block_d, bias_tile, dropout)
            else:
                default = _attention_backward.bwd_config(dtype, block_d)
            others = in_ci.get(name, ())
            if space:
                others = tile_candidates(fwd if name == "fwd" else bwd, dtype)
            extra = {}
            if name == "fwd":
                extra["STORE_LSE"] = True  # the training forward; inference's below
            if name == "dq":
                ds_store, ds_atomic, ds_none = (
                    _attention_backward.DS_STORE,
                    _attention_backward.DS_ATOMIC,
                    _attention_backward.DS_NONE,
                )
                extra["DS_MODE"] = ds_store if case_flags["HAS_BIAS"] else ds_atomic if bias_tile else ds_none
            for config in [default, *(c for c in others if c != default)]:
                variant = _attention_variant(name, kernels[name], dtype, config, **common, **extra)
                if config is not default:
                    variant = dataclasses.replace(variant, name=variant.name + _tile_suffix(config))
                if space and config is not default:
                    # The autotuner times what a spill costs: the space is compiled, not held spill-free.
                    variant = dataclasses.replace(variant, allowed_spill_bytes=1 << 20)
                elif all(case_flags.values()):
                    # Every flag at once (table, dense bias, mask, causal, dropout): compiled for coverage,
                    # no model runs it; its backward spills ~100-650 bytes on sm_90 (triton 3.8-3.9).
                    variant = dataclasses.replace(variant, allowed_spill_bytes=1024)
                elif name == "dkdv" and case_flags["HAS_DROPOUT"]:
                    # The training configuration's dK/dV: 20 bytes (5 registers) at 255 with the flags
                    # Triton's own ptxas runs with (plain ptxas -v: none), with tl.rand too.
                    variant = dataclasses.replace(variant, allowed_spill_bytes=24)
                elif name == "dkdv" and dtype == torch.float32:
                    # fp32 is the precision path: its FMA (ieee) dots keep dK and dV in ~600 spilled bytes.
                    variant = dataclasses.replace(variant, allowed_spill_bytes=640)
                variants.append(variant)
                models = (flags("HAS_TABLE"), flags("HAS_MASK"))
                if name == "fwd" and case_flags in models and dtype != torch.float32 and (space or config is default):
                    # Inference's forward (no log-sum-exp stored) of the models' configurations.
                    inference = _attention_variant(
                        name, kernels[name], dtype, config, **common, **{**extra, "STORE_LSE": False}
                    )
                    suffix = "" if config is default else _tile_suffix(config)
                    inference = dataclasses.replace(
                        inference, name=inference.name + suffix, allowed_spill_bytes=variant.allowed_spill_bytes
                    )
                    variants.append(inference)
    for dtype in (torch.float16, torch.float32):
        delta_config = {"BLOCK_M": 64, "num_warps": 8}
        preprocess = _attention_backward.attention_bwd_preprocess_kernel
        variants.append(_attention_variant("delta", preprocess, dtype, delta_config, BLOCK_D=64))
        segment_sum = _attention_bias_grad.segment_sum_kernel
        variants.append(_attention_variant("segment_sum", segment_sum, dtype, {"BLOCK_P": 64, "BLOCK_H": 16}))
    dropout_config = {"BLOCK_M": 64, "BLOCK_N": 64}
    variants.append(_attention_variant("dropout_mask", attention.dropout_mask_kernel, torch.float16, dropout_config))
    # The table gathered into a dense bias with 16-element aligned rows (ops.attention_op.gathered_bias),
    # vision's inference forward: measured against the in-kernel gather by bench.attention.
    config = attention.fwd_config(torch.float16, 64, bias_tile=True)
    dense = _attention_variant("fwd", kernels["fwd"], torch.float16, config, BLOCK_D=64, PRECISION="tf32",
                               UPCAST=False, **flags("HAS_BIAS"), STORE_LSE=False)  # fmt: skip
    dense = as_run(dense, _ATTENTION_UNIT_STRIDES, (*_ATTENTION_DIVISIBLE_BY_16, "stride_bh", "stride_bi"))
    return [as_run(v, _ATTENTION_UNIT_STRIDES, _ATTENTION_DIVISIBLE_BY_16) for v in variants] + [dense]


# --------------------------------------------------------------------------------------------
# Positional convolution
# --------------------------------------------------------------------------------------------


def pos_conv_variants() -> list[AotVariant]:
    """Every configuration the launchers pick: dtype x group block (the conv alone: the input
    gradient and the two-launch form); dtype at the models' group block and row width (the conv
    with its normalising tail: CG 48 or 64, C 768 or 1024); dtype x LN row block."""
    variants = []
    wgrad_blocks = ("DOT_PRECISION", "UPCAST_OPERANDS", "BLOCK_T", "BLOCK_CI", "BLOCK_CO")
    conv_blocks = (*wgrad_blocks, "NORM_TAIL", "TAIL_ROWS", "BLOCK_C")

    def conv(ty, precision, block_co, block_c=None):
        tail = block_c is not None
        rows = min(pos_conv.ln_blocks(block_c)[0], pos_conv.CONV_BLOCK_T) if tail else 1
        return AotVariant(
            name=f"conv_{ty}_co{block_co}" + (f"_tail_c{block_c}" if tail else ""),
            fn=pos_conv.grouped_conv1d_kernel,
            signature={"x_ptr": f"*{ty}", "w_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "y_ptr": f"*{ty}"}
            | {"h_ptr": f"*{ty}", "counter_ptr": "*i32" if tail else f"*{ty}"}
            | dict.fromkeys(("T", "CG", "K", "PAD_LEFT", "stride_xb", "stride_xt", "stride_xc"), "i32")
            | dict.fromkeys(("stride_yb", "stride_yt", "C"), "i32")
            | {"eps": "fp32"}
            | dict.fromkeys(conv_blocks, "constexpr"),
            constexprs={
                "DOT_PRECISION": precision,
                "UPCAST_OPERANDS": False,
                "BLOCK_T": pos_conv.CONV_BLOCK_T,
                "BLOCK_CI": min(pos_conv.CONV_BLOCK_CI, block_co),
                "BLOCK_CO": block_co,
                "NORM_TAIL": tail,
                "TAIL_ROWS": rows,
                "BLOCK_C": block_c if tail else 16,
            },
            num_warps=pos_conv.CONV_WARPS,
            num_stages=pos_conv.CONV_STAGES,
        )

    for dtype, ty in TRITON_TYPES.items():
        precision = pos_conv.dot_precision(dtype)
        variants.append(conv(ty, precision, 64, 1024))
        block_co = 16
        while block_co <= max(16, pos_conv.MAX_GROUP_CHANNELS):
            variants.append(conv(ty, precision, block_co))
            variants.append(
                AotVariant(
                    name=f"wgrad_{ty}_c{block_co}",
                    fn=pos_conv.grouped_conv1d_weight_grad_kernel,
                    signature={"x_ptr": f"*{ty}", "dy_ptr": f"*{ty}", "dw_ptr": "*fp32", "db_ptr": "*fp32"}
                    | dict.fromkeys(("B", "T", "CG", "PAD_LEFT", "stride_xb", "stride_xt", "stride_xc"), "i32")
                    | dict.fromkeys(("stride_dyb", "stride_dyt", "C"), "i32")
                    | dict.fromkeys(wgrad_blocks, "constexpr"),
                    constexprs={
                        "DOT_PRECISION": precision,
                        "UPCAST_OPERANDS": False,
                        "BLOCK_T": pos_conv.WGRAD_BLOCK_T,
                        "BLOCK_CI": block_co,
                        "BLOCK_CO": block_co,
                    },
                    num_warps=pos_conv.WGRAD_WARPS,
                    num_stages=pos_conv.WGRAD_STAGES,
                )
            )
            block_co *= 2
        block_c = pos_conv.LN_MIN_BLOCK_C
        while block_c <= pos_conv.MAX_CHANNELS:
            if ty != "fp16" and block_c != 1024:  # every row width in fp16; the others at Data2Vec's
                block_c *= 2
                continue
            block_rows, _ = pos_conv.ln_blocks(block_c)
            blocks = {"BLOCK_ROWS": block_rows, "BLOCK_C": block_c}
            scalars = dict.fromkeys(("n_rows", "C"), "i32") | {"eps": "fp32"}
            variants.append(
                AotVariant(
                    name=f"ln_gelu_fwd_{ty}_c{block_c}",
                    fn=pos_conv.layer_norm_gelu_fwd_kernel,
                    signature={"y_ptr": f"*{ty}", "h_ptr": f"*{ty}"}
                    | scalars
                    | dict.fromkeys(("stride_y", "stride_h"), "i32")
                    | dict.fromkeys(blocks, "constexpr"),
                    constexprs=blocks,
                    num_warps=pos_conv.ln_warps(block_c),
                )
            )
            variants.append(
                AotVariant(
                    name=f"ln_gelu_bwd_{ty}_c{block_c}",
                    fn=pos_conv.layer_norm_gelu_bwd_kernel,
                    signature={"y_ptr": f"*{ty}", "dh_ptr": f"*{ty}", "dy_ptr": f"*{ty}"}
                    | scalars
                    | dict.fromkeys(("stride_y", "stride_dh", "stride_dy"), "i32")
                    | dict.fromkeys(blocks, "constexpr"),
                    constexprs=blocks,
                    num_warps=pos_conv.ln_warps(block_c),
                )
            )
            block_c *= 2
    # Compiled as the channels-last (B, T, C) calls run: unit channel stride, the other strides
    # and the group width multiples of 16.
    divisible = ("stride_xb", "stride_xt", "stride_yb", "stride_yt", "stride_dyb", "stride_dyt", "C", "CG")
    divisible += ("stride_y", "stride_h", "stride_dh", "stride_dy")
    return [as_run(v, ("stride_xc",), divisible) for v in variants]


# --------------------------------------------------------------------------------------------
# Feature extractor layer 0
# --------------------------------------------------------------------------------------------

_CONV0_POINTERS = ("WAVE", "W", "CB", "G", "BETA", "Y")
_CONV0_INTS = (
    "n_frames",
    "n_channels",
    "tiles_per_batch",
    "stride_wave_b",
    "stride_wave_s",
    "stride_w_c",
    "stride_w_k",
    "stride_y_b",
    "stride_y_c",
    "stride_y_t",
)
_CONV0_BWD_POINTERS = ("DY", "WAVE", "W", "CB", "G", "BETA")
_CONV0_BWD_FP32_POINTERS = ("MEAN", "RSTD", "DW_PARTIAL", "DG_PARTIAL", "DB_PARTIAL", "DCB_PARTIAL", "DFRAME")
_CONV0_BWD_INTS = (
    "n_frames",
    "n_channels",
    "tiles_per_batch",
    "n_tiles",
    "stride_dy_b",
    "stride_dy_c",
    "stride_dy_t",
    "stride_wave_b",
    "stride_wave_s",
    "stride_w_c",
    "stride_w_k",
)


def conv_feature_extractor_variants() -> list[AotVariant]:
    """Data2Vec's layer 0 (512 channels, k=10, stride 5): every combination of conv bias and
    pre-norm recompute in fp16, bf16 and fp32 without conv bias (the released configs' setting; a
    dtype changes loads, stores and conversions, not the tile); the widest row the launcher takes,
    in fp16; the backward alike."""
    variants = []
    combos = [
        (dtype, 512, bias, pre)
        for dtype in cfe.KERNEL_DTYPES
        for bias in (False, True)
        for pre in (False, True)
        if dtype == torch.float16 or not bias
    ]
    combos += [(torch.float16, cfe.MAX_CHANNELS, False, False)]
    for dtype, channels, bias, pre_norm_only in combos:
        config = cfe.launch_tiles(channels)
        types = dict.fromkeys(_CONV0_POINTERS, "*" + TRITON_TYPES[dtype]) | {"MEAN": "*fp32", "RSTD": "*fp32"}
        types |= dict.fromkeys(_CONV0_INTS, "i32") | {"eps": "fp32"}
        constexprs = {
            "KERNEL": 10,
            "STRIDE": 5,
            "HAS_CONV_BIAS": bias,
            "PRE_NORM_ONLY": pre_norm_only,
            "BLOCK_T": config["BLOCK_T"],
            "BLOCK_C": config["BLOCK_C"],
        }
        kernel = cfe.conv0_ln_gelu_kernel
        name = f"conv0_{TRITON_TYPES[dtype]}_c{channels}_bias{int(bias)}_pre{int(pre_norm_only)}"
        variant = AotVariant(name, kernel, _signature(kernel, types, constexprs), constexprs, config["num_warps"], 1)
        # as it runs: output channels-last, unit sample and tap strides
        unit_strides = ("stride_y_c", "stride_wave_s", "stride_w_k")
        variants.append(as_run(variant, unit_strides, ("n_channels", "stride_y_b", "stride_y_t", "stride_wave_b")))
    # The fused backward: every dtype, with and without conv bias and waveform gradient, at its
    # widest row (512), specialised as it runs: dy channels-last (the op passes it so), unit
    # sample and tap strides, 16-divisible pointers and row strides (sm_90: 222 to 255 registers at
    # 8 warps, no spill; dy channels-first would spill 0.5 to 1.5 KB).
    for dtype, bias, wave_grad in itertools.product(cfe.KERNEL_DTYPES, (False, True), (False, True)):
        if bias and dtype != torch.float16:
            continue
        config = cfe.backward_tiles(512)
        types = dict.fromkeys(_CONV0_BWD_POINTERS, "*" + TRITON_TYPES[dtype])
        types |= dict.fromkeys(_CONV0_BWD_FP32_POINTERS, "*fp32") | dict.fromkeys(_CONV0_BWD_INTS, "i32")
        constexprs = {
            "KERNEL": 10,
            "STRIDE": 5,
            "HAS_CONV_BIAS": bias,
            "WAVE_GRAD": wave_grad,
            "UPCAST": dtype == torch.float32,
            "FP32_PRECISION": cfe.BWD_FP32_PRECISION,
            "WIDE_OFFSETS": False,
            "BLOCK_T": config["BLOCK_T"],
            "BLOCK_C": config["BLOCK_C"],
            "BLOCK_J": 16,
        }
        kernel = cfe.conv0_ln_gelu_bwd_kernel
        name = f"conv0_bwd_{TRITON_TYPES[dtype]}_c512_bias{int(bias)}_dwave{int(wave_grad)}"
        variant = AotVariant(name, kernel, _signature(kernel, types, constexprs), constexprs, config["num_warps"], 1)
        unit_strides = ("stride_dy_c", "stride_wave_s", "stride_w_k")
        variants.append(as_run(variant, unit_strides, ("n_channels", "stride_dy_b", "stride_dy_t", "stride_wave_b")))
    return variants


# --------------------------------------------------------------------------------------------
# Target accumulation (pretraining)
# --------------------------------------------------------------------------------------------

_ACC_TARGET_INTS = tuple(f"stride_{t}_{a}" for t in ("acc", "x") for a in "bcp") + ("stride_mask_b", "stride_mask_p")


def accumulate_target_variants(channels: int = 768) -> list[AotVariant]:
    """Both kernels at a ``channels``-wide channels-last layer (text and vision's; audio's instance
    norm too) with a padding mask in every dtype; each flag's other value, the channels-first input
    (unit frame stride) and int64 offsets in fp16; the rows kernel in fp16 at the tiles of the
    narrowest, the model's and the widest rows, both layouts (CI time: the tiles between differ
    only in their constants)."""
    rows_tiles = {  # "none" takes "layer"'s tiles (at min(C, MAX_CHANNELS))
        (acc_target.rows_tile(width, contiguous, True), contiguous)
        for width in (64, channels, _row_norm.MAX_CHANNELS)
        for contiguous in (False, True)
    }
    model_tile = acc_target.rows_tile(channels, False, True)
    cases = [("rows", dtype, True, True, model_tile, False, False) for dtype in TRITON_TYPES]
    cases += [("instance", dtype, None, True, acc_target.INSTANCE_TILE, False, False) for dtype in TRITON_TYPES]
    cases += [
        ("rows", torch.float16, False, False, model_tile, False, False),
        ("rows", torch.float16, True, True, model_tile, False, True),
        ("instance", torch.float16, None, False, acc_target.INSTANCE_TILE, False, False),
        ("instance", torch.float16, None, True, acc_target.INSTANCE_TILE, True, False),
        ("instance", torch.float16, None, True, acc_target.INSTANCE_TILE, False, True),
    ]
    done = {(model_tile, False)}
    cases += [("rows", torch.float16, True, True, t, first, False) for t, first in sorted(rows_tiles - done)]
    return [_accumulate_target_variant(*case) for case in cases]


def _accumulate_target_variant(kind, dtype, normalize, has_mask, tile, channels_first, wide) -> AotVariant:
    block_p, block_c, num_warps = tile
    constexprs = {"HAS_MASK": has_mask, "BLOCK_P": block_p, "BLOCK_C": block_c, "WIDE_OFFSETS": wide}
    if kind == "rows":
        kernel = acc_target.accumulate_rows_kernel
        constexprs = {"NORMALIZE": normalize} | constexprs
        ints = ("n_pos", "n_channels", "tiles_per_batch") + _ACC_TARGET_INTS
    else:
        kernel = acc_target.instance_norm_accumulate_kernel
        ints = ("n_pos", "n_channels") + _ACC_TARGET_INTS
    types = {"ACC": "*fp32", "X": "*" + TRITON_TYPES[dtype], "MASK": "*u8" if has_mask else "*fp32"}
    types |= dict.fromkeys(ints, "i32") | {"scale": "fp32", "eps": "fp32"}
    name = f"{kind}_{TRITON_TYPES[dtype]}" + ("" if normalize is None else f"_normalize={int(normalize)}")
    name += f"_mask={int(has_mask)}_p{block_p}_c{block_c}_w{num_warps}"
    name += ("_channels_first" if channels_first else "") + ("_wide" if wide else "")
    variant = AotVariant(name, kernel, _signature(kernel, types, constexprs), constexprs, num_warps, 3)
    unit_strides = ("stride_acc_c", "stride_x_p" if channels_first else "stride_x_c", "stride_mask_p")
    return as_run(variant, unit_strides, ("n_channels", "stride_acc_b", "stride_acc_p", "stride_x_b"))


# --------------------------------------------------------------------------------------------
# GELU + activation dropout (audio's feed-forward in training)
# --------------------------------------------------------------------------------------------


def gelu_dropout_variants(columns: int = 3072) -> list[AotVariant]:
    """Both kernels at Data2Vec audio's intermediate width, contiguous rows: the forward in fp16
    with exact GELU, the backward in bf16 with the tanh one (CI time: the dtypes and the GELUs
    are independent of the direction; fp32 is the row norms' code path)."""
    from d2v_kernels.kernels import gelu_dropout

    block_r, block_c, num_warps = gelu_dropout.tile_config(1024, columns)
    cases = (
        (gelu_dropout.gelu_dropout_fwd_kernel, "fwd", torch.float16, "none", ("H", "G"), ("stride_h", "stride_g")),
        (gelu_dropout.gelu_dropout_bwd_kernel, "bwd", torch.bfloat16, "tanh", ("DG", "H", "DH"),
         ("stride_dg", "stride_h", "stride_dh")),
    )  # fmt: skip
    variants = []
    for kernel, direction, dtype, approximate, pointers, strides in cases:
        constexprs = {"APPROXIMATE": _row_norm.ACTIVATIONS[approximate], "BLOCK_R": block_r, "BLOCK_C": block_c}
        types = dict.fromkeys(pointers, "*" + TRITON_TYPES[dtype]) | {"SEED": "*i64", "dropout_p": "fp32"}
        types |= dict.fromkeys(("n_rows", "n_cols", *strides), "i32")
        name = f"{direction}_{TRITON_TYPES[dtype]}_{approximate}_r{block_r}_c{block_c}_w{num_warps}"
        variant = AotVariant(name, kernel, _signature(kernel, types, constexprs), constexprs, num_warps, 3)
        variants.append(as_run(variant, (), ("n_cols", *strides)))
    return variants


VARIANTS = {
    "layer_norm_gelu": layer_norm_gelu_variants,
    "add_layer_norm": add_layer_norm_variants,
    "attention": attention_variants,
    "pos_conv": pos_conv_variants,
    "conv_feature_extractor": conv_feature_extractor_variants,
    "accumulate_target": accumulate_target_variants,
    "gelu_dropout": gelu_dropout_variants,
}
# What ``python -m d2v_kernels.kernels.aot --space`` compiles: every candidate of the autotuning
# spaces at every input above (CI compiles the defaults and a few candidates).
SPACE_VARIANTS = {"attention": functools.partial(attention_variants, space=True)}
