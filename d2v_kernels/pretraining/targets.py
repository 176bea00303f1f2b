"""Teacher targets: the top-K layers' FFN outputs, each normalised and added into one fp32
accumulator by ``ops.accumulate_target`` as the teacher runs, so the K outputs are never held
together; then the average normalised again if the config asks.

The outputs are read by forward hooks on the top-K layers' feed-forward modules (``Modality.ffn``),
registered for one teacher call and removed after it. On d2v_kernels' fused layers a hooked
layer runs its module-by-module forward, which calls the same fused ops (attention, residual add +
LayerNorm) as the single-function "lean" forward (``models/_lean.py``) that unhooked layers take;
only the host-side savings of the lean path are given up on those K layers.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from d2v_kernels import ops
from d2v_kernels.pretraining.modalities import Modality


@contextlib.contextmanager
def evaluating(modules: tuple[nn.Module, ...]):
    """``modules`` (and their submodules) in eval mode inside the block, their own modes after it:
    the teacher runs the front end it shares with a training student without dropout."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for m, _ in saved:
        m.training = False
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def teacher_targets(
    teacher: nn.Module,
    modality: Modality,
    inputs: dict,
    *,
    top_k: int,
    layer_norm: str,
    target_norm: str,
    valid: torch.Tensor | None,
    shared: tuple[nn.Module, ...] = (),
    eps: float = 1e-5,
) -> torch.Tensor:
    """(B, L, C) float32 targets of ``teacher(**inputs)``, L the positions with a target.

    ``layer_norm`` / ``target_norm``: ``accumulate_target`` norms ("instance", "layer", "none") of
    each layer and of the average; ``valid``: (B, L) bool, True = a real position (padding adds
    nothing and is left out of instance-norm statistics), or None.
    """
    acc: list[torch.Tensor] = []
    prefix = modality.prefix_tokens
    scale = 1.0 / top_k

    def add(layer, module, args, output):
        target = modality.target_of(layer, output)[:, prefix:]
        if not acc:
            acc.append(torch.zeros(target.shape, dtype=torch.float32, device=target.device))
        ops.accumulate_target(acc[0], target, norm=layer_norm, scale=scale, padding_mask=valid, eps=eps)

    layers = modality.layers(teacher)[-top_k:]
    handles = [modality.ffn(layer).register_forward_hook(_bind(add, layer)) for layer in layers]
    try:
        with torch.no_grad(), evaluating(shared):
            teacher(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    targets = acc[0]
    if target_norm != "none":
        with torch.no_grad():
            targets = ops.accumulate_target(
                torch.zeros_like(targets), targets, norm=target_norm, scale=1.0, padding_mask=valid, eps=eps
            )
    return targets


def _bind(hook, layer):
    return lambda module, args, output: hook(layer, module, args, output)
