"""The Philox seeds of the layer nodes' dropouts: one draw per encoder forward, not one per layer.

A layer node (``post_ln_layer_op``, ``pre_ln_layer_op``) in training draws the seeds of its
attention, hidden and activation dropouts (at most four (2,) int64 Philox seeds; their masks are
drawn again from them in the backward). Drawn per layer, that is one ``randint`` launch a layer.
Inside :func:`one_draw_per_forward` (an encoder's training forward) the first layer node that needs
seeds draws a block for every layer of the encoder, and each layer node takes the next row: one
launch a forward. ``torch.manual_seed`` still repeats a run.

A node whose forward is run again for its backward takes seeds of its own, drawn as before, so that
the rerun draws the same ones (checkpointing restores the generator's state before the rerun, not
the block's position): a node run without recording (reentrant checkpointing's first forward, under
no_grad), a forward inside a backward (its rerun), and one under saved-tensor hooks (non-reentrant
checkpointing, offloading).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch

from d2v_kernels.ops._eager import saved_tensors_hooks_active

__all__ = ["MAX_SEEDS_PER_LAYER", "draw_seeds", "layer_seeds", "one_draw_per_forward"]

# The attention's dropout, the two hidden dropouts (fused into the add + LayerNorms) and the
# activation dropout (fused with the GELU).
MAX_SEEDS_PER_LAYER = 4
_HIGH = 2**31 - 1

# -1 outside a backward; where this torch cannot tell, every node draws its own seeds.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


class _Forward(threading.local):
    """The current encoder forward of this thread: its layer count (0: none), its block of seeds
    as (2,) views, :data:`MAX_SEEDS_PER_LAYER` a layer (made once: a view costs a microsecond or
    two on the host), and how many of them were taken."""

    layers = 0
    block: tuple[torch.Tensor, ...] = ()
    taken = 0


_forward = _Forward()


def draw_seeds(device: torch.device, *count: int) -> torch.Tensor:
    """Dropout seeds: (*count, 2) int64 Philox keys (a (2,) one without ``count``) from torch's
    generator of ``device``, so ``torch.manual_seed`` repeats a run."""
    return torch.randint(0, _HIGH, (*count, 2), device=device, dtype=torch.int64)


@contextlib.contextmanager
def one_draw_per_forward(layers: int) -> Iterator[None]:
    """Within it, layer nodes take their seeds from one block drawn for ``layers`` layers (a new
    block when they take more rows than that, or run on another device). Nests: an inner forward
    (another encoder) has its own block, the outer one's is kept."""
    state = _forward
    outer = state.layers, state.block, state.taken
    state.layers, state.block, state.taken = max(1, int(layers)), (), 0
    try:
        yield
    finally:
        state.layers, state.block, state.taken = outer


def layer_seeds(count: int, device: torch.device, recorded: bool) -> Sequence[torch.Tensor]:
    """``count`` (at most :data:`MAX_SEEDS_PER_LAYER`) or more (2,) int64 seeds for one layer node's
    forward on ``device``: the next row of the forward's block inside :func:`one_draw_per_forward`
    for a node ``recorded`` by autograd now that no backward reruns (see the module docstring);
    else a draw of its own."""
    state = _forward
    if (
        state.layers
        and recorded
        and _graph_task_id is not None
        and _graph_task_id() == -1
        and not saved_tensors_hooks_active()
    ):
        block, taken = state.block, state.taken
        if taken == len(block) or block[0].device != device:
            block = state.block = draw_seeds(device, state.layers * MAX_SEEDS_PER_LAYER).unbind(0)
            taken = 0
        state.taken = taken + MAX_SEEDS_PER_LAYER
        return block[taken : taken + MAX_SEEDS_PER_LAYER]
    return draw_seeds(device, count).unbind(0)
