"""The d2v-kernels command line: info, validate, bench."""

import os
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


def test_validate_rejects_an_unknown_op_listing_the_known_ones(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(validate, "run", lambda **kw: ran.append(kw) or ([], True))
    with pytest.raises(SystemExit) as exc:
        cli.main(["validate", "--op", "nosuch"])
    assert exc.value.code == 2 and not ran
    err = capsys.readouterr().err
    assert "nosuch" in err and all(op in err for op in ("attention", "pos_conv", "conv_feature_extractor"))


def test_validate_ops_only_and_models_only_exclude_each_other(monkeypatch, capsys):
    monkeypatch.setattr(validate, "run", lambda **kw: ([], True))
    with pytest.raises(SystemExit) as exc:
        cli.main(["validate", "--ops-only", "--models-only"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["validate", "--models-only", "--op", "attention"])
    assert exc.value.code == 2 and "--models-only runs none" in capsys.readouterr().err


def test_validate_summary_counts_and_lists_skipped_rows(monkeypatch, capsys):
    rows = [
        validate.Row("attention", "eager", "float32", "B2", 1e-7, 1e-5, True),
        validate.Row("attention", "cuda", "float16", "B2", float("nan"), 1e-3, True, "skipped: no CUDA GPU"),
    ]
    monkeypatch.setattr(validate, "run", lambda **kw: (rows, True))
    assert cli.main(["validate", "--ops-only", "--op", "attention"]) == 0
    summary = capsys.readouterr().out.split("\n\n")[-1]
    assert "1 passed" in summary and "0 failed" in summary and "1 skipped" in summary
    assert "attention cuda float16: no CUDA GPU" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine reports")
def test_info_reports_default_dispatch_without_setting_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "D2V_KERNELS_BACKEND")}
    code = "import os, sys; from d2v_kernels import cli; rc = cli.main(['info']); print(os.environ.get('TRITON_INTERPRET'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "None"  # the environment is left as it was
    triton_lines = [line.strip() for line in lines if line.startswith("    triton ")]  # a backend row per op
    assert triton_lines and all("TRITON_INTERPRET=1 is not set" in line for line in triton_lines), lines
    assert not any("can run" in line and "cannot" not in line for line in triton_lines)
