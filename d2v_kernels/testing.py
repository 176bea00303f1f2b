"""Small random Data2Vec configs and inputs for every class (odd sizes on purpose): used by the
tests and by `d2v-kernels validate`."""

from __future__ import annotations

import torch
import transformers

# The numerics rule (flash-attention's), the one used by the tests, `d2v-kernels validate` and
# bench/: a kernel's error against a float64 reference may be at most `factor` (2) times eager
# PyTorch's own error in the same dtype, plus a floor of a few ulps at magnitude 1 (scaled with the
# reference's magnitude above 1); in float32 (and float64), about 1e-5 relative.
ABS_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
FP32_RTOL = 1e-5


class CheckFailed(AssertionError):
    """A result is further from its float64 reference than ``error_bound`` allows."""


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def error_bound(
    dtype: torch.dtype, eager_err: float, ref_scale: float, *, factor: float = 2.0, floor: float | None = None
) -> float:
    """The largest error allowed to a result in ``dtype`` whose eager PyTorch counterpart is
    ``eager_err`` away from the float64 reference, whose largest magnitude is ``ref_scale``.

    ``factor``: a whole model's output, through many layers, is compared with ``factor=4`` (bench's
    end-to-end checks). ``floor``: the fp16/bf16 floor at magnitude 1 (default ``ABS_FLOOR``).
    """
    scale = max(ref_scale, 1.0)
    if dtype not in ABS_FLOOR:
        return max(FP32_RTOL * scale, factor * eager_err)
    return factor * eager_err + (ABS_FLOOR[dtype] if floor is None else floor) * scale


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def assert_close_to_reference(
    out, ref64, eager, *, name: str = "output", factor: float = 2.0, floor: float | None = None
) -> dict[str, float]:
    """Raise ``CheckFailed`` unless every tensor of ``out`` is within ``error_bound`` of ``ref64``.

    ``out``: the result under test; ``ref64``: the same computation in float64; ``eager``: eager
    PyTorch in ``out``'s dtype. Tensors, or matching (nested) tuples / lists / dicts of tensors.
    Returns the worst tensor's ``{"max_err", "bound"}`` (the one nearest its bound).
    """
    outs, refs, eagers = _tensors(out), _tensors(ref64), _tensors(eager)
    if not (len(outs) == len(refs) == len(eagers)) or not outs:
        raise CheckFailed(f"{name}: {len(outs)} tensors vs {len(refs)} reference and {len(eagers)} eager tensors")
    worst = {"max_err": 0.0, "bound": 0.0}
    worst_ratio = -1.0
    for i, (o, r, e) in enumerate(zip(outs, refs, eagers)):
        label = f"{name}[{i}]" if len(outs) > 1 or not isinstance(out, torch.Tensor) else name
        if o.shape != r.shape:
            raise CheckFailed(f"{label}: shape {tuple(o.shape)} != reference {tuple(r.shape)}")
        if not torch.isfinite(o).all():
            raise CheckFailed(f"{label} ({_dtype_name(o.dtype)}): non-finite values (nan or inf)")
        err = max_abs_err(o.detach(), r.detach())
        scale = r.detach().abs().max().item() if r.numel() else 1.0
        bound = error_bound(o.dtype, max_abs_err(e.detach(), r.detach()), scale, factor=factor, floor=floor)
        if not err <= bound:  # also catches NaN
            raise CheckFailed(f"{label} ({_dtype_name(o.dtype)}): max error {err:.3e} > bound {bound:.3e}")
        ratio = err / bound if bound else 0.0
        if ratio > worst_ratio:
            worst, worst_ratio = {"max_err": err, "bound": bound}, ratio
    return worst


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


AUDIO_CLASSES = (
    "Data2VecAudioModel",
    "Data2VecAudioForCTC",
    "Data2VecAudioForSequenceClassification",
    "Data2VecAudioForAudioFrameClassification",
    "Data2VecAudioForXVector",
)
VISION_CLASSES = (
    "Data2VecVisionModel",
    "Data2VecVisionForImageClassification",
    "Data2VecVisionForSemanticSegmentation",
)
TEXT_CLASSES = (
    "Data2VecTextModel",
    "Data2VecTextForCausalLM",
    "Data2VecTextForMaskedLM",
    "Data2VecTextForSequenceClassification",
    "Data2VecTextForMultipleChoice",
    "Data2VecTextForTokenClassification",
    "Data2VecTextForQuestionAnswering",
)
ALL_CLASSES = AUDIO_CLASSES + VISION_CLASSES + TEXT_CLASSES


