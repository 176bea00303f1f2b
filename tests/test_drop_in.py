"""The fused classes and optimize() keep transformers' contracts: a requested attention
implementation, attentions asked for in the config, generation support, nothing built on the
default path, and clear errors where something cannot be done."""

from __future__ import annotations

import collections
import copy
import hashlib
import importlib
import inspect
import warnings

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationMixin

import d2v_kernels
from d2v_kernels import models
from d2v_kernels.testing import build_pair, config_for, inputs_for, randomize_

ATOL = 2e-5


def _attention_calls(calls) -> int:
    return sum(n for (op, _), n in calls.items() if op == "attention")


@pytest.mark.parametrize("requested", ["eager", "sdpa"])
@pytest.mark.parametrize("class_name", ["Data2VecAudioForCTC", "Data2VecTextForMaskedLM"])
def test_fused_class_honours_a_requested_attention(class_name, requested, tmp_path):
    """An explicit ``attn_implementation`` (config or from_pretrained) stays; the caller's config
    keeps it, so attentions can still be asked for in it."""
    config = config_for(class_name)
    config._attn_implementation = requested
    model = getattr(models, class_name)(config)
    assert model.config._attn_implementation == requested
    assert config._attn_implementation == requested
    model.save_pretrained(tmp_path)
    loaded = getattr(models, class_name).from_pretrained(tmp_path, attn_implementation=requested)
    assert loaded.config._attn_implementation == requested
    inputs = inputs_for(class_name, config, labels=False)
    with d2v_kernels.record_dispatch() as calls:
        loaded.eval()(**inputs)
    assert _attention_calls(calls) == 0, calls  # transformers' own attention ran
    if requested == "eager":
        loaded.config.output_attentions = True  # transformers raises for any other implementation
        assert len(loaded(**inputs).attentions) == config.num_hidden_layers


@pytest.mark.parametrize("class_name", ["Data2VecAudioForCTC", "Data2VecTextForMaskedLM"])
def test_fused_class_default_is_d2v_kernels_and_can_be_switched(class_name):
    config = config_for(class_name)
    torch.manual_seed(0)
    model = randomize_(getattr(models, class_name)(config)).eval()
    assert model.config._attn_implementation == "d2v_kernels"
    inputs = inputs_for(class_name, config, labels=False)
    with d2v_kernels.record_dispatch() as calls:
        fused = model(**inputs).logits
    assert _attention_calls(calls) == config.num_hidden_layers, calls
    for name, expected_calls in (("eager", 0), ("sdpa", 0), ("d2v_kernels", config.num_hidden_layers)):
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name
        with d2v_kernels.record_dispatch() as calls:
            out = model(**inputs).logits
        assert _attention_calls(calls) == expected_calls, (name, calls)
        torch.testing.assert_close(out, fused, atol=ATOL, rtol=1e-5)


def test_optimize_honours_a_requested_attention_unless_told_otherwise():
    """A constructed model says "sdpa" whether asked for or defaulted (transformers keeps no
    record), so optimize() takes "sdpa" as the default; "eager" and others stay unless
    ``attn_implementation`` says otherwise."""
    config = config_for("Data2VecAudioModel", attn_implementation="eager")
    model = transformers.Data2VecAudioModel(config)
    assert d2v_kernels.optimize(model).config._attn_implementation == "eager"
    d2v_kernels.optimize(model, attn_implementation="d2v_kernels")
    assert model.config._attn_implementation == "d2v_kernels"
    default = d2v_kernels.optimize(transformers.Data2VecAudioModel(config_for("Data2VecAudioModel")))
    assert default.config._attn_implementation == "d2v_kernels"
    with pytest.raises(ValueError, match="attn_implementation"):
        d2v_kernels.optimize(model, attn_implementation="no_such_attention")


