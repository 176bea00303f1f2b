"""The harness of the op benchmarks (``bench/<op>.py``): an op module describes its cases
(``OpCase``: inputs, the step of each implementation, the float64 reference) and hands them to an
``OpBenchmark``, which gives it its command line and main loop. Every
implementation's output is checked before it is timed; a failure is that row's ``error``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench import common
from d2v_kernels.testing import assert_close_to_reference


class Skip(Exception):
    """An implementation cannot run here (package missing, no such backend on this device): a ``skipped`` row."""


def forward_backward(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor | None],
    grad_out: torch.Tensor | None,
    mode: str,
    params: Sequence[torch.Tensor] = (),
) -> list[torch.Tensor]:
    """``fn(*inputs)`` for ``mode`` ``"fwd"`` (no grad): ``[out]``; for ``"fwd+bwd"``: ``[out, *grads]``.

    The gradients are those of the tensors among ``inputs`` (each made a fresh leaf; ``None``
    entries are passed through) and then of ``params`` (tensors that already require grad, such as
    module weights), for the output gradient ``grad_out``.
    """
    if mode == "fwd":
        with torch.no_grad():
            return [fn(*inputs)]
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None] + list(params)
    return [out.detach(), *torch.autograd.grad(out, wrt, grad_out)]


@dataclasses.dataclass
class OpCase:
    """One (case, dtype, mode) of an op benchmark, its inputs built on the device.

    ``make_step(impl)`` returns the zero-argument call that is checked and timed (it returns the
    output and, for fwd+bwd, the gradients: a list of tensors), or raises ``Skip``.
    ``reference(impl)`` returns ``(float64 result, eager result in the dtype)`` to check ``impl``
    against (see ``d2v_kernels.testing.assert_close_to_reference``). ``flops`` / ``nbytes``: the work the op must do at the least,
    for the TFLOP/s / GB/s columns. ``row``: the case's fields every result row starts with.
    """

    row: dict[str, Any]
    make_step: Callable[[str], Callable[[], list[torch.Tensor]]]
    reference: Callable[[str], tuple[Any, Any]]
    flops: float | None = None
    nbytes: float | None = None

    def label(self, impl: str) -> str:
        return " ".join([impl, *(str(self.row[k]) for k in ("case", "dtype", "mode") if k in self.row)])

    def checked_step(self, impl: str) -> tuple[Callable[[], list[torch.Tensor]], dict[str, float]]:
        """(step, ``{"max_err", "bound"}``): ``impl``'s step after its output passed the check."""
        step = self.make_step(impl)
        return step, assert_close_to_reference(step(), *self.reference(impl), name=self.label(impl))


def _is_backend_unavailable(error: Exception) -> bool:
    from d2v_kernels.dispatch import BackendUnavailableError

    return isinstance(error, BackendUnavailableError)


def bench_impls(
    op_case: OpCase,
    impls: Sequence[str],
    *,
    check: bool = True,
    timed: bool = True,
    timing_kwargs: dict[str, Any] | None = None,
    device: str = "cuda",
) -> list[dict[str, Any]]:
    """A row per implementation: output checked (unless ``check=False``), then timed (unless
    ``timed=False``) with TFLOP/s, GB/s and peak memory. A failure is the row's ``error`` and does not
    stop the others; off the GPU, a d2v backend the dispatcher refuses for the device is ``skipped``."""
    rows = []
    for impl in impls:
        row = dict(op_case.row, impl=impl)
        try:
            if check:
                step, result = op_case.checked_step(impl)
                row.update(result)
            else:
                step = op_case.make_step(impl)
            if timed:
                timing = common.time_ms(step, **(timing_kwargs or {}))
                row.update(timing.as_row())
                if op_case.flops:
                    row["tflops"] = common.tflops(op_case.flops, timing.ms)
                if op_case.nbytes:
                    row["gbps"] = common.gbps(op_case.nbytes, timing.ms)
                row["peak_mem_mb"] = common.peak_memory_mb(step)
                row.update(common.graph_row(step))
        except Skip as e:
            row["skipped"] = str(e)
        except Exception as e:  # one implementation failing must not hide the others' numbers
            if device != "cuda" and _is_backend_unavailable(e):
                row["skipped"] = f"{type(e).__name__}: {e}"
            else:
                row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        common.print_row(row)
    return rows


