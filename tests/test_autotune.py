"""Tiles by measurement (d2v_kernels.kernels.autotune): the lookup order, the shape buckets, the disk
cache of tuned configurations (a fake timer stands in for do_bench on the CPU), and autotuning run
through the attention launchers on the interpreter, where every candidate's output and gradients
are checked against float64."""

import json

import pytest
import torch
from test_attention import _grads, check_gradients, make_qkv, padding_mask, reference64, relative_bias, run_triton

from d2v_kernels import ops
from d2v_kernels.kernels import _tiles, autotune
from d2v_kernels.kernels._attention_common import tuning_bucket
from d2v_kernels.kernels.attention import fwd_config
from d2v_kernels.testing import assert_close_to_reference

H100 = "NVIDIA H100 80GB HBM3"
FWD_SPACE, BWD_SPACE = autotune.SPACES["attention_fwd"], autotune.SPACES["attention_bwd"]
CUDA = torch.device("cuda")


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Autotuning on, as if on an H100, with its cache under tmp_path; forgotten afterwards."""
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(autotune, "tuning_gpu", lambda device: H100)
    autotune.forget_tuned()
    yield tmp_path
    autotune.forget_tuned()


def never_timed(fn):
    raise AssertionError("a configuration was timed")


def test_buckets_and_gpu_families():
    assert [autotune.sequence_bucket(n) for n in (1, 64, 65, 197, 512, 513, 10**6)] == [
        64, 64, 128, 256, 512, 1024, 16384,
    ]  # fmt: skip
    features = {"table": False, "mask": True, "dropout": True}
    assert tuning_bucket(torch.bfloat16, 64, 499, 499, features) == "bf16 d64 n512 mask+dropout"
    assert tuning_bucket(torch.float16, 128, 50, 197, {"table": False}) == "fp16 d128 n256 plain"
    names = {H100: "H100", "NVIDIA A100-SXM4-80GB": "A100", "NVIDIA L40S": "L40S", "Tesla V100-SXM2-16GB": "V100"}
    assert {name: autotune.gpu_family(name) for name in names} == names


def test_lookup_order_override_then_table_then_default(monkeypatch):
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)
    gpu = {"name": H100}
    monkeypatch.setattr(autotune, "tuning_gpu", lambda device: gpu["name"])
    default, h100_row, any_row = FWD_SPACE[0], FWD_SPACE[3], FWD_SPACE[1]
    table = {
        ("H100", "attention_fwd", "fp16 d64 n256 table"): h100_row,
        ("any", "attention_fwd", "fp16 d64 n256 table"): any_row,
    }
    monkeypatch.setattr(autotune, "TABLE", table)

    def choose(bucket="fp16 d64 n256 table"):
        return autotune.launch_config(
            "attention_fwd", default, bucket=bucket, device=CUDA, candidates=FWD_SPACE, measure=never_timed
        )

    with autotune.record_choices() as seen:
        assert choose() == h100_row
        assert choose("fp16 d64 n512 table") == default  # no row for this bucket
        with _tiles.override("attention_fwd", BLOCK_M=16):
            assert choose() == {**h100_row, "BLOCK_M": 16}
        gpu["name"] = "NVIDIA A100-SXM4-80GB"
        assert choose() == any_row
    assert [s["source"] for s in seen] == ["table", "default", "override", "table"]
    assert seen[0]["bucket"] == "fp16 d64 n256 table"


def test_autotune_is_off_by_default_and_never_on_under_the_interpreter(monkeypatch):
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)
    assert not autotune.autotune_enabled()
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    assert autotune.autotune_enabled()
    monkeypatch.setattr(autotune, "TABLE", {("any", "attention_fwd", "fp16 d64 n64 plain"): FWD_SPACE[3]})
    assert autotune.tuning_gpu(CUDA) is None  # conftest runs the interpreter
    default = FWD_SPACE[0]
    config = autotune.launch_config(
        "attention_fwd", default, bucket="fp16 d64 n64 plain", device=CUDA, candidates=FWD_SPACE, measure=never_timed
    )
    assert config == default
    q, k, v = make_qkv(1, 9, 9, 16, torch.float16, heads=2)
    _tiles.clear_launches()  # no launch of this layout left by an earlier test
    with autotune.record_choices() as seen:
        run_triton(q, k, v)
    assert seen == [
        {
            "kernel": "attention_fwd",
            "bucket": "fp16 d16 n64 plain",
            "config": fwd_config(torch.float16, 16),
            "source": "interpreter",
        }
    ]


def test_tuned_configuration_is_persisted_and_read_back(tuning):
    timed = []

    def timer(fn):
        timed.append(fn())
        return {"a": 2.0, "b": 1.0}[timed[-1]]  # "c" raises: passed over

    def measure(config):
        if config["BLOCK_M"] == 32:
            raise RuntimeError("out of resources")
        return lambda: "a" if config["BLOCK_M"] == 64 else "b"

    candidates = (BWD_SPACE[0], {**BWD_SPACE[0], "BLOCK_M": 128}, BWD_SPACE[2])
    chosen = autotune.tuned_config("attention_bwd", "bf16 d64 n512 mask", candidates, measure, gpu=H100, timer=timer)
    assert chosen == candidates[1] and timed == ["a", "b"]
    data = json.loads(autotune.cache_path(H100).read_text())
    entry = data["entries"]["attention_bwd|bf16 d64 n512 mask"]
    assert data["gpu"] == H100 and entry["config"] == candidates[1]
    assert entry["ms"] == {autotune.config_label(c): ms for c, ms in zip(candidates, (2.0, 1.0, None))}
    autotune.forget_tuned()  # as a new process: read from the file, nothing timed
    assert (
        autotune.tuned_config("attention_bwd", "bf16 d64 n512 mask", candidates, measure, gpu=H100, timer=never_timed)
        == candidates[1]
    )
    # A cached winner that is no longer a candidate is tuned again.
    autotune.forget_tuned()
    again = autotune.tuned_config(
        "attention_bwd", "bf16 d64 n512 mask", candidates[::2], measure, gpu=H100, timer=timer
    )
    assert again == candidates[0]


FOREIGN = {
    "format": 1,
    "gpu": H100,
    "triton": "0",
    "entries": {"attention_fwd|fp16 d64 n256 table": {"config": FWD_SPACE[1]}},
}


@pytest.mark.parametrize("content", ["{not json", json.dumps(FOREIGN), "[]"], ids=["corrupt", "other-triton", "list"])
def test_corrupt_or_foreign_cache_file_is_ignored_and_replaced(tuning, content):
    path = autotune.cache_path(H100)
    path.write_text(content)
    chosen = autotune.tuned_config("attention_fwd", "fp16 d64 n256 table", FWD_SPACE[:2], lambda c: lambda: c, gpu=H100,
                                   timer=lambda fn: fn()["num_warps"])  # fmt: skip
    assert chosen == FWD_SPACE[0]
    assert json.loads(path.read_text())["entries"]["attention_fwd|fp16 d64 n256 table"]["config"] == FWD_SPACE[0]
    assert [p.name for p in tuning.iterdir()] == [path.name]  # no temporary file left


def test_autotuning_through_the_launchers_checks_and_picks_among_every_candidate(tuning, monkeypatch):
    """Forward and backward of a table + mask input: each candidate of each space runs on the real
    inputs (checked against float64 here), the fastest is launched and cached, and a new layout of
    the same bucket reads it back untimed."""
    q, k, v = make_qkv(2, 37, 37, 16, torch.float16, heads=2)
    table, index = relative_bias(37, 37, torch.float16, heads=2)
    kwargs = dict(bias_table=table, bias_index=index, key_padding_mask=padding_mask(2, 37, [30, 37]))
    ms = iter([3.0, 2.0, 4.0, 1.0, 2.0, 3.0, 1.0, 4.0])  # forward: the 4th candidate wins; backward: the 3rd
    results = []

    def timer(fn):
        results.append(fn())
        return next(ms)

    monkeypatch.setattr(autotune, "time_ms", timer)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    with autotune.record_choices() as seen:
        out, grads = _grads(run_triton, q, k, v, kwargs, grad_out, ("bias_table",))
    assert [(s["kernel"], s["source"], s["config"]) for s in seen] == [
        ("attention_fwd", "autotune", FWD_SPACE[3]),
        ("attention_bwd", "autotune", BWD_SPACE[2]),
    ]
    kw64 = {**kwargs, "bias_table": table.double()}
    _, grads64 = _grads(ops.attention_reference, q.double(), k.double(), v.double(), kw64, grad_out, ("bias_table",))
    _, eager = _grads(ops.attention_reference, q, k, v, kwargs, grad_out, ("bias_table",))
    ref64, ref_eager = reference64(q, k, v, **kwargs), ops.attention_reference(q, k, v, **kwargs)
    for config, (candidate_out, _lse) in zip(FWD_SPACE, results[:4]):
        assert_close_to_reference(candidate_out, ref64, ref_eager, name=f"out {autotune.config_label(config)}")
    for config, (dq, dk, dv, dtable, _) in zip(BWD_SPACE, results[4:]):
        assert_close_to_reference([dq, dk, dv, dtable], grads64, eager, name=f"grads {autotune.config_label(config)}")
    assert_close_to_reference(out.detach(), ref64, ref_eager)
    assert_close_to_reference(grads, grads64, eager, name="grads")
    entries = json.loads(autotune.cache_path(H100).read_text())["entries"]
    assert sorted(entries) == ["attention_bwd|fp16 d16 n64 table+mask", "attention_fwd|fp16 d16 n64 table+mask"]

    autotune.forget_tuned()  # as a new process, on a new layout of the same bucket: read back, untimed
    monkeypatch.setattr(autotune, "time_ms", never_timed)
    with autotune.record_choices() as seen, torch.no_grad():
        run_triton(q[:1], k[:1], v[:1], **{**kwargs, "key_padding_mask": kwargs["key_padding_mask"][:1]})
    assert [(s["source"], s["config"]) for s in seen] == [("autotune", FWD_SPACE[3])]


def test_space_table_and_defaults_agree():
    """Every half-precision default is a candidate (so the space holds every configuration a launch
    can pick), and every committed table row is a candidate of its kernel."""
    for block_d in (16, 32, 64, 128):
        for bias_tile in (False, True):
            for dropout in (False, True):
                assert fwd_config(torch.float16, block_d, bias_tile, dropout) in FWD_SPACE
    from d2v_kernels.kernels._attention_backward import bwd_config

    assert all(bwd_config(torch.bfloat16, d) in BWD_SPACE for d in (16, 32, 64, 128))
    for (family, kernel, bucket), config in autotune.TABLE.items():
        assert config in autotune.SPACES[kernel], (family, kernel, bucket)


def test_tune_rows_name_their_bucket_and_print_table_rows(tmp_path, capsys):
    """bench.tune records each row's bucket and resolved tiles; --table prints the fastest candidate
    of the space per bucket, summed over the bucket's cases, as a TABLE row."""
    from bench import tune

    rows = tune.tune_case("attention_fwd", "tiny_padding", "bf16", [FWD_SPACE[3]], device="cpu", timed=False)
    assert [(r["bucket"], r["resolved"]) for r in rows] == [
        ("bf16 d16 n64 mask", fwd_config(torch.bfloat16, 16)),
        ("bf16 d16 n64 mask", FWD_SPACE[3]),
    ]
    outside = {**FWD_SPACE[3], "BLOCK_N": 16}
    other_case = [dict(r, case="other") for r in rows]
    extra = [dict(r, resolved=outside, config="outside") for r in (rows[1], other_case[1])]
    for row, ms in zip([*rows, *other_case, *extra], (2.0, 1.5, 2.0, 1.0, 0.5, 0.5)):
        row["ms"] = ms
    result = {"environment": {"gpu": H100}, "rows": [*rows, *other_case, *extra]}
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(result))
    capsys.readouterr()
    assert tune.main(["--table", str(path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("# from")]
    assert len(lines) == 2
    assert lines[0].startswith(
        f"    ('H100', 'attention_fwd', 'bf16 d16 n64 mask'): {json.dumps(FWD_SPACE[3])},  # 2.5000 ms"
    )
    assert "default 4.0000 ms" in lines[0]
    assert lines[1] == f"    # outside the space, faster: {json.dumps(outside)} 1.0000 ms"


@pytest.mark.cuda
def test_autotune_on_the_gpu_times_the_spaces_and_caches_them(monkeypatch, tmp_path):
    """On a GPU (TRITON_INTERPRET=0 pytest -m cuda): with autotuning on, the first forward and
    backward of a vision-like input time every candidate (each compiles and runs here), the results
    match float64, and the cache holds both kernels' timings."""
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    autotune.forget_tuned()
    try:
        with torch.device("cuda"):
            q, k, v = make_qkv(2, 197, 197, 64, torch.float16, heads=4)
            table, index = relative_bias(197, 197, torch.float16, heads=4)
            kwargs = dict(bias_table=table, bias_index=index)
            with autotune.record_choices() as seen:
                check_gradients(q, k, v, kwargs, params=("bias_table",))
    finally:
        autotune.forget_tuned()
    assert {(s["kernel"], s["source"]) for s in seen} == {("attention_fwd", "autotune"), ("attention_bwd", "autotune")}
    gpu = torch.cuda.get_device_name()
    entries = json.loads(autotune.cache_path(gpu).read_text())["entries"]
    for kernel, space in (("attention_fwd", FWD_SPACE), ("attention_bwd", BWD_SPACE)):
        entry = entries[f"{kernel}|fp16 d64 n256 table"]
        assert entry["config"] in space and len(entry["ms"]) == len(space), entry
        assert entry["ms"][autotune.config_label(entry["config"])] == min(ms for ms in entry["ms"].values() if ms)