@pytest.mark.parametrize("how", ["config", "forward"])
@pytest.mark.parametrize("attn_implementation", [None, "d2v_kernels"], ids=["as-requested", "d2v_kernels"])
@pytest.mark.parametrize(
    "class_name", ["Data2VecAudioForCTC", "Data2VecTextForMaskedLM", "Data2VecVisionForImageClassification"]
)
def test_attentions_asked_for_are_returned(class_name, attn_implementation, how):
    """Attentions asked for in the config (the eager model's) or in the call come back as
    transformers', whatever optimize() switched attention to."""
    overrides = {"output_attentions": True} if how == "config" else {}
    config = config_for(class_name, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = randomize_(getattr(transformers, class_name)(config)).eval()
    fused = d2v_kernels.optimize(copy.deepcopy(reference), attn_implementation=attn_implementation)
    inputs = inputs_for(class_name, config, labels=False)
    call = {"output_attentions": True} if how == "forward" else {}
    expected = reference(**inputs, **call).attentions
    with d2v_kernels.record_dispatch() as calls:
        got = fused(**inputs, **call).attentions
    assert len(got) == len(expected) == config.num_hidden_layers
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    # Through d2v_kernels' attention, which runs the eager reference; as requested, transformers' eager.
    expected_calls = config.num_hidden_layers if attn_implementation == "d2v_kernels" else 0
    assert calls[("attention", "eager")] == _attention_calls(calls) == expected_calls, calls


def test_causal_lm_declares_generation_mixin():
    fused_cls = models.Data2VecTextForCausalLM
    assert GenerationMixin in transformers.Data2VecTextForCausalLM.__bases__
    assert GenerationMixin in fused_cls.__bases__
    assert fused_cls.can_generate()
    config = config_for("Data2VecTextForCausalLM")
    model = randomize_(fused_cls(config)).eval()
    ids = torch.tensor([[5, 7, 11]])
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=config.pad_token_id)
    assert out.shape == (1, 6)


def test_optimize_builds_nothing(monkeypatch):
    """On a machine with a GPU and nvcc, optimize() must not load (or JIT-build) the extension."""
    from d2v_kernels import _extension

    def no_build():
        raise AssertionError("optimize() asked for the CUDA extension")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_extension, "_resolve", no_build)
    monkeypatch.setitem(_extension._state, "resolved", False)
    model = transformers.Data2VecAudioModel(config_for("Data2VecAudioModel"))
    d2v_kernels.optimize(model)


