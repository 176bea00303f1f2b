"""Triton kernels and their launchers, one file per op. No torch.nn and no dispatch here.

Each configuration a launcher can pick is listed, as :class:`d2v_kernels.kernels.aot.AotVariant`,
in :mod:`d2v_kernels.kernels.aot_variants`, so CI compiles all of them for sm_80 and sm_90 without
a GPU (``python -m d2v_kernels.kernels.aot``).
"""
