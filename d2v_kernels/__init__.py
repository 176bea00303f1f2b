"""Fused GPU kernels for the Data2Vec model family (audio, vision, text).

``ops`` and ``models`` load on first use, so a tool can choose the Triton interpreter
(``TRITON_INTERPRET=1``) before anything imports triton.
"""

import importlib

from d2v_kernels.dispatch import BackendUnavailableError, record_dispatch, use_backend

__version__ = "0.1.0"


def optimize(model, *, attn_implementation=None):
    """Swap the fused modules into a Data2Vec model instance in place and return it.

    Same weights and state-dict keys; audio and text attention switch to the ``d2v_kernels``
    attention implementation unless another was asked for. See :mod:`d2v_kernels.models.optimize`.
    """
    from d2v_kernels.models.optimize import optimize as _optimize

    return _optimize(model, attn_implementation=attn_implementation)


def __getattr__(name):
    if name in ("ops", "models", "testing"):
        return importlib.import_module(f"d2v_kernels.{name}")
    raise AttributeError(f"module 'd2v_kernels' has no attribute {name!r}")


__all__ = ["BackendUnavailableError", "ops", "optimize", "record_dispatch", "use_backend", "__version__"]
