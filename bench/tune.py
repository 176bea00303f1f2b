"""Sweep the tiles (block sizes, warps, pipeline stages) of the Triton kernels on the GPU.

For each kernel, case and dtype, every candidate configuration (``d2v_kernels.kernels._tiles``)
runs the op's benchmark step (``bench/attention.py``, ``bench/pos_conv.py``): its output and
gradients are checked against the float64 reference exactly as the op benchmark checks them, then
it is timed. A configuration the GPU cannot hold (shared memory, registers) is ``skipped``; a
configuration that computes a wrong answer is an ``error`` and makes the exit status 1 (a kernel
bug that only some tiles show). The table lists each case's configurations fastest first with
their speed relative to the default; the JSON goes to ``bench/results/<gpu>/<date>-tune.json``.

Kernels and what is timed: ``attention_fwd`` (forward), ``attention_bwd`` (forward + backward,
forward tiles at their default), ``pos_conv`` (the grouped conv of the forward, and of dx in the
backward: forward timed), ``pos_conv_wgrad`` (forward + backward), ``conv0`` (the feature
extractor's fused layer 0; the whole feature extractor's forward is timed), ``conv0_bwd`` (its
backward kernel; the feature extractor's forward + backward), ``row_norm_fwd`` and
``row_norm_bwd`` (the LayerNorm (+ GELU, + residual) kernels through ``bench/layer_norm_gelu.py``,
cases ``NAME:LAYOUT``; the backward also sweeps its persistent programs per SM).

    python -m bench.tune [--kernels attention_fwd,attention_bwd] [--cases vision_base,audio_base]
                         [--dtypes bf16] [--quick | --space]
    python -m bench.tune --check-only --tiny --device cpu      # every candidate checked on a CPU
    python -m bench.tune --table bench/results/<gpu>/<date>-tune.json    # rows for autotune.TABLE

``--space`` sweeps the autotuning space of each kernel that has one (``autotune.SPACES``: what
``D2V_KERNELS_AUTOTUNE=1`` chooses among, and what the committed table may name) instead of the
wider grids below. Each row records the shape bucket its launches fell in and the tiles they ran
(``bucket``, ``resolved``). ``--table`` prints, per (kernel, bucket) of such a run, the candidate
with the least time summed over the cases of that bucket, as rows of ``autotune.TABLE`` keyed by
the GPU's family, to paste there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench import common
from d2v_kernels.testing import CheckFailed, assert_close_to_reference

IMPL = "d2v_triton"


def _grid(keys: Sequence[str], *values: Sequence[int]) -> list[dict[str, int]]:
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


_ATTN = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_CONV = ("BLOCK_T", "BLOCK_CI", "num_warps", "num_stages")
_WGRAD = ("BLOCK_T", "num_warps", "num_stages")

# kernel: (op benchmark module, mode timed, full candidate list, quick candidate list).
# {} is the default configuration; it always runs first and is the baseline of the table.
KERNELS: dict[str, tuple[str, str, list[dict], list[dict]]] = {
    "attention_fwd": (
        "attention",
        "fwd",
        _grid(_ATTN, (64, 128), (32, 64, 128), (4, 8), (2, 3, 4)),
        _grid(_ATTN, (64, 128), (32, 64, 128), (4, 8), (3,)) + _grid(_ATTN, (128,), (64,), (4,), (2, 4)),
    ),
    "attention_bwd": (
        "attention",
        "fwd+bwd",
        [
            dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
            for (m, n) in ((32, 64), (64, 64), (64, 128), (128, 64), (32, 128), (128, 128), (64, 32), (32, 32))
            for w in (4, 8)
            for s in (1, 2, 3)
        ],
        [
            dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=2)
            for (m, n) in ((32, 64), (64, 64), (64, 128), (128, 64))
            for w in (4, 8)
        ]
        # 32 x 32 at 4 warps: 120 registers for dK/dV (ptxas sm_90, as run), 4 programs (16 warps) an
        # SM where the 64 x 64 default (214) holds one of 8 warps.
        + [dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)],
    ),
    "pos_conv": (
        "pos_conv",
        "fwd",
        _grid(_CONV, (32, 64, 128), (16, 32), (4, 8), (2, 3, 4)),
        _grid(_CONV, (64, 128), (16, 32), (4, 8), (3,)),
    ),
    "pos_conv_wgrad": (
        "pos_conv",
        "fwd+bwd",
        _grid(_WGRAD, (32, 64, 128), (4, 8), (2, 3, 4)),
        _grid(_WGRAD, (64, 128), (4, 8), (3,)),
    ),
    "conv0": (
        "conv_feature_extractor",
        "fwd",
        _grid(("BLOCK_T", "num_warps"), (4, 8, 16, 32), (2, 4, 8)),
        _grid(("BLOCK_T", "num_warps"), (8, 16, 32), (4, 8)),
    ),
    "conv0_bwd": (
        "conv_feature_extractor",
        "fwd+bwd",
        _grid(("BLOCK_T", "num_warps", "programs_per_sm"), (16, 32), (4, 8, 16), (1, 2)),
        _grid(("BLOCK_T", "num_warps", "programs_per_sm"), (16, 32), (8, 16), (1,)),
    ),
    "row_norm_fwd": (
        "layer_norm_gelu",
        "fwd",
        _grid(("BLOCK_P", "num_warps"), (4, 8, 16, 32), (4, 8, 16)),
        _grid(("BLOCK_P", "num_warps"), (8, 16), (4, 8)),
    ),
    "row_norm_bwd": (
        "layer_norm_gelu",
        "fwd+bwd",
        _grid(("BLOCK_P", "num_warps", "programs_per_sm"), (2, 4, 8, 16), (4, 8), (1, 2, 3, 4)),
        _grid(("BLOCK_P", "num_warps", "programs_per_sm"), (4, 8), (8,), (1, 2, 3)),
    ),
}
CASES = {
    "attention": ("vision_base", "audio_base", "text_base"),
    "pos_conv": ("base", "large"),
    "conv_feature_extractor": ("b8x10s", "b1x30s"),
    "layer_norm_gelu": (
        "encoder-T3199:channels_first",
        "encoder-T3199:channels_last",
        "posconv-T499:channels_last",
        "encoder-T32000:channels_first",
    ),
}
QUICK_CASES = {
    "attention": ("vision_base", "audio_base"),
    "pos_conv": ("base",),
    "conv_feature_extractor": ("b8x10s",),
    "layer_norm_gelu": ("encoder-T3199:channels_first", "encoder-T3199:channels_last"),
}


def config_label(config: dict[str, int]) -> str:
    from d2v_kernels.kernels.autotune import config_label as label

    return label(config)


def _op_module(name: str):
    import importlib

    return importlib.import_module(f"bench.{name}")


def _is_out_of_resources(error: Exception) -> bool:
    return type(error).__name__ in ("OutOfResources", "OutOfResourcesError") or "out of resource" in str(error).lower()


def tune_case(
    kernel: str,
    case: str,
    dtype_name: str,
    candidates: Sequence[dict[str, int]],
    *,
    device: str = "cuda",
    timed: bool = True,
    timing_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """A row per candidate (the default first): checked, then timed, ``speedup`` over the default."""
    from d2v_kernels.kernels import _tiles, autotune

    module_name, mode, _, _ = KERNELS[kernel]
    op_case = _op_module(module_name).setup_case(case, dtype_name, mode, device)
    rows = []
    for config in [{}, *[c for c in candidates if c]]:
        row = dict(op_case.row, what="tune", kernel=kernel, impl=IMPL, config=config_label(config), tiles=config)
        # One override for the whole row: entering or leaving one clears the launch and plan caches,
        # which a step per timed call would rebuild.
        seen: list[dict] = []
        try:
            with _tiles.override(kernel, **config), autotune.record_choices() as seen:
                step = op_case.make_step(IMPL)
                label = f"{kernel} {config_label(config)}"
                row.update(assert_close_to_reference(step(), *op_case.reference(IMPL), name=label))
                if timed:
                    timing = common.time_ms(step, **(timing_kwargs or {}))
                    row.update(timing.as_row())
                    if op_case.flops:
                        row["tflops"] = common.tflops(op_case.flops, timing.ms)
        except CheckFailed as e:
            row["error"] = f"wrong result: {e}"
        except Exception as e:
            if _is_out_of_resources(e):
                row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            else:
                row["error"] = f"{type(e).__name__}: {e}"
        chosen = [c for c in seen if c["kernel"] == kernel]
        if chosen:
            row["bucket"] = chosen[0]["bucket"] if len({c["bucket"] for c in chosen}) == 1 else None
            row["resolved"] = chosen[0]["config"]
        rows.append(row)
        common.print_row(row)
    base = rows[0].get("ms")
    for row in rows:
        if base and row.get("ms"):
            row["speedup_vs_default"] = base / row["ms"]
    return rows


def summary_table(rows: Sequence[dict[str, Any]], top: int = 5) -> str:
    """Markdown: per (kernel, case, dtype) the default and the ``top`` fastest configurations."""
    lines = ["| kernel | case | dtype | config | ms | vs default |", "| --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["case"], row["dtype"]), []).append(row)
    for (kernel, case, dtype), group in groups.items():
        timed = sorted((r for r in group if r.get("ms")), key=lambda r: r["ms"])
        shown = [r for r in group if r["config"] == "default"] + [r for r in timed if r["config"] != "default"][:top]
        if not timed:
            shown = group
        for r in shown:
            if r.get("ms"):
                ms = f"{r['ms']:.4f}"
            elif "max_err" in r:
                ms = f"checked (max error {r['max_err']:.1e} <= {r['bound']:.1e})"
            else:
                ms = r.get("skipped") or r.get("error", "")[:60]
            speedup = f"{r['speedup_vs_default']:.2f}x" if r.get("speedup_vs_default") else ""
            lines.append(f"| {kernel} | {case} | {dtype} | {r['config']} | {ms} | {speedup} |")
        failed = [r for r in group if "error" in r]
        if failed:
            lines.append(f"| {kernel} | {case} | {dtype} | {len(failed)} configurations FAILED | | |")
    return "\n".join(lines)


def table_rows(result: dict[str, Any], source: str = "") -> list[str]:
    """Rows of ``autotune.TABLE`` (Python source) from a tune result: per (kernel, bucket), the
    candidate of the kernel's space with the least time summed over the bucket's cases (only
    candidates timed in every one of them). The comment gives its total and the default's."""
    from d2v_kernels.kernels.autotune import SPACES, gpu_family

    family = gpu_family(result.get("environment", {}).get("gpu", "any"))
    # (kernel, bucket) -> resolved tiles (JSON) -> (case, dtype) -> ms
    times: dict[tuple[str, str], dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    cases: dict[tuple[str, str], set] = defaultdict(set)
    defaults: dict[tuple[str, str], dict[tuple, float]] = defaultdict(dict)
    for row in result["rows"]:
        kernel, bucket, resolved = row.get("kernel"), row.get("bucket"), row.get("resolved")
        if kernel not in SPACES or not bucket or resolved is None:
            continue
        case = (row["case"], row["dtype"])
        cases[kernel, bucket].add(case)
        if row.get("ms") is not None and "error" not in row:
            timed = times[kernel, bucket][json.dumps(resolved)]
            timed[case] = min(row["ms"], timed.get(case, row["ms"]))
            if row.get("config") == "default":
                defaults[kernel, bucket][case] = row["ms"]
    lines = []
    for (kernel, bucket), by_config in sorted(times.items()):
        every = cases[kernel, bucket]
        complete = {c: sum(t.values()) for c, t in by_config.items() if set(t) == every}
        in_space = {c: t for c, t in complete.items() if json.loads(c) in SPACES[kernel]}
        if not in_space:
            lines.append(f"# {kernel} {bucket}: no candidate of the space timed in every case")
            continue
        best = min(in_space, key=in_space.get)
        names = ", ".join(sorted(f"{case} {dtype}" for case, dtype in every))
        default = defaults[kernel, bucket]
        default = f"default {sum(default.values()):.4f} ms" if set(default) == every else "default not timed"
        lines.append(
            f"    ({family!r}, {kernel!r}, {bucket!r}): {best},  # {in_space[best]:.4f} ms, {default} ({names}{source})"
        )
        faster = {c: t for c, t in complete.items() if c not in in_space and t < in_space[best]}
        if faster:
            outside = min(faster, key=faster.get)
            lines.append(f"    # outside the space, faster: {outside} {faster[outside]:.4f} ms")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", "--kernel", dest="kernels", help=f"comma list of {list(KERNELS)} (default all)")
    parser.add_argument("--cases", "--case", dest="cases", help="comma list of the op benchmark's case names")
    parser.add_argument("--dtypes", "--dtype", dest="dtypes", help="comma list of fp16,bf16 (default bf16)")
    parser.add_argument("--quick", action="store_true", help="fewer candidates and cases, shorter timing")
    parser.add_argument("--space", action="store_true", help="the autotuning space's candidates (autotune.SPACES)")
    parser.add_argument("--table", type=Path, metavar="RESULT", help="print autotune.TABLE rows from a tune result")
    parser.add_argument("--check-only", action="store_true", help="check every candidate, time nothing (CPU too)")
    parser.add_argument("--tiny", action="store_true", help="the op benchmarks' tiny cases (with --check-only)")
    parser.add_argument("--device", default=None, help="default cuda; cpu only with --check-only")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="results root (default bench/results)")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.table:
        return args
    try:
        args.kernels = common.parse_list(args.kernels, KERNELS, "--kernels") or list(KERNELS)
        args.dtypes = common.parse_list(args.dtypes, ("fp16", "bf16", "fp32"), "--dtypes") or ["bf16"]
        known = {c for m in CASES for c in CASES[m]} | {c for m in CASES for c in _op_module(m).TINY_CASES}
        args.cases = common.parse_list(args.cases, sorted(known), "--cases") if args.cases else None
    except ValueError as e:
        parser.error(str(e))
    if args.space:
        from d2v_kernels.kernels.autotune import SPACES

        if not parser.parse_args(list(argv)).kernels:
            args.kernels = list(SPACES)
        if args.quick:
            parser.error("--space and --quick are two candidate lists: pick one")
        without = [k for k in args.kernels if k not in SPACES]
        if without:
            parser.error(f"--space: no autotuning space for {without} (spaces: {sorted(SPACES)})")
    if args.device is None:
        args.device = "cuda" if common.has_gpu() or not args.check_only else "cpu"
    if args.device != "cuda" and not args.check_only:
        parser.error("timing needs --device cuda; use --check-only for a CPU run")
    return args


