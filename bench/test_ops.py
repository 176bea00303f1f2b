"""Kernel cases under pytest-benchmark (see bench/conftest.py), gathered from every bench/<op>.py
that offers ``benchmark_cases(quick) -> list[bench.common.BenchCase]``."""

from __future__ import annotations

import importlib

import pytest

from bench import common
from bench.__main__ import discovered_ops


def _skipping(reason: str):
    def setup():
        pytest.skip(reason)

    return setup


def benchmark_cases(quick: bool = True) -> list[common.BenchCase]:
    cases = []
    for op in discovered_ops():
        if not (common.BENCH_DIR / f"{op}.py").exists():
            cases.append(common.BenchCase(f"{op}-missing", _skipping(f"bench/{op}.py does not exist yet")))
            continue
        try:
            module = importlib.import_module(f"bench.{op}")
        except Exception as e:
            cases.append(common.BenchCase(f"{op}-import", _skipping(f"bench/{op}.py failed to import: {e}")))
            continue
        source = getattr(module, "benchmark_cases", None)
        if source is None:
            why = f"bench/{op}.py has no benchmark_cases(quick) yet (see bench/common.py BenchCase)"
            cases.append(common.BenchCase(f"{op}-none", _skipping(why)))
            continue
        cases.extend(source(quick))
    return cases


def test_op(bench_case, gpu_benchmark):
    gpu_benchmark(bench_case)
