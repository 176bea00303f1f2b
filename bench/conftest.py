"""pytest-benchmark integration: ``pytest bench --benchmark-only`` runs the benchmark cases.

    pytest bench --benchmark-only                                # quick case lists
    pytest bench --benchmark-only --bench-full                   # every case
    pytest bench --benchmark-only --benchmark-autosave           # keep this run (.benchmarks/)
    pytest bench --benchmark-only --benchmark-compare            # against the last saved run

A test module exposes ``benchmark_cases(quick) -> list[BenchCase]`` and a test taking the
``bench_case`` and ``gpu_benchmark`` fixtures; each case's ``setup()`` checks the output against
the reference before it is timed. The timer is wall clock around ``fn(); torch.cuda.synchronize()``
(launch overhead included: use it to compare commits; ``d2v-kernels bench`` gives the kernel times).
Without a GPU, or without pytest-benchmark, every test here is skipped.
"""

from __future__ import annotations

import time

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("d2v-kernels bench")
    group.addoption("--bench-full", action="store_true", help="every case instead of the quick list")
    group.addoption("--bench-seconds", type=float, default=1.0, help="about this many seconds of timed rounds per case")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    cases = metafunc.module.benchmark_cases(quick=not metafunc.config.getoption("--bench-full"))
    metafunc.parametrize("bench_case", cases, ids=[case.id for case in cases])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        item.add_marker(skip)


def rounds_for(seconds_per_call: float, budget_s: float) -> int:
    """Timed rounds so one case takes about ``budget_s``: at least 5, at most 1000."""
    return int(min(1000, max(5, budget_s / max(seconds_per_call, 1e-6))))


@pytest.fixture
def gpu_benchmark(request):
    """``gpu_benchmark(case)``: set the case up (checked), then time it with ``benchmark.pedantic``."""
    pytest.importorskip("pytest_benchmark", reason="pip install -e '.[bench]' for pytest-benchmark")
    benchmark = request.getfixturevalue("benchmark")
    budget = request.config.getoption("--bench-seconds")

    def run(case):
        from bench import common

        fn = case.setup()

        def synced():
            result = fn()
            torch.cuda.synchronize()
            return result

        synced()  # compile / autotune outside the timed rounds
        started = time.perf_counter()
        synced()
        rounds = rounds_for(time.perf_counter() - started, budget)
        if case.group:
            benchmark.group = case.group
        env = common.environment()
        benchmark.extra_info.update(
            case.extra_info, gpu=env["gpu"], driver=env["driver"], commit=env["commit"], triton=env["triton"]
        )
        return benchmark.pedantic(synced, rounds=rounds, warmup_rounds=min(3, rounds), iterations=1)

    return run