def cases_for(kernel: str, args: argparse.Namespace) -> list[str]:
    module_name = KERNELS[kernel][0]
    if args.tiny:
        available = list(_op_module(module_name).TINY_CASES)
    else:
        available = list((QUICK_CASES if args.quick else CASES)[module_name])
    if args.cases:
        every = set(CASES[module_name]) | set(_op_module(module_name).TINY_CASES)
        return [c for c in args.cases if c in every]
    return available


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.table:
        print(f"# from {args.table}: rows for TABLE in d2v_kernels/kernels/autotune.py")
        print("\n".join(table_rows(json.loads(args.table.read_text()), f"; {args.table.name}")))
        return 0
    if args.device == "cuda":
        refused = common.require_gpu("bench.tune")
        if refused is not None:
            return refused
    env = common.environment(argv)
    timing_kwargs = {"rep_ms": 50.0 if args.quick else 200.0}
    rows: list[dict[str, Any]] = []
    what = "tune" + ("-quick" if args.quick else "-space" if args.space else "")
    save = common.progress_saver(what, env, args.out, enabled=not args.check_only, quick=args.quick)
    try:
        for kernel in args.kernels:
            _, _, full, quick = KERNELS[kernel]
            if args.space:
                from d2v_kernels.kernels.autotune import SPACES

                candidates = list(SPACES[kernel])
            else:
                candidates = quick if args.quick or args.tiny else full
            for case, dtype_name in itertools.product(cases_for(kernel, args), args.dtypes):
                rows += tune_case(
                    kernel,
                    case,
                    dtype_name,
                    candidates,
                    device=args.device,
                    timed=not args.check_only,
                    timing_kwargs=timing_kwargs,
                )
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                save(rows)
    except KeyboardInterrupt:
        print("interrupted: the result file holds the cases that finished", flush=True)
        return common.INTERRUPTED
    print()
    print(summary_table(rows))
    save(rows, complete=True)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
