"""Every Data2Vec class: optimize() on a copy gives transformers' outputs and gradients (fp32)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers

import d2v_kernels
from d2v_kernels import dispatch, models
from d2v_kernels.testing import ALL_CLASSES, FP32_RTOL, build_pair, inputs_for, randomize_, vision_config

ATOL = 2e-5


def _tensors(output) -> dict[str, torch.Tensor]:
    """Every tensor in a model output, nested tuples flattened with their path."""
    flat = {}

    def visit(key, value):
        if isinstance(value, torch.Tensor):
            flat[key] = value
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                visit(f"{key}[{i}]", v)

    for key, value in output.items():
        visit(key, value)
    return flat


def _assert_outputs_close(ref, out, atol=ATOL):
    ref_t, out_t = _tensors(ref), _tensors(out)
    assert ref_t.keys() == out_t.keys()
    for key in ref_t:
        assert ref_t[key].shape == out_t[key].shape, key
        torch.testing.assert_close(out_t[key], ref_t[key], atol=atol, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def _weighted_sum(output) -> torch.Tensor:
    total = 0.0
    for key, t in _tensors(output).items():
        if t.is_floating_point() and t.requires_grad:
            gen = torch.Generator().manual_seed(len(key))
            total = total + (t * torch.randn(t.shape, generator=gen)).sum()
    return total


def _grad_atol(grad: torch.Tensor) -> float:
    """fp32's ~1e-5 relative to the gradient's scale (a feature projection's reaches 100), 1e-4 at least."""
    return max(1e-4, FP32_RTOL * grad.abs().max().item())


def _ops_with_triton() -> set[str]:
    return {op for op in dispatch.ops() if any(i.backend == "triton" for i in dispatch.implementations(op))}


def _run(model, inputs, backend):
    if backend is None:
        return model(**inputs, output_hidden_states=True)
    with d2v_kernels.use_backend(backend):
        return model(**inputs, output_hidden_states=True)


# The Triton kernels through the interpreter on a class a modality, and on text's two encoder
# paths (the causal LM's decoder, a bidirectional one with padding): the other heads run the same
# fused encoders, which the default-dispatch matrix checks for every class (and tests/test_compile,
# tests/test_training and tests/test_lean_layers run on Triton for other classes).
TRITON_CLASSES = (
    "Data2VecAudioForCTC",
    "Data2VecVisionForImageClassification",
    "Data2VecTextForCausalLM",
    "Data2VecTextForSequenceClassification",
)
MATRIX = [(c, None) for c in ALL_CLASSES] + [(c, "triton") for c in TRITON_CLASSES]


@pytest.mark.parametrize(("class_name", "backend"), MATRIX, ids=[f"{b or 'auto'}-{c}" for c, b in MATRIX])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_optimized_matches_transformers(class_name, mode, backend):
    """Outputs, loss and gradients equal transformers' in fp32; with ``backend="triton"`` every op
    that has a Triton kernel runs it (through the interpreter on CPU), forward and backward."""
    reference, fused, config = build_pair(class_name)
    getattr(reference, mode)()
    getattr(fused, mode)()
    inputs = inputs_for(class_name, config)
    ref = reference(**inputs, output_hidden_states=True)
    with d2v_kernels.record_dispatch() as calls:
        out = _run(fused, inputs, backend)
    _assert_outputs_close(ref, out)
    per_op = {}
    for (op, ran), n in calls.items():
        per_op.setdefault(op, {})[ran] = n
    expected_ops = {"attention", "add_layer_norm"}
    if class_name.startswith("Data2VecAudio"):
        expected_ops |= {"pos_conv", "conv_feature_extractor"}
    assert expected_ops <= per_op.keys(), calls
    assert sum(per_op["attention"].values()) == config.num_hidden_layers, calls
    if backend == "triton":
        for op in _ops_with_triton() & per_op.keys():
            assert set(per_op[op]) == {"triton"}, f"{op} did not run triton: {calls}"
    with d2v_kernels.use_backend(backend) if backend else contextlib.nullcontext():
        _weighted_sum(ref).backward()
        _weighted_sum(out).backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    out_grads = {n: p.grad for n, p in fused.named_parameters() if p.grad is not None}
    assert ref_grads.keys() == out_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(
            out_grads[name], grad, atol=_grad_atol(grad), rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}"
        )


@pytest.mark.parametrize(
    "class_name", ["Data2VecAudioForCTC", "Data2VecVisionForImageClassification", "Data2VecTextForMaskedLM"]
)
def test_output_attentions_fall_back_to_eager(class_name):
    reference, fused, config = build_pair(class_name)
    reference.eval()
    fused.eval()
    inputs = inputs_for(class_name, config, labels=False)
    ref = reference(**inputs, output_attentions=True)
    with d2v_kernels.record_dispatch() as calls:
        out = fused(**inputs, output_attentions=True)
    assert len(out.attentions) == config.num_hidden_layers
    _assert_outputs_close(ref, out)
    assert calls[("attention", "eager")] == config.num_hidden_layers


