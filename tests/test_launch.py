"""The direct launch path's grid fitting and the occupancy rule it uses (no GPU needed: the
compiled kernel and the device are stand-ins)."""

from types import SimpleNamespace

import pytest

from d2v_kernels.kernels import _launch, _row_norm
from d2v_kernels.kernels._launch import DirectLaunch, programs_per_sm

# An H100's SM: 64K registers, 2048 threads, 228 KB of shared memory.
H100 = (65536, 2048, 233472)


@pytest.mark.parametrize(
    "n_regs, shared, num_warps, expected",
    [
        (128, 128, 8, 2),  # the row-norm backward's budget: two programs of 8 warps
        (147, 64, 8, 1),  # vision's x_scale backward: 152 after rounding, one program fits
        (80, 128, 8, 3),
        (255, 0, 4, 2),  # 256 x 32 x 4 = 32K registers a program
        (168, 45056, 4, 3),  # registers bound before shared memory (4 x 46 KB fit)
        (64, 102400, 4, 2),  # shared memory bound: 100 KB + the driver's 1 KB a program
        (32, 0, 4, 16),  # threads bound: 2048 / 128
        (16, 0, 1, 32),  # the hardware's 32 programs an SM
    ],
)
def test_programs_per_sm_follows_cuda_occupancy(n_regs, shared, num_warps, expected):
    assert programs_per_sm(n_regs, shared, num_warps, *H100) == expected


class _FakeKernel:
    """Records run() calls as a JITFunction would receive them; returns a compiled stand-in with
    no direct-launch handles, so every call takes the full path."""

    def __init__(self, n_regs):
        self.calls = []
        self.compiled = SimpleNamespace(n_regs=n_regs, metadata=SimpleNamespace(shared=64))

    def run(self, *args, grid, warmup, **options):
        self.calls.append((args, grid, warmup, options))
        return self.compiled


def test_fit_sets_the_grid_once_before_the_first_launch():
    fn = _FakeKernel(n_regs=147)
    seen = []

    def fit(compiled):
        seen.append(compiled)
        return (7,)

    launch = DirectLaunch(fn, (264,), fit=fit, num_warps=8)
    launch(1, 2)
    launch(1, 2)
    assert seen == [fn.compiled]
    assert fn.calls == [
        ((1, 2), (264,), True, {"num_warps": 8}),  # compiled, not launched
        ((1, 2), (7,), False, {"num_warps": 8}),
        ((1, 2), (7,), False, {"num_warps": 8}),
    ]
    assert launch.grid == (7,)


def test_without_fit_the_grid_is_the_given_one():
    fn = _FakeKernel(n_regs=147)
    DirectLaunch(fn, (5, 3), num_warps=4)(9)
    assert fn.calls == [((9,), (5, 3), False, {"num_warps": 4})]


@pytest.mark.parametrize("n_regs, expected", [(147, 132), (120, 264), (None, 264)])
def test_row_norm_backward_programs_fit_the_sms(monkeypatch, n_regs, expected):
    """Vision's x_scale backward needs more than 128 registers: the persistent grid keeps one
    program an SM, all resident (a second one would start its whole loop late); a variant within
    the budget keeps two; a kernel whose registers are unknown keeps the planned grid."""
    monkeypatch.setattr(_launch, "_sm_resources", lambda device: (*H100, 32))
    monkeypatch.setattr(_row_norm, "_multiprocessors", lambda device: 132)
    compiled = SimpleNamespace(n_regs=n_regs, metadata=SimpleNamespace(shared=64))
    assert _row_norm.fit_backward_programs(compiled, 8, "cuda", 264) == expected
    assert _row_norm.fit_backward_programs(compiled, 8, "cuda", 40) == min(40, expected)
