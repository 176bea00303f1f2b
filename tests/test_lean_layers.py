"""The lean encoder layers (d2v_kernels/models/_lean.py): the whole layer as one function where
nothing could tell it from transformers' module calls, transformers' structure otherwise; both
equal transformers' model (outputs and gradients, fp32)."""

from __future__ import annotations

import pytest
import torch

import d2v_kernels
from d2v_kernels.models import audio, text, vision
from d2v_kernels.testing import build_pair, inputs_for

ATOL = 2e-5
MODELS = {
    "Data2VecAudioModel": (audio.FusedData2VecAudioEncoderLayer, "feed_forward.intermediate_dense", "layer_norm"),
    "Data2VecVisionModel": (vision.FusedData2VecVisionLayer, "intermediate.dense", "layernorm_after"),
    "Data2VecTextModel": (text.FusedData2VecTextLayer, "intermediate.dense", "output.LayerNorm"),
}


@pytest.fixture
def lean_calls(monkeypatch):
    """Counts each fused layer class's lean forwards."""
    counts = {}
    for layer_cls, _, _ in MODELS.values():
        original = layer_cls._lean_forward

        def counting(self, *args, _original=original, _cls=layer_cls):
            counts[_cls] = counts.get(_cls, 0) + 1
            return _original(self, *args)

        monkeypatch.setattr(layer_cls, "_lean_forward", counting)
    return counts


def _layers(model):
    encoder = model.encoder
    return list(encoder.layers if hasattr(encoder, "layers") else encoder.layer)


def _hook_each_layer(model, path: str) -> list:
    """A forward hook on ``path`` of every layer; returns the list each firing appends to."""
    fired = []
    for layer in _layers(model):
        layer.get_submodule(path).register_forward_hook(lambda *_: fired.append(1))
    return fired


def _loss(output) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    hidden = output.last_hidden_state
    return (hidden * torch.randn(hidden.shape, generator=gen)).sum()


def _assert_same_model(reference, fused, inputs, **call):
    ref = reference(**inputs, **call)
    out = fused(**inputs, **call)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=ATOL, rtol=1e-5)
    _loss(ref).backward()
    _loss(out).backward()
    fused_params = dict(fused.named_parameters())
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == {n for n, p in fused_params.items() if p.grad is not None}
    for name, grad in grads.items():
        atol = max(1e-4, 1e-5 * grad.abs().max().item())
        torch.testing.assert_close(fused_params[name].grad, grad, atol=atol, rtol=1e-4, msg=name)
    return ref, out


