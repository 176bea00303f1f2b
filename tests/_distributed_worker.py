"""The body of one process of tests/test_distributed.py (spawned with torch.multiprocessing).

Each rank builds the same transformers model and its optimize()d copy (same seed), wraps both with
the same engine (DDP, or FSDP2 ``fully_shard`` per encoder layer and at the root), runs a forward
and backward on its own slice of data, checks that the synchronised gradients of the fused model
equal the plain model's, takes one optimizer step and checks the next loss agrees too. The fused
model runs with the Triton backend forced (the interpreter on the CPU: TRITON_INTERPRET=1 comes
from the parent's environment), and each rank checks that every op dispatched to Triton.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from conftest import small_inputs, small_pair
from transformers.models.data2vec import modeling_data2vec_audio, modeling_data2vec_text, modeling_data2vec_vision

import d2v_kernels

LAYER_CLASSES = (
    modeling_data2vec_audio.Data2VecAudioEncoderLayer,
    modeling_data2vec_vision.Data2VecVisionLayer,
    modeling_data2vec_text.Data2VecTextLayer,
)


def _wrap(model: torch.nn.Module, engine: str) -> torch.nn.Module:
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in list(model.modules()):
        if isinstance(module, LAYER_CLASSES):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    from torch.distributed.tensor import DTensor

    assert all(isinstance(p, DTensor) for p in model.parameters()), "fully_shard left a parameter unsharded"
    return model


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient as a full local tensor (FSDP2 keeps sharded DTensors)."""
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grad = p.grad
            grads[name.removeprefix("module.")] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return grads


def _check_class(class_name: str, engine: str, rank: int) -> None:
    reference, fused, config = small_pair(class_name)
    reference.train()
    fused.train()
    reference, fused = _wrap(reference, engine), _wrap(fused, engine)
    batches = [small_inputs(class_name, config, batch=2, seed=10 * step + rank) for step in range(2)]

    losses, calls = {}, {}
    for name, model in (("reference", reference), ("fused", fused)):
        with d2v_kernels.use_backend("triton"), d2v_kernels.record_dispatch() as calls[name]:
            loss = model(**batches[0]).loss
            loss.backward()
        losses[name] = loss.detach()
    assert not calls["reference"] and calls["fused"][("attention", "triton")] > 0, calls
    assert all(backend == "triton" for _, backend in calls["fused"]), calls
    torch.testing.assert_close(losses["fused"], losses["reference"], atol=2e-5, rtol=1e-5)

    ref_grads, grads = _full_grads(reference), _full_grads(fused)
    assert ref_grads.keys() == grads.keys() and grads, f"{class_name}: gradient names differ"
    for name, ref_grad in ref_grads.items():
        torch.testing.assert_close(
            grads[name], ref_grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{class_name} {engine} {n}: {m}"
        )

    # The engine really synchronised: every rank holds the same gradients although its data (and loss) differ.
    flat = torch.cat([g.flatten() for g in grads.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for other in gathered[1:]:
        torch.testing.assert_close(other, gathered[0], atol=0, rtol=0)
    rank_losses = [torch.empty_like(losses["fused"]) for _ in range(dist.get_world_size())]
    dist.all_gather(rank_losses, losses["fused"])
    assert len({loss.item() for loss in rank_losses}) == len(rank_losses), "the ranks saw the same data"

    next_losses = {}
    for name, model in (("reference", reference), ("fused", fused)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer.step()
        optimizer.zero_grad()
        with d2v_kernels.use_backend("triton"):
            next_losses[name] = model(**batches[1]).loss.detach()
    torch.testing.assert_close(next_losses["fused"], next_losses["reference"], atol=1e-4, rtol=1e-4)


def run(rank: int, world_size: int, init_file: str, engine: str, class_names: list[str]) -> None:
    """Entry point for ``torch.multiprocessing.spawn``; raises on any mismatch."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "the Triton kernels run through the interpreter here"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for class_name in class_names:
            torch.manual_seed(0)
            _check_class(class_name, engine, rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
