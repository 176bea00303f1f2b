"""The d2v-kernels command line: info, validate, bench."""

import subprocess
import sys

import pytest
import torch

from d2v_kernels import cli, validate


def test_info_lists_versions_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("torch", "transformers", "triton", "GPU", "attention", "conv_feature_extractor", "eager   can run"):
        assert needle in out


def test_validate_one_op_prints_table_and_passes(capsys):
    assert cli.main(["validate", "--ops-only", "--op", "add_layer_norm"]) == 0
    out = capsys.readouterr().out
    assert "add_layer_norm" in out and "max err" in out and "PASS" in out and "0 failed" in out


def test_validate_fails_on_a_wrong_kernel(monkeypatch, capsys):
    from d2v_kernels import dispatch

    eager = next(i for i in dispatch.implementations("add_layer_norm") if i.backend == "eager")
    wrong = lambda x, residual, weight, bias, **kw: eager.run(x, residual, weight, bias, **kw) * 1.001
    dispatch.register("add_layer_norm", "cuda", wrong, devices=("cpu",))
    try:
        assert cli.main(["validate", "--ops-only", "--op", "add_layer_norm"]) == 1
        assert "FAIL" in capsys.readouterr().out
    finally:
        dispatch._REGISTRY["add_layer_norm"] = [i for i in dispatch._REGISTRY["add_layer_norm"] if i.backend != "cuda"]


def test_format_table_marks_skips_and_failures():
    rows = [
        validate.Row("attention", "eager", "float32", "B2", 1e-7, 1e-5, True),
        validate.Row("attention", "cuda", "float32", "B2", float("nan"), 1e-5, True, "skipped: not built"),
        validate.Row("pos_conv", "triton", "float16", "B2", 1.0, 1e-3, False),
    ]
    table = validate.format_table(rows)
    assert "PASS" in table and "skip" in table and "FAIL" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_gpu_exits_nonzero_with_message():
    result = subprocess.run([sys.executable, "-m", "d2v_kernels.cli", "bench"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "no CUDA GPU" in result.stderr