@pytest.mark.parametrize("path", ["lean", "hooked"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("class_name", list(MODELS))
def test_layers_equal_transformers_on_both_paths(class_name, mode, path, lean_calls):
    """Lean, and with a forward hook on a submodule (transformers' structure; the hook fires once
    a layer): outputs and gradients equal transformers', train mode with dropout off included."""
    layer_cls, hooked, _ = MODELS[class_name]
    reference, fused, config = build_pair(class_name)
    getattr(reference, mode)()
    getattr(fused, mode)()
    fired = _hook_each_layer(fused, hooked) if path == "hooked" else []
    _assert_same_model(reference, fused, inputs_for(class_name, config, labels=False))
    if path == "lean":
        assert lean_calls.get(layer_cls) == config.num_hidden_layers
    else:
        assert not lean_calls
        assert len(fired) == config.num_hidden_layers


@pytest.mark.parametrize("class_name", list(MODELS))
def test_a_hooked_layer_norm_runs_transformers_forward(class_name, lean_calls):
    """The fused structure skips a LayerNorm module call (its add is fused): a hook there sends the
    layer down transformers' own forward, and the hook sees transformers' LayerNorm output."""
    layer_cls, _, norm_path = MODELS[class_name]
    reference, fused, config = build_pair(class_name)
    reference.eval()
    fused.eval()
    seen = {}
    for name, model in (("reference", reference), ("fused", fused)):
        norm = _layers(model)[0].get_submodule(norm_path)
        norm.register_forward_hook(lambda m, args, out, _name=name: seen.setdefault(_name, out))
    _assert_same_model(reference, fused, inputs_for(class_name, config, labels=False))
    assert lean_calls.get(layer_cls) == config.num_hidden_layers - 1  # the other layers stay lean
    torch.testing.assert_close(seen["fused"], seen["reference"], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("class_name", list(MODELS))
def test_global_hooks_and_replaced_submodules_take_transformers_structure(class_name, lean_calls):
    """A global module hook observes every call; a submodule replaced by a subclass (as PEFT's
    LoRA does) may compute something else: neither runs lean, and the subclass's forward runs."""
    hooked = MODELS[class_name][1]
    reference, fused, config = build_pair(class_name)
    reference.eval()
    fused.eval()
    inputs = inputs_for(class_name, config, labels=False)
    fired = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: fired.append(1))
    try:
        _assert_same_model(reference, fused, inputs)
    finally:
        handle.remove()
    assert fired and not lean_calls

    class ScaledLinear(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    for model in (reference, fused):
        for layer in _layers(model):
            parent_path, _, name = hooked.rpartition(".")
            parent, old = layer.get_submodule(parent_path), layer.get_submodule(hooked)
            new = ScaledLinear(old.in_features, old.out_features)
            new.load_state_dict(old.state_dict())
            setattr(parent, name, new)
    _assert_same_model(reference, fused, inputs)
    assert not lean_calls


@pytest.mark.parametrize("class_name", ["Data2VecAudioModel", "Data2VecTextModel"])
def test_attentions_asked_for_then_lean_again(class_name, lean_calls):
    """Attentions asked for come back as transformers' (transformers' structure: its capturing
    hooks collect them); the hooks stay installed, and a later plain call is lean again, as are
    calls that collect hidden states only."""
    layer_cls = MODELS[class_name][0]
    reference, fused, config = build_pair(class_name)
    reference.eval()
    fused.eval()
    inputs = inputs_for(class_name, config, labels=False)
    expected = reference(**inputs, output_attentions=True)
    got = fused(**inputs, output_attentions=True)
    assert not lean_calls
    assert len(got.attentions) == config.num_hidden_layers
    for a, b in zip(got.attentions, expected.attentions):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    ref, out = _assert_same_model(reference, fused, inputs, output_hidden_states=True)
    assert lean_calls[layer_cls] == config.num_hidden_layers
    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


def test_causal_lm_generates_on_transformers_structure(lean_calls):
    """A decoder with its cache is never lean; generation equals transformers'."""
    reference, fused, config = build_pair("Data2VecTextForCausalLM")
    reference.eval()
    fused.eval()
    inputs = inputs_for("Data2VecTextForCausalLM", config, labels=False)
    kwargs = dict(attention_mask=inputs["attention_mask"].flip(-1), max_new_tokens=3, do_sample=False)
    ids = inputs["input_ids"].flip(-1)
    expected = reference.generate(ids, pad_token_id=config.pad_token_id, **kwargs)
    assert torch.equal(fused.generate(ids, pad_token_id=config.pad_token_id, **kwargs), expected)
    assert not lean_calls


@pytest.mark.parametrize("class_name", list(MODELS))
def test_gradient_checkpointing_is_lean_in_forward_and_recompute(class_name, lean_calls):
    layer_cls = MODELS[class_name][0]
    reference, fused, config = build_pair(class_name)
    for model in (reference, fused):
        model.train()
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
        if enable is None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            enable({"use_reentrant": False})
    _assert_same_model(reference, fused, inputs_for(class_name, config, labels=False))
    assert lean_calls[layer_cls] == 2 * config.num_hidden_layers  # forward, then the backward's recompute


@pytest.mark.parametrize("class_name", list(MODELS))
def test_lean_layers_run_the_triton_kernels(class_name, lean_calls):
    """With the Triton backend forced (the interpreter on CPU), the lean layers' attention and
    add_layer_norm run Triton, forward and backward, and equal transformers."""
    layer_cls = MODELS[class_name][0]
    reference, fused, config = build_pair(class_name)
    reference.train()
    fused.train()
    with d2v_kernels.record_dispatch() as calls, d2v_kernels.use_backend("triton"):
        _assert_same_model(reference, fused, inputs_for(class_name, config, labels=False))
    assert lean_calls[layer_cls] == config.num_hidden_layers
    layers = config.num_hidden_layers
    per_layer = 1 if class_name == "Data2VecVisionModel" else 2  # vision's second add is not normed
    assert calls[("attention", "triton")] == layers, calls
    assert calls[("add_layer_norm", "triton")] == per_layer * layers, calls
    assert not {key for key in calls if key[0] in ("attention", "add_layer_norm") and key[1] != "triton"}, calls


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_vision_layer_scale_with_drop_path(mode, lean_calls):
    """Vision's lean layer with drop path on: in eval it passes through and the layer scales fold
    (lambda_1 into add_layer_norm's x_scale, lambda_2 into an addcmul); in training drop path draws
    its per-sample masks as transformers' layer does (same generator, same order) and nothing
    folds. Outputs and gradients equal transformers'."""
    reference, fused, config = build_pair("Data2VecVisionModel", drop_path_rate=0.3)
    getattr(reference, mode)()
    getattr(fused, mode)()
    inputs = inputs_for("Data2VecVisionModel", config, labels=False)
    torch.manual_seed(7)
    ref = reference(**inputs)
    torch.manual_seed(7)
    with d2v_kernels.record_dispatch() as calls:
        out = fused(**inputs)
    assert lean_calls[vision.FusedData2VecVisionLayer] == config.num_hidden_layers
    assert calls[("add_layer_norm", "eager")] == config.num_hidden_layers
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=ATOL, rtol=1e-5)
    _loss(ref).backward()
    _loss(out).backward()
    fused_params = dict(fused.named_parameters())
    for name, p in reference.named_parameters():
        if p.grad is not None:
            atol = max(1e-4, 1e-5 * p.grad.abs().max().item())
            torch.testing.assert_close(fused_params[name].grad, p.grad, atol=atol, rtol=1e-4, msg=name)


def test_explicit_eager_attention_is_not_lean(lean_calls):
    reference, fused, config = build_pair("Data2VecTextModel")
    fused.set_attn_implementation("eager")
    reference.eval()
    fused.eval()
    _assert_same_model(reference, fused, inputs_for("Data2VecTextModel", config, labels=False))
    assert not lean_calls


def test_the_attention_settings_are_read_as_the_config_reads_them():
    """The lean path reads the config's attention implementation and output_attentions from its
    dict only where its class's properties return those attributes: a change through the config's
    setters is seen at once, and a config class with its own property is read through it."""
    from d2v_kernels.models import _lean

    _, fused, _ = build_pair("Data2VecTextModel")
    config = fused.config
    assert _lean._attention_settings(config) == ("d2v_kernels", False)
    fused.set_attn_implementation("sdpa")
    assert _lean._attention_settings(fused.config) == ("sdpa", False)

    class OwnProperty(type(config)):
        @property
        def output_attentions(self):
            return True

    other = OwnProperty()
    assert not _lean._reads_directly(OwnProperty)
    assert _lean._attention_settings(other)[1] is True
