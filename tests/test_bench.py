"""CPU smoke tests of bench/: argument parsing, result files, report rendering from the synthetic
sample, the no-GPU refusal, op-module dispatch, and the end-to-end output checks on tiny models.
Nothing here times anything."""

import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

# bench/ is not installed with the package: import it from this checkout (plain `pytest` does not
# put the repository root on sys.path; `python -m pytest` does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import __main__ as bench_main
from bench import common, models, report
from d2v_kernels import testing

SAMPLE = common.RESULTS_DIR / "sample" / "synthetic-sample.json"
no_gpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


# ------------------------------------------------------------------------------------- argument parsing


def test_main_parses_ops_models_dtype_and_passthrough():
    args = bench_main.parse_args(["--op", "pos_conv,attention", "--model", "text_base", "--dtype", "bf16", "--quick"])
    assert args.ops == ["pos_conv", "attention"] and args.models == ["text_base"] and args.dtypes == ["bf16"]
    assert bench_main.op_argv(args) == ["--quick", "--dtypes", "bf16"]
    assert bench_main.model_argv(args) == ["--model", "text_base", "--quick", "--dtype", "bf16"]
    args = bench_main.parse_args(["--op", "pos_conv", "--", "--modes", "fwd"])
    assert args.models == [] and bench_main.op_argv(args) == ["--modes", "fwd"]


def test_main_defaults_to_everything():
    args = bench_main.parse_args([])
    assert args.ops[: len(bench_main.OPS)] == list(bench_main.OPS) and args.models == list(models.MODELS)
    assert bench_main.parse_args(["--model", "all"]).ops == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet"], "unknown ['resnet']"),
        (["--dtype", "fp8"], "unknown ['fp8']"),
        (["--op", "common"], "not an op benchmark"),
        (["stray"], "put arguments for op scripts after '--'"),
    ],
)
def test_main_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_models_parse_args():
    args = models.parse_args(["--model", "vision_base,vision_large", "--quick"])
    assert args.models == ["vision_base", "vision_large"] and args.dtypes == ["bf16"]
    assert args.impls == list(models.QUICK_IMPLS) and args.modes == list(models.MODES)
    args = models.parse_args(["--impls", "d2v,hf_flash", "--case", "b1", "--dtype", "fp16,bf16", "--mode", "train"])
    assert args.impls == ["d2v", "hf_flash"] and args.cases == ["b1"] and args.modes == ["train"]
    assert models.parse_args([]).impls == list(models.DEFAULT_IMPLS)
    for bad in (["--impls", "tensorrt"], ["--case", "b7"], ["--mode", "serve"], ["--device", "cpu"]):
        with pytest.raises(SystemExit):
            models.parse_args(bad)


def test_report_parser():
    args = report.build_parser().parse_args(["--input", str(SAMPLE), "--no-readme", "--no-plots"])
    assert args.input == [SAMPLE] and args.no_readme and args.no_plots


def _op_modules():
    return [op for op in bench_main.discovered_ops() if (common.BENCH_DIR / f"{op}.py").exists()]


@pytest.mark.parametrize("op", _op_modules())
def test_every_op_module_imports_exposes_main_and_parses_help(op, capsys):
    module = importlib.import_module(f"bench.{op}")
    assert callable(module.main), f"bench/{op}.py must expose main(argv)"
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out.lower()


# --------------------------------------------------------------------------------- GPU refusal, dispatch


