"""Fused GPU kernels for the Data2Vec model family (audio, vision, text)."""

from d2v_kernels import ops
from d2v_kernels.dispatch import BackendUnavailableError, record_dispatch, use_backend

__version__ = "0.1.0"


def optimize(model):
    """Swap the fused modules into a Data2Vec model instance in place and return it."""
    from d2v_kernels.models.optimize import optimize as _optimize

    return _optimize(model)


__all__ = ["BackendUnavailableError", "ops", "optimize", "record_dispatch", "use_backend", "__version__"]
