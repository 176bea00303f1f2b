"""d2v_kernels.pretraining: targets against an independent float64 computation, the EMA update and
its schedule, the masked loss, gradients, a short training run, resume, save_pretrained, masks,
DDP / autocast / gradient checkpointing, bad input. Tiny models (hidden 48, 2 heads, 3 layers)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import d2v_kernels
from d2v_kernels import models, testing
from d2v_kernels.pretraining import Data2VecPretrainer, PretrainingConfig
from d2v_kernels.pretraining.ema import annealed_decay
from d2v_kernels.pretraining.masking import audio_span_mask, block_mask, token_span_mask

CLASS = {"audio": "Data2VecAudioModel", "vision": "Data2VecVisionModel", "text": "Data2VecTextModel"}
TINY = dict(num_attention_heads=2, num_hidden_layers=3)
MASK_TOKEN = 4  # text: an id the test vocabulary (99) holds, not bos/pad/eos (0, 1, 2)


def tiny_config(modality: str, **overrides):
    if modality == "audio":
        return testing.audio_config(**{**TINY, "mask_time_prob": 0.05, **overrides})
    if modality == "vision":
        return testing.vision_config(**{**TINY, "use_mask_token": True, **overrides})
    return testing.text_config(**{**TINY, **overrides})


def build_student(modality: str, kind: str = "fused", seed: int = 0, **overrides):
    config = tiny_config(modality, **overrides)
    torch.manual_seed(seed)
    if kind == "fused":
        model = getattr(models, CLASS[modality])(config)
    else:
        config._attn_implementation = "eager"
        model = getattr(transformers, CLASS[modality])(config)
        if kind == "optimize":
            d2v_kernels.optimize(model)
    return testing.randomize_(model, seed=seed)


def inputs(modality: str, config, seed: int = 1) -> dict:
    return testing.inputs_for(CLASS[modality], config, labels=False, seed=seed)


def config_for(modality: str, **overrides) -> PretrainingConfig:
    preset = {"audio": PretrainingConfig.for_audio, "vision": PretrainingConfig.for_vision}.get(
        modality, PretrainingConfig.for_text
    )
    small_masks = {"audio": dict(mask_length=4), "vision": dict(mask_length=4), "text": {}}[modality]
    return preset(**{"average_top_k_layers": 2, **small_masks, **overrides})


def pretrainer(modality: str, kind: str = "fused", model: dict | None = None, **overrides) -> Data2VecPretrainer:
    """A pretrainer on a tiny student (``model``: its config overrides), ``overrides`` on the preset."""
    student = build_student(modality, kind, **(model or {}))
    return Data2VecPretrainer(student, config_for(modality, **overrides), mask_token_id=MASK_TOKEN)


# -- targets against hooks on a float64 transformers copy of the teacher --------------------------


def _normalised(x: torch.Tensor, norm: str, valid: torch.Tensor | None) -> torch.Tensor:
    keep = torch.ones(x.shape[:2], dtype=torch.bool) if valid is None else valid
    keep = keep[..., None]
    if norm == "layer":
        y = F.layer_norm(x, x.shape[-1:], eps=1e-5)
    elif norm == "instance":
        count = keep.sum(dim=1, keepdim=True)
        mean = (x * keep).sum(dim=1, keepdim=True) / count
        var = ((x - mean) ** 2 * keep).sum(dim=1, keepdim=True) / count
        y = (x - mean) / torch.sqrt(var + 1e-5)
    else:
        y = x
    return y * keep


def hook_targets(model, modality, batch, *, top_k, layer_norm, target_norm, valid):
    """What the method defines, computed on its own: forward hooks collect the top-K FFN outputs
    before the last residual (vision: times lambda_2, CLS dropped), normalise, average, normalise."""
    layers = (model.encoder.layers if modality == "audio" else model.encoder.layer)[-top_k:]
    outputs = []

    def collect(layer):
        def hook(module, args, output):
            if modality == "vision":
                output = (output * layer.lambda_2)[:, 1:]
            outputs.append(output)

        module = {"audio": "feed_forward", "vision": "output", "text": "output"}[modality]
        module = getattr(layer, module)
        return (module.dense if modality == "text" else module).register_forward_hook(hook)

    handles = [collect(layer) for layer in layers]
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    mean = sum(_normalised(out, layer_norm, valid) for out in outputs) / top_k
    return _normalised(mean, target_norm, valid)


def _frame_valid(model, modality, batch):
    if modality == "audio":
        frames = model._get_feat_extract_output_lengths(torch.tensor(batch["input_values"].shape[-1]))
        return model._get_feature_vector_attention_mask(int(frames), batch["attention_mask"])
    return batch["attention_mask"].bool() if modality == "text" else None


@pytest.mark.parametrize(
    "modality,kind,overrides",
    [
        ("audio", "fused", dict(instance_norm_targets=True)),
        ("vision", "fused", {}),
        ("text", "fused", {}),
        ("text", "transformers", dict(layer_norm_target_layer=False, instance_norm_target_layer=True)),
    ],
)
def test_targets_match_float64_hooks(modality, kind, overrides):
    pre = pretrainer(modality, kind, **overrides)
    config = pre.config
    batch = inputs(modality, pre.student.config)
    with d2v_kernels.record_dispatch() as calls:
        targets = pre.targets(**batch)
    final = config.target_norm_mode != "none"
    assert sum(n for (op, _), n in calls.items() if op == "accumulate_target") == config.average_top_k_layers + final

    reference = {}
    for dtype in (torch.float64, torch.float32):
        hf_config = copy.deepcopy(pre.student.config)
        hf_config._attn_implementation = "eager"
        model = getattr(transformers, CLASS[modality])(hf_config)
        model.load_state_dict(pre.teacher.state_dict())
        model.to(dtype).eval()
        batch_d = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
        reference[dtype] = hook_targets(
            model,
            modality,
            batch_d,
            top_k=config.average_top_k_layers,
            layer_norm=config.layer_norm_mode,
            target_norm=config.target_norm_mode,
            valid=_frame_valid(model, modality, batch),
        )
    assert targets.dtype == torch.float32 and targets.shape == reference[torch.float64].shape
    testing.assert_close_to_reference(targets, reference[torch.float64], reference[torch.float32], name="targets")
    valid = _frame_valid(pre.student, modality, batch)
    if valid is not None:
        assert not valid.all() and (targets[~valid] == 0).all()


# -- EMA ------------------------------------------------------------------------------------------


def test_ema_step_exact_update_shared_modules_untouched():
    pre = pretrainer("audio", ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=4)
    student, teacher = pre.student, pre.teacher
    assert teacher.feature_extractor is student.feature_extractor
    assert teacher.encoder.pos_conv_embed is student.encoder.pos_conv_embed
    assert teacher.encoder.layers[0] is not student.encoder.layers[0]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    shared = {id(p) for m in (student.feature_extractor, student.feature_projection) for p in m.parameters()}
    shared |= {id(p) for p in student.encoder.pos_conv_embed.parameters()}
    before = {n: p.detach().double().clone() for n, p in teacher.named_parameters()}
    decay = pre.ema_decay
    assert decay == 0.9
    pre.ema_step()
    students = dict(student.named_parameters())
    own = 0
    for name, p in teacher.named_parameters():
        if id(p) in shared:
            assert p is students[name]
            torch.testing.assert_close(p.double(), before[name], rtol=0, atol=0)
            continue
        own += 1
        assert not p.requires_grad
        expected = decay * before[name] + (1 - decay) * students[name].double()
        torch.testing.assert_close(p.double(), expected, rtol=1e-6, atol=1e-7)
    assert own > 0 and pre.ema_updates == 1


def test_ema_schedule_end_points():
    assert annealed_decay(0.999, 0.9999, 0, 100) == 0.999
    assert annealed_decay(0.999, 0.9999, 100, 100) == 0.9999
    assert annealed_decay(0.999, 0.9999, 1000, 100) == 0.9999
    assert math.isclose(annealed_decay(0.999, 0.9999, 50, 100), 0.99945)
    pre = pretrainer("text", ema_decay=0.5, ema_end_decay=0.9, ema_anneal_end_step=4, ema_transformer_only=False)
    seen = []
    for _ in range(6):
        seen.append(pre.ema_decay)
        pre.ema_step()
    torch.testing.assert_close(torch.tensor(seen), torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 0.9]), rtol=0, atol=1e-12)
    # Nothing shared: the embeddings are the teacher's own and averaged.
    assert pre.teacher.embeddings is not pre.student.embeddings


# -- loss and gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_loss_matches_independent_computation(beta):
    pre = pretrainer("audio", loss_beta=beta)
    pre.train()
    batch = inputs("audio", pre.student.config)
    out = pre(**batch)
    mask = out.mask.clone()
    # The caller's mask gives the same loss; computed here from the student, head and targets.
    again = pre(**batch, mask_time_indices=mask)
    targets = pre.targets(**batch)[mask].double()
    hidden = pre.student(**batch, mask_time_indices=mask).last_hidden_state
    predictions = pre.regression_head(hidden[mask]).double()
    diff = predictions - targets
    if beta == 0:
        per_element = diff**2
    else:
        per_element = torch.where(diff.abs() < beta, 0.5 * diff**2 / beta, diff.abs() - 0.5 * beta)
    expected = per_element.sum() / math.sqrt(diff.shape[-1]) / diff.shape[0]
    for result in (out, again):
        torch.testing.assert_close(result.loss.double(), expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(result.target_var.double(), (targets.var(0) + 1e-6).sqrt().mean(), rtol=1e-5, atol=0)
        assert result.sample_size == int(mask.sum()) > 0
    # Padded frames are never masked.
    valid = _frame_valid(pre.student, "audio", batch)
    assert not (mask & ~valid).any()

    again.loss.backward()
    assert all(p.grad is None for n, p in pre.teacher.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pre.regression_head.parameters())
    assert pre.student.encoder.layers[-1].feed_forward.output_dense.weight.grad.abs().sum() > 0


# -- training -------------------------------------------------------------------------------------


def _train(pre, batches, steps, optimizer=None, lr=3e-3):
    if optimizer is None:
        params = [p for p in pre.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
    history = []
    for step in range(steps):
        out = pre(**batches[step % len(batches)])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        pre.ema_step()
        history.append((out.loss.detach(), out.target_var.item()))
    return history, optimizer


def _sentences(config, count: int, seed: int) -> list[dict]:
    """Batches of 'sentences' from a tiny grammar: words are fixed runs of token ids."""
    gen = torch.Generator().manual_seed(seed)
    words = [
        torch.randint(5, config.vocab_size, (int(n),), generator=gen) for n in torch.randint(1, 4, (12,), generator=gen)
    ]
    batches = []
    for _ in range(count):
        rows = []
        for _ in range(4):
            picks = torch.randint(len(words), (6,), generator=gen)
            rows.append(torch.cat([torch.tensor([0]), *(words[i] for i in picks), torch.tensor([2])])[:20])
        length = max(len(r) for r in rows)
        ids = torch.full((4, length), 1)
        mask = torch.zeros(4, length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _tones(count: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(1601) / 16000
    batches = []
    for _ in range(count):
        freq = 200 + 600 * torch.rand(4, 1, generator=gen)
        wave = torch.sin(2 * math.pi * freq * t) + 0.1 * torch.randn(4, 1601, generator=gen)
        batches.append({"input_values": wave, "attention_mask": torch.ones(4, 1601, dtype=torch.long)})
    return batches


def _shapes(count: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(56.0), torch.arange(56.0), indexing="ij")
    batches = []
    for _ in range(count):
        centre = 14 + 28 * torch.rand(4, 2, 1, 1, generator=gen)
        disc = ((y - centre[:, 0]) ** 2 + (x - centre[:, 1]) ** 2 < 100).float()
        pixels = disc[:, None].expand(4, 3, 56, 56) + 0.1 * torch.randn(4, 3, 56, 56, generator=gen)
        batches.append({"pixel_values": pixels})
    return batches


@pytest.mark.parametrize(
    "modality",
    ["text", pytest.param("audio", marks=pytest.mark.slow), pytest.param("vision", marks=pytest.mark.slow)],
)
def test_fifty_steps_lower_the_loss_without_collapse(modality):
    small = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2)  # 50 steps within the CI budget
    pre = pretrainer(modality, model=small, ema_decay=0.99, ema_end_decay=0.999, ema_anneal_end_step=50)
    pre.train()
    data = {
        "text": lambda: _sentences(pre.student.config, 8, 0),
        "audio": lambda: _tones(8, 0),
        "vision": lambda: _shapes(8, 0),
    }
    history, _ = _train(pre, data[modality](), 50)
    losses = torch.stack([loss for loss, _ in history])
    first, last = losses[:5].mean().item(), losses[-5:].mean().item()
    assert last < 0.7 * first, (first, last)
    assert min(var for _, var in history) > 0.1  # fairseq's min_target_var


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    batches = _sentences(testing.text_config(**TINY), 3, seed=5)
    overrides = dict(ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=4)
    pre = pretrainer("text", **overrides)
    pre.train()
    torch.manual_seed(7)
    uninterrupted, _ = _train(pre, batches, 4)

    pre = pretrainer("text", **overrides)
    pre.train()
    torch.manual_seed(7)
    first, optimizer = _train(pre, batches, 2)
    path = tmp_path / "checkpoint.pt"
    torch.save({"pre": pre.state_dict(), "opt": optimizer.state_dict(), "rng": torch.get_rng_state()}, path)
    assert not any(k.startswith("teacher.embeddings.") for k in pre.state_dict())

    resumed = Data2VecPretrainer(
        build_student("text", seed=3), config_for("text", **overrides), mask_token_id=MASK_TOKEN
    )
    resumed.train()
    state = torch.load(path, weights_only=False)
    resumed.load_state_dict(state["pre"])
    assert resumed.ema_updates == 2
    optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=3e-3)
    optimizer.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    second, _ = _train(resumed, batches[2:] + batches[:2], 2, optimizer)
    assert [loss.item() for loss, _ in first + second] == [loss.item() for loss, _ in uninterrupted]


def test_save_pretrained_round_trip(tmp_path):
    pre = pretrainer("vision")
    pre.save_pretrained(tmp_path)
    loaded = transformers.Data2VecVisionModel.from_pretrained(tmp_path)
    expected = pre.student.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


# -- masks ----------------------------------------------------------------------------------------


def test_sampled_masks_reproducible_and_within_bounds():
    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        valid = torch.ones(3, 60, dtype=torch.bool)
        valid[-1, 41:] = False
        audio = audio_span_mask(3, 60, mask_prob=0.65, mask_length=5, generator=g, valid=valid)
        vision = block_mask(3, 7, 9, mask_prob=0.6, min_block=4, generator=g)
        eligible = valid.clone()
        eligible[:, 0] = False
        text = token_span_mask(eligible, mask_prob=0.35, span=4, generator=g)
        return valid, eligible, audio, vision, text

    valid, eligible, audio, vision, text = draws(0)
    for a, b in zip(draws(0)[2:], (audio, vision, text)):
        assert torch.equal(a, b)
    assert not any(torch.equal(a, b) for a, b in zip(draws(1)[2:], (audio, vision, text)))
    assert not (audio & ~valid).any() and audio.any(dim=1).all()
    assert vision.shape == (3, 63) and (vision.sum(dim=1) == round(0.6 * 63)).all()
    assert not (text & ~eligible).any() and text.any(dim=1).all()
    share = text.sum() / eligible.sum()
    assert 0.15 < share < 0.5


# -- wrappers, autocast, checkpointing ------------------------------------------------------------


def test_gradient_checkpointing_same_loss_and_grads_autocast_bf16_runs():
    batch = _sentences(testing.text_config(**TINY), 1, seed=2)[0]
    results = []
    for checkpointing in (False, True):
        pre = pretrainer("text")
        if checkpointing:
            enable = getattr(pre.student, "activation_checkpointing_enable", None)
            (enable or pre.student.gradient_checkpointing_enable)()
        pre.train()
        out = pre(**batch)
        out.loss.backward()
        results.append((out.loss.detach(), pre.student.encoder.layer[0].output.dense.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)

    pre = pretrainer("text")
    pre.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pre(**batch)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.detach(), results[0][0], rtol=0.05, atol=0)


def test_ddp_wrapped_student(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        student = build_student("text")
        plain = Data2VecPretrainer(copy.deepcopy(student), config_for("text"), mask_token_id=MASK_TOKEN)
        wrapped = Data2VecPretrainer(
            torch.nn.parallel.DistributedDataParallel(student), config_for("text"), mask_token_id=MASK_TOKEN
        )
        assert wrapped.student is student and type(wrapped.teacher) is type(student)
        wrapped.regression_head.load_state_dict(plain.regression_head.state_dict())
        batch = _sentences(student.config, 1, seed=4)[0]
        for pre in (plain, wrapped):
            pre.train()
        a, b = plain(**batch), wrapped(**batch)
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
        b.loss.backward()
        assert student.encoder.layer[0].output.dense.weight.grad is not None
        with torch.no_grad():
            student.encoder.layer[0].output.dense.weight.add_(1.0)
        wrapped.ema_step()
        own = wrapped.teacher.encoder.layer[0].output.dense.weight
        torch.testing.assert_close(
            own, plain.teacher.encoder.layer[0].output.dense.weight + (1 - config_for("text").ema_decay)
        )
    finally:
        dist.destroy_process_group()


# -- bad input ------------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="student"):
        Data2VecPretrainer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="average_top_k_layers"):
        Data2VecPretrainer(build_student("text"), PretrainingConfig.for_text(average_top_k_layers=9))
    with pytest.raises(ValueError, match="mask token"):
        Data2VecPretrainer(build_student("vision", use_mask_token=False), config_for("vision"))
    with pytest.raises(ValueError, match="mask_time_prob"):
        Data2VecPretrainer(build_student("audio", mask_time_prob=0.0), config_for("audio"))
    for field, value in [("ema_decay", 1.5), ("loss_beta", -1.0), ("mask_prob", 0.0), ("loss_scale", 0.0)]:
        with pytest.raises(ValueError, match=field):
            PretrainingConfig(**{field: value})
    with pytest.raises(TypeError, match="head_layers"):
        PretrainingConfig(head_layers=1.5)
    with pytest.raises(ValueError, match="at most one"):
        PretrainingConfig(instance_norm_target_layer=True, layer_norm_target_layer=True)

    pre = Data2VecPretrainer(build_student("text"), config_for("text"))
    batch = inputs("text", pre.student.config)
    with pytest.raises(ValueError, match="mask_token_id"):
        pre(**batch)
    with pytest.raises(ValueError, match="pixel_values"):
        pre(**batch, pixel_values=torch.zeros(1))
    with pytest.raises(ValueError, match="masked_positions"):
        pre(**batch, masked_positions=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks padded"):
        pre(**batch, masked_positions=torch.ones(2, 13, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks no position"):
        pre(**batch, masked_positions=torch.zeros(2, 13, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_time_indices"):
        pre(**batch, mask_time_indices=torch.zeros(2, 13, dtype=torch.bool))