def _audio_model_calls_with_a_changed_layer(layer_of, change_layer, **overrides):
    """(record_dispatch counts, config) of an optimized Data2VecAudioModel whose layer
    ``layer_of(model)`` was changed by ``change_layer`` (in it and in the reference), after checking
    its outputs equal transformers'."""
    reference, fused, config = build_pair("Data2VecAudioModel", **overrides)
    if change_layer is not None:
        for model in (reference, fused):
            change_layer(layer_of(model))
    reference.eval()
    fused.eval()
    inputs = inputs_for("Data2VecAudioModel", config, labels=False)
    with torch.no_grad(), d2v_kernels.record_dispatch() as calls:
        out = fused(**inputs)
    _assert_outputs_close(reference(**inputs), out)
    return calls, config


@pytest.mark.parametrize(
    ("overrides", "change_layer", "per_layer_op"),
    [
        pytest.param({"feat_extract_activation": "relu"}, None, None, id="relu"),
        pytest.param({"feat_extract_activation": "gelu_new"}, None, "layer_norm_gelu", id="tanh-gelu"),
        pytest.param({}, lambda layer: setattr(layer.layer_norm, "eps", 1e-3), "layer_norm_gelu", id="per-layer-eps"),
        pytest.param({}, lambda layer: setattr(layer.conv, "padding", (1,)), "layer_norm_gelu", id="padded-conv"),
    ],
)
def test_feature_encoder_the_op_does_not_compute_runs_per_layer(overrides, change_layer, per_layer_op):
    """A feature encoder whose layers are not what conv_feature_extractor computes (another
    activation, one layer's eps, a padded conv) runs transformers' layers, each conv layer fused
    where its activation is a GELU; never the whole-stack op with the wrong layer."""
    calls, config = _audio_model_calls_with_a_changed_layer(
        lambda model: model.feature_extractor.conv_layers[1], change_layer, **overrides
    )
    assert not any(op == "conv_feature_extractor" for op, _ in calls), calls
    ran = sum(n for (op, _), n in calls.items() if op == "layer_norm_gelu")
    assert ran == (len(config.conv_dim) if per_layer_op else 0), calls


@pytest.mark.parametrize(
    "change_layer",
    [
        pytest.param(lambda layer: setattr(layer.layer_norm, "eps", 1e-3), id="per-layer-eps"),
        pytest.param(lambda layer: setattr(layer, "activation", torch.nn.ReLU()), id="relu"),
    ],
)
def test_positional_conv_the_op_does_not_compute_runs_transformers_layers(change_layer):
    """A positional conv embedding with a layer pos_conv does not compute (its own eps, another
    activation) runs transformers' layers: same outputs, no pos_conv call."""
    calls, _ = _audio_model_calls_with_a_changed_layer(
        lambda model: model.encoder.pos_conv_embed.layers[1], change_layer
    )
    assert not any(op == "pos_conv" for op, _ in calls), calls
    assert any(op == "conv_feature_extractor" for op, _ in calls), calls


