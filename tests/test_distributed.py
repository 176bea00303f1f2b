"""optimize()d models under torch.distributed on the CPU (gloo, 2 processes): DDP and FSDP2
(``fully_shard``) give the same synchronised gradients, loss and next-step loss as the plain
transformers model under the same engine, the fused model on the Triton kernels (forced, through
the interpreter). The per-rank body is tests/_distributed_worker.py."""

from __future__ import annotations

import _distributed_worker
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
CLASSES = ["Data2VecAudioForCTC", "Data2VecVisionForImageClassification", "Data2VecTextForSequenceClassification"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_fused_gradients_match_under_engine(engine, tmp_path):
    if engine == "fsdp2" and not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("FSDP2 (fully_shard) needs torch >= 2.6")
    mp.spawn(
        _distributed_worker.run,
        args=(WORLD_SIZE, str(tmp_path / "init"), engine, CLASSES),
        nprocs=WORLD_SIZE,
        join=True,
    )