@no_gpu_only
def test_main_refuses_without_gpu(capsys):
    assert bench_main.main(["--model", "text_base", "--quick"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert bench_main.main([]) == 2
    assert models.main(["--model", "text_base"]) == 2


@no_gpu_only
def test_python_dash_m_bench_refuses_without_gpu():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        capture_output=True,
        text=True,
        cwd=common.REPO_DIR,
        timeout=120,
    )
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr


def test_list_needs_no_gpu(capsys):
    assert bench_main.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "audio_ctc" in out and "vision_large" in out and "attention" in out


def test_dispatch_forwards_arguments_and_skips_missing_ops(monkeypatch, tmp_path, capsys):
    calls = []
    fake = types.ModuleType("bench.fake_op")
    fake.main = lambda argv: calls.append(argv) or 0
    broken = types.ModuleType("bench.broken_op")
    broken.main = lambda argv: 1
    monkeypatch.setitem(sys.modules, "bench.fake_op", fake)
    monkeypatch.setitem(sys.modules, "bench.broken_op", broken)
    monkeypatch.setattr(common, "has_gpu", lambda: True)
    argv = ["--op", "fake_op", "--dtype", "fp16", "--quick", "--no-report", "--no-device-info", "--out", str(tmp_path)]
    assert bench_main.main([*argv, "--", "--modes", "fwd"]) == 0
    assert calls == [["--quick", "--dtypes", "fp16", "--out", str(tmp_path), "--modes", "fwd"]]
    assert bench_main.main(["--op", "fake_op,broken_op", "--no-report", "--no-device-info"]) == 1
    assert bench_main.main(["--op", "no_such_op", "--no-report", "--no-device-info"]) == 1
    out, err = capsys.readouterr()
    assert "bench/no_such_op.py does not exist" in err and "failed (exit status 1)" in out


# ------------------------------------------------------------------------------------ results and report


def test_write_results_round_trip(tmp_path):
    env = common.environment(["--op", "x"])
    for key in ("gpu", "torch", "triton", "transformers", "d2v_kernels", "commit", "date", "command", "driver", "cuda"):
        assert key in env
    assert env["collect_env"]["torch_version"] == torch.__version__ and "cpu_info" not in env["collect_env"]
    rows = [{"case": "c", "dtype": "bf16", "mode": "fwd", "impl": "d2v_triton", "max_err": 1e-3, "dt": torch.float16}]
    path = common.write_results("my_op", rows, env, tmp_path, quick=True)
    assert path.parent == tmp_path / common.gpu_slug(env["gpu"])
    assert path.name.endswith("-my_op.json") and path.name[:8].isdigit()
    data = json.loads(path.read_text())
    assert data["schema"] == 1 and data["quick"] is True and data["environment"] == env
    assert data["rows"] == [dict(rows[0], what="my_op", dt="float16")]
    run = report.load_run(path)
    assert run.what == "my_op" and not run.synthetic and run.rows[0]["impl"] == "d2v_triton"


def test_gpu_slug_and_peak_lines():
    assert common.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    stored = {"name": "H100 SXM", "tflops": {"fp16": 989.4}, "hbm_gbps": 3350.0}  # files written before
    assert report.peak_line(stored) == "Datasheet peaks (H100 SXM): dense TFLOP/s fp16 989.4; HBM 3350 GB/s.\n"
    measured = {"name": "NVIDIA X", "source": "triton.testing", "tflops": {}, "hbm_gbps": 2000.0}
    assert report.peak_line(measured) == "Peaks from triton.testing (NVIDIA X): HBM 2000 GB/s.\n"
    if not torch.cuda.is_available():
        assert common.device_peak() is None


@pytest.mark.parametrize("major, fp16_tflops", [(9, 1070.6), (10, None)])
def test_device_peak_from_triton_testing(monkeypatch, major, fp16_tflops):
    """triton.testing's figures for an H100 SXM's clocks (132 SMs at 1980 MHz, HBM3 at 2619 MHz on
    5120 bits), Hopper's tensor-core rate twice the Ampere rate triton counts; none past Hopper."""
    from triton.runtime import driver

    properties = {"multiprocessor_count": 132, "sm_clock_rate": 1_980_000, "mem_clock_rate": 2_619_000}
    properties["mem_bus_width"] = 5120
    fake = types.SimpleNamespace(utils=types.SimpleNamespace(get_device_properties=lambda d: properties))
    monkeypatch.setattr(driver, "_active", fake)
    monkeypatch.setattr(common, "has_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak = common.device_peak()
    assert peak["name"] == "NVIDIA H100 80GB HBM3" and peak["hbm_gbps"] == pytest.approx(3352.3, abs=0.1)
    if fp16_tflops is None:
        assert peak["tflops"] == {}
    else:
        assert peak["tflops"]["fp16"] == peak["tflops"]["bf16"] == pytest.approx(fp16_tflops, abs=0.1)
        assert peak["tflops"]["fp32"] == pytest.approx(fp16_tflops / 2, abs=0.1)
    assert report.peak_line(peak).startswith("Peaks from triton.testing (NVIDIA H100 80GB HBM3)")


def test_rotation_covers_twice_the_cache():
    assert common.rotation_copies(10 << 20, cache_bytes=50 << 20) == 11
    assert common.rotation_copies(1 << 30, cache_bytes=50 << 20) == 2
    assert common.rotation_copies(1, cache_bytes=50 << 20, max_copies=64) == 64
    seen = []
    fn = common.rotate_inputs(lambda x: seen.append(x), lambda: (torch.randn(4),), cache_bytes=40)
    assert fn.copies == 6
    for _ in range(7):
        fn()
    assert seen[6] is seen[0] and len({id(t) for t in seen}) == 6


def test_error_bound_is_twice_eager_plus_a_floor_or_1e_5_relative_in_fp32():
    assert testing.error_bound(torch.float16, 1e-3, 0.5) == pytest.approx(2e-3 + testing.ABS_FLOOR[torch.float16])
    assert testing.error_bound(torch.bfloat16, 0.0, 4.0, factor=4.0, floor=1e-2) == pytest.approx(4e-2)
    assert testing.error_bound(torch.float32, 1e-9, 3.0) == pytest.approx(3e-5)
    assert testing.error_bound(torch.float32, 1e-4, 3.0) == pytest.approx(2e-4)


def test_assert_close_to_reference_bounds_by_eager_error():
    torch.manual_seed(0)
    ref = torch.randn(64, 32, dtype=torch.float64)
    eager = ref.half()
    good = (ref + 1e-4 * torch.randn_like(ref)).half()
    result = testing.assert_close_to_reference([good, good], [ref, ref], [eager, eager], name="good")
    assert 0 < result["max_err"] <= result["bound"]
    with pytest.raises(testing.CheckFailed, match=r"bad \(float16\): max error .* > bound"):
        testing.assert_close_to_reference((ref + 0.05).half(), ref, eager, name="bad")
    with pytest.raises(testing.CheckFailed, match=r"grads\[1\] \(float16\): max error"):
        testing.assert_close_to_reference([good, good + 0.05], [ref, ref], [eager, eager], name="grads")
    with pytest.raises(testing.CheckFailed, match="nan"):
        testing.assert_close_to_reference(torch.full_like(eager, float("nan")), ref, eager)
    with pytest.raises(testing.CheckFailed, match="shape"):
        testing.assert_close_to_reference(eager[:3], ref, eager)


def test_sample_is_labelled_synthetic():
    data = json.loads(SAMPLE.read_text())
    assert data["synthetic"] is True and "not" in data["note"] and "measured" in data["note"]
    assert report.load_run(SAMPLE).synthetic


def test_render_sample_table_and_plots(tmp_path):
    assert report.main(["--input", str(SAMPLE), "--out", str(tmp_path)]) == 0
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith(f"**{report.SYNTHETIC_LABEL}")
    assert "| what | case | dtype | mode | impl |" in markdown
    assert "| pos_conv | base | fp16 | fwd | hf_eager | 3 (2.7-3.3) |  | 33.3 |  | 3% |" in markdown  # % of 989.4
    assert "| 3.00x |" in markdown and "| 1.25x |" in markdown  # speedup of d2v over eager / sdpa
    assert "skipped: flash_attn not importable" in markdown and "error: CheckFailed" in markdown
    plots = sorted(tmp_path.rglob("*.png"))
    names = {p.name for p in plots}
    assert {"pos_conv-speedup.png", "pos_conv-efficiency.png", "text_base-speedup.png"} <= names
    for plot in plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
        assert f"]({plot.relative_to(tmp_path).as_posix()})" in markdown


def test_readme_regeneration_keeps_head_and_never_shows_the_sample(tmp_path):
    results = tmp_path / "results"
    (results / "sample").mkdir(parents=True)
    (results / "sample" / SAMPLE.name).write_text(SAMPLE.read_text())
    readme = results / "README.md"
    readme.write_text(f"# head\n\nhow to run\n\n{report.GENERATED_MARKER}\n\nold table\n")
    assert report.main(["--results", str(results)]) == 0
    assert readme.read_text() == f"# head\n\nhow to run\n\n{report.GENERATED_MARKER}\n\n{report.NO_RESULTS}\n"
    measured = json.loads(SAMPLE.read_text())
    measured.pop("synthetic")
    measured["environment"] = dict(measured["environment"], synthetic=False, gpu="NVIDIA H100 80GB HBM3")
    (results / "nvidia-h100-80gb-hbm3").mkdir()
    (results / "nvidia-h100-80gb-hbm3" / "20000101-000000-x.json").write_text(json.dumps(measured))
    assert report.main(["--results", str(results)]) == 0
    text = readme.read_text()
    assert text.startswith("# head\n\nhow to run\n\n") and "## NVIDIA H100 80GB HBM3" in text
    assert "(nvidia-h100-80gb-hbm3/plots/pos_conv-speedup.png)" in text and report.SYNTHETIC_LABEL not in text


def test_committed_readme_is_what_the_report_renders(tmp_path):
    readme = common.RESULTS_DIR / "README.md"
    text = readme.read_text()
    assert "d2v-kernels bench" in text and "What the columns mean" in text
    copy = tmp_path / "README.md"
    copy.write_text(text)
    assert report.main(["--results", str(common.RESULTS_DIR), "--readme", str(copy), "--out", str(tmp_path)]) == 0
    assert copy.read_text() == text, "bench/results/README.md is stale: run python -m bench.report"
    assert "SYNTHETIC" not in text.split(report.GENERATED_MARKER)[1]


def test_latest_row_wins_and_op_script_files_load(tmp_path):
    folder = tmp_path / "NVIDIA_H100"
    folder.mkdir()
    row = {"case": "base", "dtype": "bf16", "mode": "fwd", "impl": "d2v_triton", "ms": 2.0}
    old = {"environment": {"gpu": "NVIDIA H100", "time": "2030-01-01T00:00:00+00:00"}, "rows": [row]}
    new = {"environment": {"gpu": "NVIDIA H100", "time": "2030-01-02T00:00:00+00:00"}, "rows": [dict(row, ms=1.0)]}
    (folder / "pos_conv.json").write_text(json.dumps(new))
    (folder / "pos_conv_quick.json").write_text(json.dumps(old))
    runs = report.find_runs(tmp_path)
    assert {run.what for run in runs} == {"pos_conv"}
    ((_, rows),) = report.latest_by_gpu(runs).values()
    assert [r["ms"] for r in rows] == [1.0] and rows[0]["run_date"] == "2030-01-02"


# ------------------------------------------------------------------------------- end-to-end checks (CPU)


def test_model_checks_run_on_tiny_configs_on_cpu(capsys):
    argv = ["--model", "text_base,vision_base", "--tiny", "--check-only", "--device", "cpu", "--dtype", "bf16"]
    assert models.main([*argv, "--impls", "d2v,hf_eager,hf_sdpa,hf_flash"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    checked = [r for r in rows if "max_err" in r]
    assert {(r["what"], r["impl"], r["mode"]) for r in checked} == {
        (m, i, mode)
        for m in ("text_base", "vision_base")
        for i in ("d2v", "hf_eager", "hf_sdpa")
        for mode in models.MODES
    }
    assert all(0 <= r["max_err"] <= r["bound"] and "ms" not in r for r in checked)
    assert all(r["loss"] > 0 for r in checked if r["mode"] == "train")


def test_model_main_keeps_finished_implementations_when_interrupted(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "require_gpu", lambda what: None)

    def two_impls_then_stopped(spec, options, rows, saved):
        for impl in ("d2v", "hf_sdpa"):
            rows.append(dict(what=spec.name, case="tiny", dtype="bf16", mode="inference", impl=impl, ms=1.0))
            saved(rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "bench_model", two_impls_then_stopped)
    assert models.main(["--model", "text_base,vision_base", "--tiny", "--out", str(tmp_path)]) == 130
    [path] = (tmp_path / common.gpu_slug(common.environment()["gpu"])).glob("*-model-text_base.json")
    data = json.loads(path.read_text())
    assert data["complete"] is False and [r["impl"] for r in data["rows"]] == ["d2v", "hf_sdpa"]
    assert not list(tmp_path.rglob("*vision_base*"))  # stopped before the next model


def test_model_check_catches_a_wrong_implementation(monkeypatch):
    real = models.infer_logits

    def wrong(call, batch, dtype, **kw):
        logits = real(call, batch, dtype, **kw)
        return logits + 0.5 if getattr(call, "_wrong", False) else logits

    real_build = models.build_variant

    def build(spec, config, impl, *a, **kw):
        model, call = real_build(spec, config, impl, *a, **kw)
        call._wrong = impl == "hf_sdpa"
        return model, call

    monkeypatch.setattr(models, "infer_logits", wrong)
    monkeypatch.setattr(models, "build_variant", build)
    options = models.Options(
        dtypes=["bf16"], modes=["inference"], impls=["hf_sdpa", "d2v"], check_only=True, tiny=True, device="cpu"
    )
    rows = models.bench_model(models.MODELS["text_base"], options)
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["hf_sdpa"]["error"].startswith("CheckFailed: hf_sdpa logits (bfloat16): max error")
    assert "error" not in by_impl["d2v"]


def test_text_batch_pads_rows_and_counts_real_tokens():
    spec = models.MODELS["text_base"]
    config = spec.config(tiny=True)
    batch = models.make_batch(spec, {"batch": 4, "length": 13, "min_length": 5}, config, "cpu")
    mask = batch.inputs["attention_mask"]
    assert mask[0].all() and batch.units == mask.sum().item() < 4 * 13
    assert (batch.inputs["input_ids"][mask == 0] == config.pad_token_id).all()


def test_timed_rows_carry_throughput_and_memory(monkeypatch):
    """The timing path of bench/models.py with the GPU timer replaced (nothing is measured here)."""
    monkeypatch.setattr(common, "time_ms", lambda fn, **kw: fn() is not None and common.Timing(2.0, 1.5, 2.5, "stub"))
    monkeypatch.setattr(common, "peak_memory_mb", lambda fn: 7.0)
    options = models.Options(dtypes=["bf16"], modes=list(models.MODES), impls=["d2v"], tiny=True, device="cpu")
    spec = models.MODELS["audio_ctc"]
    rows = models.bench_model(spec, options)
    assert [r["mode"] for r in rows] == ["inference", "train"]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert (row["ms"], row["ms_p20"], row["ms_p80"], row["timing"], row["peak_mem_mb"]) == (
            2.0,
            1.5,
            2.5,
            "stub",
            7.0,
        )
        assert row["throughput"] == pytest.approx(spec.tiny_case["batch"] * spec.tiny_case["seconds"] / 2e-3)
        assert row["throughput_unit"] == "audio s/s" and row["attn_implementation"] == "d2v_kernels"
        # what ran each op (on the CPU: the eager references), one call's worth
        assert row["dispatch"]["attention/eager"] == spec.config(tiny=True).num_hidden_layers


def test_cuda_graph_baselines_are_compared_with_our_cuda_graph_row():
    base = dict(what="audio_ctc", case="b8x10s", dtype="bf16", mode="inference")
    rows = [
        dict(base, impl="d2v", ms=10.0),
        dict(base, impl="d2v_compile_cudagraphs", ms=4.0),
        dict(base, impl="hf_sdpa", ms=12.0),
        dict(base, impl="hf_compile_cudagraphs", ms=8.0, peak_mem_mb=2.0),
    ]
    derived = {r["impl"]: r for r in report.add_derived(rows, None)}
    assert derived["hf_sdpa"]["speedup"] == pytest.approx(1.2) and derived["hf_sdpa"]["speedup_over"] == "d2v"
    assert derived["hf_compile_cudagraphs"]["speedup"] == pytest.approx(2.0)
    assert derived["hf_compile_cudagraphs"]["speedup_over"] == "d2v_compile_cudagraphs"
    table = report.markdown_table(list(derived.values()))
    assert "| 2.00x (of d2v_compile_cudagraphs) |" in table and "| 1.20x |" in table
    assert "| 2 |" not in table  # a graph replay's peak memory is not shown


def test_report_marks_rows_of_a_run_stopped_short(tmp_path):
    folder = tmp_path / "nvidia-h200"
    folder.mkdir()
    env = {"gpu": "NVIDIA H200", "date": "2030-01-01T00:00:00+00:00"}
    row = {"what": "pos_conv", "case": "base", "dtype": "bf16", "mode": "fwd", "impl": "d2v_triton", "ms": 2.0}
    cut = {"what": "pos_conv", "complete": False, "environment": env, "rows": [row]}
    whole = {"what": "pos_conv", "complete": True, "environment": env, "rows": [dict(row, case="large")]}
    (folder / "20300101-000000-pos_conv.json").write_text(json.dumps(cut))
    (folder / "20300101-000001-pos_conv.json").write_text(json.dumps(whole))
    runs = report.find_runs(tmp_path)
    assert [run.complete for run in runs] == [False, True]
    ((_, rows),) = report.latest_by_gpu(runs).values()
    table = report.markdown_table(report.add_derived(rows, None))
    lines = table.splitlines()
    assert any("| base |" in line and f"2 (-) {report.INCOMPLETE_MARK} |" in line for line in lines), table
    assert any("| large |" in line and "| 2 (-) |" in line for line in lines), table
    assert lines[-1].startswith(report.INCOMPLETE_MARK) and "`20300101-000000-pos_conv.json`" in lines[-1]
    assert "000001" not in lines[-1]
    # a newer complete run of the same case replaces the mark
    (folder / "20300101-000002-pos_conv.json").write_text(json.dumps(dict(cut, complete=True)))
    ((_, rows),) = report.latest_by_gpu(report.find_runs(tmp_path)).values()
    assert report.INCOMPLETE_MARK not in report.markdown_table(report.add_derived(rows, None))


def test_headline_renders_every_measured_cell_and_names_each_loss(tmp_path):
    from bench import headline

    env = dict(gpu="Test GPU", torch="2.x", date="2026-01-02T03:04:05", commit="abcdef123")
    rows = [
        dict(what="text_base", case="b32x512", dtype="bf16", mode="inference", impl="hf_sdpa", ms=10.0),
        dict(what="text_base", case="b32x512", dtype="bf16", mode="inference", impl="d2v", ms=8.0),
        dict(what="text_base", case="b32x512", dtype="bf16", mode="train", impl="hf_sdpa", ms=30.0),
        dict(what="text_base", case="b32x512", dtype="bf16", mode="train", impl="d2v", ms=40.0),
        dict(what="text_base", case="b32x512", dtype="bf16", mode="train", impl="hf_compile", error="boom"),
    ]
    path = tmp_path / "nvidia-test" / "20260102-030405-model-text_base-quick.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"environment": env, "rows": rows}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{headline.START}\nold\n{headline.END}\n\ntail\n")
    assert headline.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{headline.END}\n\ntail\n") and "Test GPU" in text
    inference = next(line for line in text.splitlines() if "| inference |" in line)
    train = next(line for line in text.splitlines() if "| train |" in line)
    assert "| 10 | 8 | **1.25x** |" in inference
    assert "| 30 | 40 | 0.75x (slower) |" in train and "not measured" in train  # the failed row is no time
    assert "slower on this run: Data2VecTextForSequenceClassification (b32x512) train, eager." in text