def audio_config(**overrides):
    kwargs = dict(
        hidden_size=48,
        num_attention_heads=3,
        num_hidden_layers=2,
        intermediate_size=72,
        conv_dim=(40, 40, 40),
        conv_kernel=(10, 3, 2),
        conv_stride=(5, 2, 2),
        num_conv_pos_embeddings=2,
        num_conv_pos_embedding_groups=4,
        conv_pos_kernel_size=5,
        vocab_size=23,
        num_labels=3,
        tdnn_dim=(32, 32),
        tdnn_kernel=(3, 1),
        tdnn_dilation=(1, 2),
        xvector_output_dim=16,
        classifier_proj_size=24,
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
        ctc_loss_reduction="mean",
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return transformers.Data2VecAudioConfig(**kwargs)


def vision_config(**overrides):
    kwargs = dict(
        hidden_size=48,
        num_attention_heads=3,
        num_hidden_layers=4,
        intermediate_size=72,
        image_size=56,
        patch_size=8,  # 7 x 7 patches + CLS = 50 tokens
        use_relative_position_bias=True,
        use_shared_relative_position_bias=False,
        layer_scale_init_value=0.1,
        drop_path_rate=0.0,
        num_labels=3,
        out_indices=[0, 1, 2, 3],
        pool_scales=(1, 2),
        auxiliary_channels=16,
        channels=16,
    )
    kwargs.update(overrides)
    return transformers.Data2VecVisionConfig(**kwargs)


def text_config(**overrides):
    kwargs = dict(
        vocab_size=99,
        hidden_size=48,
        num_attention_heads=3,
        num_hidden_layers=2,
        intermediate_size=72,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    kwargs.update(overrides)
    return transformers.Data2VecTextConfig(**kwargs)


def config_for(class_name: str, **overrides):
    if class_name.startswith("Data2VecAudio"):
        return audio_config(**overrides)
    if class_name.startswith("Data2VecVision"):
        return vision_config(**overrides)
    if class_name == "Data2VecTextForCausalLM":
        overrides.setdefault("is_decoder", True)
    if class_name == "Data2VecTextForQuestionAnswering":
        overrides.setdefault("num_labels", 2)
    return text_config(**overrides)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so nothing is tested on zeros (bias tables start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "relative_position_bias_table" in name else 0.05
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model


def inputs_for(class_name: str, config, *, batch: int = 2, labels: bool = True, seed: int = 1) -> dict:
    """Inputs with padding that differs per row, and labels for the loss."""
    gen = torch.Generator().manual_seed(seed)
    if class_name.startswith("Data2VecAudio"):
        samples = 1601  # -> 319 -> 159 -> 79 frames
        wave = torch.randn(batch, samples, generator=gen)
        mask = torch.ones(batch, samples, dtype=torch.long)
        mask[-1, 1203:] = 0
        wave[-1, 1203:] = 0.0
        out = {"input_values": wave, "attention_mask": mask}
        if labels:
            if class_name == "Data2VecAudioForCTC":
                lab = torch.randint(1, config.vocab_size, (batch, 9), generator=gen)
                lab[-1, 6:] = -100
                out["labels"] = lab
            elif class_name == "Data2VecAudioForAudioFrameClassification":
                pass  # its loss needs one-hot labels per frame; outputs and gradients are compared
            elif class_name != "Data2VecAudioModel":
                out["labels"] = torch.randint(0, config.num_labels, (batch,), generator=gen)
        return out
    if class_name.startswith("Data2VecVision"):
        pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=gen)
        out = {"pixel_values": pixels}
        if labels and class_name == "Data2VecVisionForImageClassification":
            out["labels"] = torch.randint(0, config.num_labels, (batch,), generator=gen)
        if labels and class_name == "Data2VecVisionForSemanticSegmentation":
            out["labels"] = torch.randint(
                0, config.num_labels, (batch, config.image_size, config.image_size), generator=gen
            )
        return out
    length = 13
    shape = (batch, 3, length) if class_name == "Data2VecTextForMultipleChoice" else (batch, length)
    ids = torch.randint(3, config.vocab_size, shape, generator=gen)
    mask = torch.ones(shape, dtype=torch.long)
    mask[-1, ..., 9:] = 0
    ids[-1, ..., 9:] = config.pad_token_id
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        if class_name in ("Data2VecTextForCausalLM", "Data2VecTextForMaskedLM"):
            out["labels"] = torch.where(mask.bool(), ids, -100)
        elif class_name == "Data2VecTextForTokenClassification":
            out["labels"] = torch.randint(0, config.num_labels, shape, generator=gen)
        elif class_name == "Data2VecTextForQuestionAnswering":
            out["start_positions"] = torch.tensor([1, 4])[:batch]
            out["end_positions"] = torch.tensor([3, 7])[:batch]
        elif class_name == "Data2VecTextForMultipleChoice":
            out["labels"] = torch.randint(0, 3, (batch,), generator=gen)
        elif class_name == "Data2VecTextForSequenceClassification":
            out["labels"] = torch.randint(0, config.num_labels, (batch,), generator=gen)
    return out


def build_pair(class_name: str, **config_overrides):
    """(transformers model with eager attention, an optimize()d deep copy), same weights."""
    import copy

    import d2v_kernels

    config = config_for(class_name, **config_overrides)
    config._attn_implementation = "eager"  # the reference that can return attention weights
    torch.manual_seed(0)
    reference = getattr(transformers, class_name)(config)
    randomize_(reference)
    fused = d2v_kernels.optimize(copy.deepcopy(reference), attn_implementation="d2v_kernels")
    return reference, fused, config


def graph_nodes(output: torch.Tensor) -> list:
    """Every node of ``output``'s autograd graph, each once."""
    seen, stack, nodes = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes


def graph_node_names(output: torch.Tensor) -> list[str]:
    """The class names of every node of ``output``'s autograd graph, each node once (e.g.
    ``"PostLnLayerFunctionBackward"``): what a test counts to see which nodes a forward recorded."""
    return [type(node).__name__ for node in graph_nodes(output)]


def reentrant_checkpoint_runs(layer, x, call):
    """([output, x's gradient, each of ``layer``'s parameters' gradients] of ``call(x)`` run plainly,
    the same under a reentrant checkpoint (``torch.utils.checkpoint``, which supports only
    ``backward``)), each under the Triton backend from seed 0."""
    from d2v_kernels.dispatch import use_backend

    runs = []
    for checkpointed in (False, True):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with use_backend("triton"):
            out = torch.utils.checkpoint.checkpoint(call, x, use_reentrant=True) if checkpointed else call(x)
            out.sum().backward()
        runs.append([out.detach(), x.grad, *(p.grad for p in layer.parameters())])
    return runs