@pytest.mark.parametrize("class_name", ALL_CLASSES)
def test_state_dict_keys_unchanged(class_name):
    reference, fused, _ = build_pair(class_name)
    assert list(reference.state_dict()) == list(fused.state_dict())
    for (name, a), (_, b) in zip(reference.state_dict().items(), fused.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("class_name", ALL_CLASSES)
def test_fused_class_save_and_load(class_name, tmp_path):
    config = build_pair(class_name)[2]
    fused_cls = getattr(models, class_name)
    torch.manual_seed(0)
    model = randomize_(fused_cls(config)).eval()
    assert isinstance(model, getattr(transformers, class_name))
    fused_modules = [m for m in model.modules() if type(m).__module__.startswith("d2v_kernels")]
    assert fused_modules, "no fused module was swapped in at construction"
    model.save_pretrained(tmp_path)
    loaded = fused_cls.from_pretrained(tmp_path).eval()
    plain = getattr(transformers, class_name).from_pretrained(tmp_path).eval()
    inputs = inputs_for(class_name, config, labels=False)
    with torch.no_grad():
        out, out_loaded, out_plain = model(**inputs), loaded(**inputs), plain(**inputs)
    for key, value in _tensors(out).items():
        torch.testing.assert_close(_tensors(out_loaded)[key], value, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(_tensors(out_plain)[key], value, atol=ATOL, rtol=1e-5)


def test_optimize_is_idempotent_and_in_place():
    _, fused, _ = build_pair("Data2VecAudioForCTC")
    before = [type(m) for m in fused.modules()]
    assert d2v_kernels.optimize(fused) is fused
    assert [type(m) for m in fused.modules()] == before
    assert fused.config._attn_implementation == "d2v_kernels"


def test_optimize_rejects_non_modules():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        d2v_kernels.optimize("not a model")


def test_shared_relative_position_bias_and_interpolation():
    config = vision_config(use_relative_position_bias=False, use_shared_relative_position_bias=True)
    reference = randomize_(transformers.Data2VecVisionModel(config)).eval()
    fused = d2v_kernels.optimize(models.Data2VecVisionModel(config)).eval()
    fused.load_state_dict(reference.state_dict())
    pixels = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(
        fused(pixels).last_hidden_state, reference(pixels).last_hidden_state, atol=ATOL, rtol=1e-5
    )
    larger = torch.randn(1, 3, 72, 72)  # another resolution: transformers resizes the table
    torch.testing.assert_close(
        fused(larger, interpolate_pos_encoding=True).last_hidden_state,
        reference(larger, interpolate_pos_encoding=True).last_hidden_state,
        atol=ATOL,
        rtol=1e-5,
    )


def test_text_generation_with_cache_matches():
    reference, fused, config = build_pair("Data2VecTextForCausalLM")
    reference.eval()
    fused.eval()
    inputs = inputs_for("Data2VecTextForCausalLM", config, labels=False)
    mask = inputs["attention_mask"].flip(-1)  # left padding for generation
    ids = inputs["input_ids"].flip(-1)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=config.pad_token_id)
    expected = reference.generate(ids, **kwargs)
    with d2v_kernels.record_dispatch() as calls:
        got = fused.generate(ids, **kwargs)
    assert torch.equal(got, expected)
    assert calls[("attention", "eager")] == 4 * config.num_hidden_layers


def test_attn_implementation_registry_from_pretrained(tmp_path):
    config = build_pair("Data2VecTextForSequenceClassification")[2]
    model = randomize_(transformers.Data2VecTextForSequenceClassification(config)).eval()
    model.save_pretrained(tmp_path)
    from d2v_kernels.models import hf_attention

    hf_attention.register()
    loaded = transformers.Data2VecTextForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="d2v_kernels"
    ).eval()
    inputs = inputs_for("Data2VecTextForSequenceClassification", config, labels=False)
    with d2v_kernels.record_dispatch() as calls:
        logits = loaded(**inputs).logits
    assert calls[("attention", "eager")] == config.num_hidden_layers
    model.set_attn_implementation("eager")
    torch.testing.assert_close(logits, model(**inputs).logits, atol=ATOL, rtol=1e-5)


def _enable_checkpointing(model):
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def test_gradient_checkpointing_and_frozen_feature_encoder():
    reference, fused, config = build_pair("Data2VecAudioForCTC")
    for model in (reference, fused):
        model.train()
        _enable_checkpointing(model)
        model.freeze_feature_encoder()
    inputs = inputs_for("Data2VecAudioForCTC", config)
    loss_ref = reference(**inputs).loss
    loss = fused(**inputs).loss
    torch.testing.assert_close(loss, loss_ref, atol=ATOL, rtol=1e-5)
    loss_ref.backward()
    loss.backward()
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), fused.named_parameters()):
        if name.startswith("data2vec_audio.feature_extractor"):
            assert p.grad is None and not p.requires_grad, name
        elif p_ref.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_feature_encoder_gradient_checkpointing_without_freezing():
    reference, fused, config = build_pair("Data2VecAudioModel")
    for model in (reference, fused):
        model.train()
        _enable_checkpointing(model)
    inputs = inputs_for("Data2VecAudioModel", config)
    reference(**inputs).last_hidden_state.square().mean().backward()
    fused(**inputs).last_hidden_state.square().mean().backward()
    conv = "data2vec_audio.feature_extractor.conv_layers.0.conv.weight"
    ref_grad = dict(reference.named_parameters())[conv.removeprefix("data2vec_audio.")].grad
    grad = dict(fused.named_parameters())[conv.removeprefix("data2vec_audio.")].grad
    assert ref_grad is not None
    torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", [None, "triton"], ids=["auto", "triton"])
def test_text_decoder_cross_attention_with_padded_encoder(backend):
    reference, fused, config = build_pair("Data2VecTextForCausalLM", add_cross_attention=True)
    reference.eval()
    fused.eval()
    inputs = inputs_for("Data2VecTextForCausalLM", config, labels=False)
    encoder_states = torch.randn(2, 7, config.hidden_size)
    encoder_mask = torch.ones(2, 7, dtype=torch.long)
    encoder_mask[1, 5:] = 0
    kwargs = dict(encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask)
    expected = reference(**inputs, **kwargs).logits
    with d2v_kernels.record_dispatch() as calls:
        got = _run(fused, {**inputs, **kwargs}, backend).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    assert sum(n for (op, _), n in calls.items() if op == "attention") == 2 * config.num_hidden_layers
