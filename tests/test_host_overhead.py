"""bench.host_overhead, per op and whole models: Triton's compiled launch path (kernels compiled
for sm_90) on a no-op driver, in a process of its own without TRITON_INTERPRET. The times are
printed, never judged."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# bench/ is not installed with the package: import it from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import host_overhead


def run_on_the_no_op_driver(*args: str, triton_cache: Path | None = None) -> subprocess.CompletedProcess:
    result = host_overhead.run_in_a_process("bench.host_overhead", *args, triton_cache=triton_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_each_op_launches_its_kernels_through_the_compiled_path(grad):
    """Each op launches its kernels through Triton's real launcher: one, or one a layer for the
    feature extractor (layer 0's kernel, then a LayerNorm + GELU after each of the other six
    convs); with autograd recording (``--grad``) the forward launches the same."""
    result = run_on_the_no_op_driver("--calls", "20", *(["--grad"] if grad else []))
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    launches = {"add_layer_norm": "1", "layer_norm_gelu": "1", "attention": "1", "conv_feature_extractor": "7"}
    assert {name: fields[2] for name, fields in lines.items()} == launches
    assert all(float(fields[1]) > 0 for fields in lines.values())


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory) -> Path:
    """One Triton cache for the module's runs: the second compiles nothing the first did."""
    return tmp_path_factory.mktemp("host_overhead_triton")


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_whole_models_print_a_ratio_and_launch_counts(mode, tmp_path, triton_cache):
    """Each model's step, ours and transformers' sdpa model's: timed (a ratio printed), our Triton
    kernels launched (per layer too: attention and the LayerNorms), transformers' model none; a
    layer of either launches something, and the step more than its 12 layers."""
    out = tmp_path / "rows.json"
    # Training on one model (its backward kernels compile for sm_90 in the subprocess: CI time).
    models = "all" if mode == "inference" else "text_base"
    args = ["--model", models, "--steps", "1", "--rounds", "2", "--warmup", "1", "--json", str(out)]
    result = run_on_the_no_op_driver(*args, *(["--train"] if mode == "train" else []), triton_cache=triton_cache)
    payload = json.loads(out.read_text())
    assert payload["environment"]["cpu"] and payload["environment"]["torch"]
    rows = {(row["model"], row["impl"]): row for row in payload["rows"]}
    names = ("audio_ctc", "vision_base", "text_base") if mode == "inference" else ("text_base",)
    assert set(rows) == {(model, impl) for model in names for impl in ("d2v", "hf_sdpa")}
    for (model, impl), row in rows.items():
        assert row["mode"] == mode and row["ms"] > 0 and len(row["ms_rounds"]) == 2
        assert row["launches"] == row["launches_triton"] + row["launches_aten"]
        assert 0 < row["launches_per_layer"] and 12 * row["launches_per_layer"] < row["launches"]
        line = next(line for line in result.stdout.splitlines() if line.split()[:3] == [model, mode, impl])
        assert f"{row['vs_hf_sdpa']:.2f}x" in line and str(row["launches"]) in line
        if impl == "hf_sdpa":
            assert row["launches_triton"] == 0 and row["vs_hf_sdpa"] == 1.0
        else:
            assert row["launches_triton"] >= 12 * 2  # attention and a LayerNorm a layer


def test_shape_only_gelu_stubs_aten_gelu_for_both_paths_and_restores_it():
    """Inside the block aten's GELU and its backward (reached by transformers' module, its autograd
    node and our layers' direct calls alike) return results of the right shape without computing
    them; after it, GELU computes again."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(3, 5, requires_grad=True)
    with host_overhead.shape_only_gelu():
        y = F.gelu(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.ops.aten.gelu_backward.default(y, x, approximate="none").shape == x.shape
    torch.testing.assert_close(F.gelu(torch.ones(2)), torch.full((2,), 0.841345), rtol=1e-5, atol=1e-6)
