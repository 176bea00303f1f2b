"""The layer nodes' dropout seeds (d2v_kernels/ops/dropout_seeds.py): one draw a training forward of
an encoder, a row of its own for each layer, repeated by torch.manual_seed; a layer run again for its
backward (checkpointing) draws its own seeds, the same in both runs."""

from __future__ import annotations

import contextlib

import pytest
import torch

import d2v_kernels
from d2v_kernels.models import _common
from d2v_kernels.ops import dropout_seeds
from d2v_kernels.testing import build_pair, graph_nodes, inputs_for

CASES = [
    ("Data2VecTextModel", {"hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.2}, 0),
    (
        "Data2VecAudioModel",
        {"hidden_dropout": 0.3, "attention_dropout": 0.2, "activation_dropout": 0.25, "layerdrop": 0.0},
        0,
    ),
    ("Data2VecVisionModel", {"attention_probs_dropout_prob": 0.2}, 9),
]
NODES = ("PostLnLayerFunctionBackward", "PreLnLayerFunctionBackward")


def _layer_nodes(output: torch.Tensor) -> list:
    return [node for node in graph_nodes(output) if type(node).__name__ in NODES]


class _CountedRandint:
    def __init__(self, randint):
        self.randint, self.calls = randint, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.randint(*args, **kwargs)


def _backward_grads(model, loss) -> list:
    """The parameters' gradients of ``loss`` by ``.backward()`` (reentrant checkpointing does not
    take ``torch.autograd.grad``)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _forward(fused, inputs, monkeypatch) -> tuple[torch.Tensor, int]:
    counted = _CountedRandint(torch.randint)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "randint", counted)
        out = fused(**inputs).last_hidden_state
    return out, counted.calls


@pytest.mark.parametrize(("class_name", "overrides", "seed_at"), CASES, ids=[c[0] for c in CASES])
def test_one_draw_a_forward_and_a_row_a_layer(class_name, overrides, seed_at, monkeypatch):
    _, fused, config = build_pair(class_name, **overrides)
    assert config.num_hidden_layers >= 2
    fused.train()
    inputs = inputs_for(class_name, config, labels=False)
    with d2v_kernels.use_backend("triton"):
        torch.manual_seed(3)
        out, draws = _forward(fused, inputs, monkeypatch)
        nodes = _layer_nodes(out)
        assert len(nodes) == config.num_hidden_layers
        assert draws == 1  # one launch a forward, not one a layer
        seeds = [tuple(node.made[seed_at].tolist()) for node in nodes]
        assert len(set(seeds)) == len(seeds), seeds  # each layer a row of its own
        if class_name != "Data2VecTextModel":  # the rest is modality-blind (interpreter time)
            return
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((out * weight).sum(), list(fused.parameters()), allow_unused=True)

        torch.manual_seed(3)  # repeated by the generator's state
        again, _ = _forward(fused, inputs, monkeypatch)
        assert torch.equal(again, out)
        assert [tuple(node.made[seed_at].tolist()) for node in _layer_nodes(again)] == seeds
        regrads = torch.autograd.grad((again * weight).sum(), list(fused.parameters()), allow_unused=True)
        for got, want in zip(regrads, grads):
            assert (got is None and want is None) or torch.equal(got, want)

        fresh, _ = _forward(fused, inputs, monkeypatch)  # the next forward draws a new block
        assert not set(tuple(node.made[seed_at].tolist()) for node in _layer_nodes(fresh)) & set(seeds)


def test_a_layer_called_by_itself_draws_its_own_seeds(monkeypatch):
    """A layer called by itself (no encoder forward around it) draws its own seeds."""
    class_name, overrides, _ = CASES[0]
    _, fused, config = build_pair(class_name, **overrides)
    fused.train()
    layer = fused.encoder.layer[0]
    x = torch.randn(2, 5, config.hidden_size, requires_grad=True)
    with d2v_kernels.use_backend("triton"):
        counted = _CountedRandint(torch.randint)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "randint", counted)
            out = layer(x)
            out = out[0] if isinstance(out, tuple) else out
        assert counted.calls == 1
        assert tuple(_layer_nodes(out)[0].made[0]._base.shape) == (3, 2)  # attention + two hidden dropouts
    assert dropout_seeds._forward.layers == 0


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpointed_layers_draw_their_own_seeds_the_same_in_both_runs(reentrant, monkeypatch):
    """Under gradient checkpointing each layer's forward is run again for its backward, the
    generator's state restored: it draws its seeds itself (a row of the forward's block could not
    be found again by the rerun), so the rerun's masks are the first run's: output and gradients
    equal those of the same model unchecked with each layer drawing its own seeds."""
    class_name, overrides, _ = CASES[0]
    _, fused, config = build_pair(class_name, **overrides)
    fused.train()
    inputs = inputs_for(class_name, config, labels=False)
    with d2v_kernels.use_backend("triton"):
        if hasattr(fused, "activation_checkpointing_enable"):  # transformers >= 5.2x
            fused.activation_checkpointing_enable({"use_reentrant": reentrant})
        else:
            fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        torch.manual_seed(5)
        out, draws = _forward(fused, inputs, monkeypatch)
        assert draws == config.num_hidden_layers
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = _backward_grads(fused, (out * weight).sum())
        getattr(fused, "activation_checkpointing_disable", fused.gradient_checkpointing_disable)()
        monkeypatch.setattr(_common, "one_draw_per_forward", lambda layers: contextlib.nullcontext())
        torch.manual_seed(5)
        plain = fused(**inputs).last_hidden_state
        expected = _backward_grads(fused, (plain * weight).sum())
    assert torch.equal(plain, out)
    for got, want in zip(grads, expected):
        assert (got is None and want is None) or torch.allclose(got, want, atol=1e-5, rtol=1e-5)