def test_optimize_warns_when_nothing_was_swapped():
    with pytest.warns(UserWarning, match="Linear"):
        d2v_kernels.optimize(torch.nn.Linear(2, 2))
    model = transformers.Data2VecAudioModel(config_for("Data2VecAudioModel"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d2v_kernels.optimize(model)
        d2v_kernels.optimize(model)  # already optimized: nothing left to swap, nothing wrong


def test_vision_rejects_the_registry_name_clearly():
    config = config_for("Data2VecVisionModel", attn_implementation="d2v_kernels")
    with pytest.raises(ValueError, match=r"Data2VecVision.*d2v_kernels\.optimize\(model\)"):
        transformers.Data2VecVisionModel(config)
    model = models.Data2VecVisionModel(config)  # the fused class takes it
    assert model.config._attn_implementation == "d2v_kernels"
    with d2v_kernels.record_dispatch() as calls:
        model(**inputs_for("Data2VecVisionModel", config, labels=False))
    assert _attention_calls(calls) == config.num_hidden_layers, calls


# The transformers forwards our modules copy or rewrite (see models/), by a hash of their source:
# when transformers changes one, review the override beside it, then update the hash.
PINNED_FORWARDS = {
    "audio.Data2VecAudioAttention": "4ffe678230a03cfe",  # FusedData2VecAudioAttention
    "audio.Data2VecAudioEncoderLayer": "634e53653e9d03b9",  # FusedData2VecAudioEncoderLayer
    "text.Data2VecTextSelfAttention": "e7edabb460427ccd",  # FusedData2VecTextSelfAttention
    "text.Data2VecTextSelfOutput": "0650f56bc438ef17",  # FusedData2VecTextSelfOutput
    "text.Data2VecTextOutput": "0650f56bc438ef17",  # FusedData2VecTextOutput
    "vision.Data2VecVisionSelfAttention": "56bb9e8787f63b62",  # FusedData2VecVisionSelfAttention
    "vision.Data2VecVisionSdpaSelfAttention": "6f6a846880a87045",  # FusedData2VecVisionSelfAttention
    "vision.Data2VecVisionLayer": "1eb20892baaa1242",  # FusedData2VecVisionLayer
    "vision.Data2VecVisionEncoder": "1cc0e039ca7c6677",  # passes FusedData2VecVisionRelativePositionBias's output down
    "vision.Data2VecVisionRelativePositionBias": "367fbb421fa1c4d0",  # FusedData2VecVisionRelativePositionBias
    # The lean layers (models/_lean.py) compute these modules' forwards without calling them.
    "text.Data2VecTextLayer": "3e5a9ede068d4d43",  # FusedData2VecTextLayer
    "text.Data2VecTextLayer.feed_forward_chunk": "96b88c38a24ae38c",  # FusedData2VecTextLayer
    "text.Data2VecTextAttention": "f3d2d382def4fff7",  # FusedData2VecTextLayer
    "text.Data2VecTextIntermediate": "889c3eb8cb652e6c",  # FusedData2VecTextLayer
    "audio.Data2VecAudioFeedForward": "85d5ba347dc34339",  # FusedData2VecAudioEncoderLayer
    "vision.Data2VecVisionAttention": "807aa00db3f9b3df",  # FusedData2VecVisionLayer
    "vision.Data2VecVisionSelfOutput": "3c375830ced91643",  # FusedData2VecVisionLayer
    "vision.Data2VecVisionIntermediate": "79f69bf0166d71a9",  # FusedData2VecVisionLayer
    "vision.Data2VecVisionOutput": "2fc9a26d194237ac",  # FusedData2VecVisionLayer
}


# The same forwards as transformers 5.17.0 (the GPU machine's release) has them, reviewed too: they
# differ from the pinned ones by the cache's name (``past_key_values``, text.CACHE_KWARG) and
# type annotations.
REVIEWED_EARLIER = {
    "text.Data2VecTextSelfAttention": "408ceb8871408877",
    "text.Data2VecTextLayer": "86f32b0c0b17ff3b",
    "text.Data2VecTextAttention": "8cdd8881049def40",
}


@pytest.mark.parametrize("name", PINNED_FORWARDS)
def test_overridden_transformers_forwards_are_unchanged(name):
    modality, class_name, method = (*name.split("."), "forward")[:3]
    hf = importlib.import_module(f"transformers.models.data2vec.modeling_data2vec_{modality}")
    source = inspect.getsource(getattr(getattr(hf, class_name), method))
    reviewed = (PINNED_FORWARDS[name], REVIEWED_EARLIER.get(name))
    assert hashlib.sha256(source.encode()).hexdigest()[:16] in reviewed, (
        f"transformers' {class_name}.{method} changed: review d2v_kernels/models/{modality}.py against it"
    )


def _qkv_caches(model) -> list:
    return [m.__dict__["_d2v_qkv_cache"] for m in model.modules() if "_d2v_qkv_cache" in m.__dict__]


QKV_NAMES = {"Data2VecAudioModel": "q_proj", "Data2VecTextModel": "query", "Data2VecVisionModel": "query"}


@pytest.mark.parametrize("class_name", list(QKV_NAMES))
def test_qkv_is_one_projection_with_the_same_parameters(class_name):
    """One GEMM for q, k and v (two fewer linear calls per layer), with transformers' parameter
    names and gradients; vision's key has no bias and stays without one."""
    reference, fused, config = build_pair(class_name)
    assert list(fused.state_dict()) == list(reference.state_dict())
    if class_name.startswith("Data2VecVision"):
        assert fused.encoder.layer[0].attention.attention.key.bias is None
    inputs = inputs_for(class_name, config, labels=False)
    linear_calls = {}
    for model in (reference, fused):
        with _CountLinear() as counter:
            model(**inputs).last_hidden_state.square().mean().backward()
        linear_calls[model is fused] = counter.calls
    assert linear_calls[True] == linear_calls[False] - 2 * config.num_hidden_layers, linear_calls
    grads = {n: p.grad for n, p in reference.named_parameters() if QKV_NAMES[class_name] in n or "key" in n}
    fused_params = dict(fused.named_parameters())
    assert grads
    for name, grad in grads.items():
        torch.testing.assert_close(fused_params[name].grad, grad, atol=1e-5, rtol=1e-4, msg=name)


class _CountLinear(torch.overrides.TorchFunctionMode):
    def __enter__(self):
        self.calls = 0
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("change", ["optimizer-step", "load_state_dict", "half"])
def test_cached_inference_qkv_weight_is_rebuilt_when_a_parameter_changes(change):
    """Without autograd the concatenated weight is cached; an optimizer step (in place),
    load_state_dict (copy_) and .half() (new tensors) each make the next call rebuild it."""
    reference, fused, config = build_pair("Data2VecTextModel")
    reference.eval()
    fused.eval()
    inputs = inputs_for("Data2VecTextModel", config, labels=False)
    with torch.no_grad():
        fused(**inputs)
    caches = _qkv_caches(fused)
    assert len(caches) == config.num_hidden_layers
    with torch.no_grad():
        fused(**inputs)
    assert all(a is b for a, b in zip(_qkv_caches(fused), caches)), "the cache was not reused"
    if change == "optimizer-step":
        for model in (reference, fused):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            model(**inputs).last_hidden_state.square().mean().backward()
            optimizer.step()
    elif change == "load_state_dict":
        state = randomize_(copy.deepcopy(reference), seed=5).state_dict()
        reference.load_state_dict(state)
        fused.load_state_dict(state)
    else:
        reference.half()
        fused.half()
    with torch.no_grad():
        got = fused(**inputs).last_hidden_state
        expected = reference(**inputs).last_hidden_state
    assert all(a is not b for a, b in zip(_qkv_caches(fused), caches)), "the cache was not rebuilt"
    tolerance = 5e-3 if change == "half" else ATOL
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


class _AtenCalls(TorchDispatchMode):
    def __enter__(self):
        self.names = collections.Counter()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.names[name] += 1
        # Indexing with a boolean mask counts its True elements inside the kernel (a sync on a GPU).
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            self.names["boolean_index"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("class_name", ["Data2VecAudioModel", "Data2VecTextModel"])
def test_forward_reads_nothing_back_to_the_host(class_name):
    """No value is read back from a tensor in the forward (a host-device sync on a GPU), an
    all-ones padding mask included: it is passed to the kernel as it is. Audio's encoder zeroes
    padded frames without indexing by the mask (transformers' own does, a sync a forward)."""
    reference, fused, config = build_pair(class_name)
    inputs = inputs_for(class_name, config, labels=False)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    with torch.no_grad():
        expected = reference.eval()(**inputs).last_hidden_state
        with _AtenCalls() as calls:
            got = fused.eval()(**inputs).last_hidden_state
    read_back = {"_local_scalar_dense", "is_nonzero", "item", "equal", "nonzero", "boolean_index"} & calls.names.keys()
    assert not read_back, calls.names
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


def test_audio_encoder_runs_transformers_own_forward_less_its_sync():
    """FusedData2VecAudioEncoder's forward is the installed transformers' forward, compiled again
    from its source with the indexing line replaced; a forward without that line is kept as it is."""
    import transformers.models.data2vec.modeling_data2vec_audio as hf_audio

    from d2v_kernels.models.audio import FusedData2VecAudioEncoder, sync_free_encoder_forward

    rebuilt = FusedData2VecAudioEncoder.forward.__wrapped__
    assert rebuilt.__wrapped__ is hf_audio.Data2VecAudioEncoder.forward
    assert "without its sync" in rebuilt.__code__.co_filename
    assert rebuilt.__globals__ is hf_audio.Data2VecAudioEncoder.forward.__globals__

    def forward(self, hidden_states, attention_mask=None):
        return hidden_states

    assert sync_free_encoder_forward(forward) is forward
    assert sync_free_encoder_forward(len) is len  # no Python source


def test_torch_func_grad_runs_aten_backends_and_equals_transformers():
    """Under a torch.func transform the kernels' autograd (custom ops, Functions without
    setup_context) cannot run: dispatch gives the Triton and CUDA backends that reason, so
    torch.func.grad of an optimized model takes aten's and equals transformers'; forced, the
    Triton backend raises it."""
    from d2v_kernels import dispatch
    from d2v_kernels.dispatch import BackendUnavailableError

    cls = "Data2VecTextForSequenceClassification"
    reference, fused, config = build_pair(cls)
    inputs = inputs_for(cls, config)

    def grads(model):
        params = {name: p.detach() for name, p in model.named_parameters()}
        return torch.func.grad(lambda p: torch.func.functional_call(model, p, (), inputs).loss)(params)

    want = grads(reference)
    with d2v_kernels.record_dispatch() as calls:
        got = grads(fused)
    assert calls and all(backend in ("eager", "sdpa") for _, backend in calls)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5, msg=name)
    triton = next(i for i in dispatch.implementations("attention") if i.backend == "triton")
    reasons = []

    def recorded(x):
        reasons.extend(dispatch.device_reasons(triton, torch.device("cuda"), False))
        return x.sum()

    torch.func.grad(recorded)(torch.ones(2))
    assert any("torch.func" in r for r in reasons), reasons
    assert not any("torch.func" in r for r in dispatch.device_reasons(triton, torch.device("cuda"), False))
    with d2v_kernels.use_backend("triton"), pytest.raises(BackendUnavailableError, match=r"torch\.func transform"):
        grads(fused)


def test_text_layers_take_the_cache_by_the_installed_transformers_name_without_a_warning():
    """transformers renamed the layers' ``past_key_values`` to ``cache``; the fused text layers take
    it by the installed release's name (their signatures say which), so the encoder, training and
    cached generation run without the deprecation warning that the other name would raise."""
    from transformers.models.data2vec import modeling_data2vec_text as hf

    from d2v_kernels.models import text

    for fused, original in (
        (text.FusedData2VecTextLayer, hf.Data2VecTextLayer),
        (text.FusedData2VecTextSelfAttention, hf.Data2VecTextSelfAttention),
    ):
        assert text.CACHE_KWARG in inspect.signature(original.forward).parameters
        assert text.CACHE_KWARG in inspect.signature(fused.forward).parameters, fused

    reference, fused, config = build_pair("Data2VecTextForCausalLM")
    inputs = inputs_for("Data2VecTextForCausalLM", config, labels=False)
    ids, mask = inputs["input_ids"].flip(-1), inputs["attention_mask"].flip(-1)  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=config.pad_token_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fused.eval().generate(ids, **kwargs)
        encoder = build_pair("Data2VecTextForSequenceClassification")
        model, sequence_inputs = encoder[1].train(), inputs_for("Data2VecTextForSequenceClassification", encoder[2])
        model(**sequence_inputs).loss.backward()
        model.eval()(**sequence_inputs)
    assert not [str(w.message) for w in caught if "d2v_kernels" in w.filename or "Fused" in str(w.message)]
    assert torch.equal(got, reference.eval().generate(ids, **kwargs))