@dataclasses.dataclass(frozen=True)
class OpBenchmark:
    """Command line and main loop of an op script (``bench/<op>.py``).

    ``setup(case, dtype_name, mode, device) -> OpCase`` builds one case; every (case, dtype,
    mode) is run for every implementation asked for. ``tiny_cases`` are small shapes for
    ``--check-only --tiny --device cpu`` (the output checks on a CPU, nothing timed).
    """

    what: str
    doc: str
    setup: Callable[[str, str, str, str], OpCase]
    cases: Sequence[str]
    quick_cases: Sequence[str]
    tiny_cases: Sequence[str]
    impls: Sequence[str]
    modes: Sequence[str] = ("fwd", "fwd+bwd")
    dtypes: Sequence[str] = ("fp16", "bf16")
    quick_dtypes: Sequence[str] = ("fp16",)
    # Memory-bound ops: measure the copy bandwidth once per timed run; rows get its share.
    copy_bandwidth: bool = False
    # Impls run only when named in --impls (e.g. a minutes-long max-autotune compile), never by default.
    extra_impls: Sequence[str] = ()

    def build_parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=f"python -m bench.{self.what}", description=self.doc.split("\n\n")[0])
        quick = f"cases {list(self.quick_cases)}, {','.join(self.quick_dtypes)}, shorter timing"
        parser.add_argument("--quick", action="store_true", help=quick)
        parser.add_argument("--cases", "--case", dest="cases", help=f"comma list of {list(self.cases)}")
        parser.add_argument(
            "--dtypes",
            "--dtype",
            dest="dtypes",
            help=f"comma list of {list(common.DTYPES)} (default {list(self.dtypes)})",
        )
        parser.add_argument("--modes", "--mode", dest="modes", help=f"comma list of {list(self.modes)}")
        extra = f" (and on request {list(self.extra_impls)})" if self.extra_impls else ""
        parser.add_argument("--impls", help=f"comma list of {list(self.impls)}{extra}")
        parser.add_argument("--no-check", action="store_true", help="skip the float64 output check (not recommended)")
        parser.add_argument("--check-only", action="store_true", help="check outputs, time nothing (runs on a CPU)")
        parser.add_argument(
            "--tiny", action="store_true", help=f"small cases {list(self.tiny_cases)} (with --check-only)"
        )
        parser.add_argument("--device", default=None, help="default cuda; cpu only with --check-only")
        parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="results root (default bench/results)")
        return parser

    def parse_args(self, argv: Sequence[str]) -> argparse.Namespace:
        parser = self.build_parser()
        args = parser.parse_args(list(argv))
        cases = self.tiny_cases if args.tiny else self.cases
        try:
            args.cases = common.parse_list(args.cases, cases, "--cases") or list(
                self.quick_cases if args.quick and not args.tiny else cases
            )
            args.dtypes = common.parse_list(args.dtypes, common.DTYPES, "--dtypes") or list(
                self.quick_dtypes if args.quick else self.dtypes
            )
            args.modes = common.parse_list(args.modes, self.modes, "--modes") or list(self.modes)
            args.impls = common.parse_list(args.impls, [*self.impls, *self.extra_impls], "--impls") or list(self.impls)
        except ValueError as e:
            parser.error(str(e))
        if args.check_only and args.no_check:
            parser.error("--check-only and --no-check leave nothing to do")
        if args.device is None:
            args.device = "cuda" if common.has_gpu() or not args.check_only else "cpu"
        if args.device != "cuda" and not args.check_only:
            parser.error("timing needs --device cuda; use --check-only for a CPU run")
        return args

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Run what ``argv`` (default ``sys.argv[1:]``) asks for; write the result file (unless
        ``--check-only``). Exit status: 0, 1 when a row has an error, 2 without a GPU."""
        argv = list(sys.argv[1:] if argv is None else argv)
        args = self.parse_args(argv)
        if args.device == "cuda":
            refused = common.require_gpu(f"{self.what} benchmark")
            if refused is not None:
                return refused
        env = common.environment(argv)
        timing_kwargs = {"rep_ms": 50.0 if args.quick else 200.0}
        rows: list[dict[str, Any]] = []
        extra: dict[str, Any] = {"quick": args.quick}
        if self.copy_bandwidth and args.device == "cuda" and not args.check_only:
            extra["copy_gbps"] = common.copy_bandwidth_gbps()
            common.print_row({"what": "device", "impl": "torch_copy", "gbps": extra["copy_gbps"]})
        save = common.progress_saver(self.what, env, args.out, enabled=not args.check_only, **extra)
        try:
            for case, dtype_name, mode in itertools.product(args.cases, args.dtypes, args.modes):
                try:
                    op_case = self.setup(case, dtype_name, mode, args.device)
                except Exception as e:  # e.g. out of memory: the other cases still run
                    error = f"setup: {type(e).__name__}: {e}"
                    failed = [dict(case=case, dtype=dtype_name, mode=mode, impl=i, error=error) for i in args.impls]
                    rows += failed
                    for row in failed:
                        common.print_row(row)
                    continue
                case_rows = bench_impls(
                    op_case,
                    args.impls,
                    check=not args.no_check,
                    timed=not args.check_only,
                    timing_kwargs=timing_kwargs,
                    device=args.device,
                )
                for row in case_rows:
                    if "copy_gbps" in extra and "gbps" in row:
                        row["fraction_of_copy_bw"] = row["gbps"] / extra["copy_gbps"]
                rows += case_rows
                del op_case
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                save(rows)
        except KeyboardInterrupt:
            print("interrupted: the result file holds the cases that finished", flush=True)
            return common.INTERRUPTED
        save(rows, complete=True)
        return 1 if any("error" in row for row in rows) else 0
