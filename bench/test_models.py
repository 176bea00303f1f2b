"""End-to-end model cases under pytest-benchmark (see bench/conftest.py)."""

from bench.models import benchmark_cases  # noqa: F401  (conftest parametrizes bench_case from it)


def test_model(bench_case, gpu_benchmark):
    gpu_benchmark(bench_case)
