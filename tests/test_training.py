"""Fine-tuning with optimize()d models: the example scripts, torch.compile without graph breaks in
training mode, gradient checkpointing, bf16 autocast, a frozen feature encoder, convergence step by
step against the plain transformers model, and checkpoint continuation (fp32 on the CPU).

The compile, checkpointing and autocast tests force the Triton backend (the interpreter on the
CPU) on small models, and check that the kernels ran."""

from __future__ import annotations

import copy
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import small_inputs, small_pair

import d2v_kernels.models
from d2v_kernels.models import audio
from d2v_kernels.testing import build_pair, inputs_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ONE_PER_MODALITY = (
    "Data2VecAudioForSequenceClassification",
    "Data2VecVisionForImageClassification",
    "Data2VecTextForSequenceClassification",
)


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread, and two pytest workers then do not fight for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(model, reference, atol=1e-4, rtol=1e-4):
    grads, ref_grads = _grads(model), _grads(reference)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")


def _train_mode(class_name, *models):
    for model in models:
        model.train()
        if class_name.startswith("Data2VecAudio"):
            model.freeze_feature_encoder()


# ---------------------------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    "script",
    ["finetune_audio_ctc.py", "finetune_image_classification.py", "finetune_text_classification.py"],
)
def test_example_tiny_run(script, tmp_path):
    """Each example trains a few steps of its tiny config with the Trainer, optimize()d."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(EXAMPLES / script), "--tiny", "--max-steps", "3", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=170, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    fused = re.search(r"\((tiny), [\d.]+ M parameters\): (\d+) fused modules", output)
    assert fused is not None and int(fused.group(2)) > 0, output[-4000:]
    losses = re.search(r"train loss: first logged ([\d.]+), last logged ([\d.]+)", output)
    assert losses is not None and all(float(v) > 0 for v in losses.groups()), output[-4000:]
    assert "('attention', 'eager')" in output  # the eval pass went through ops.attention (CPU: eager)
    if script == "finetune_audio_ctc.py":
        assert "('conv_feature_extractor', 'eager')" in output and "('pos_conv', 'eager')" in output
        assert "greedy CTC decoding" in output


@pytest.mark.cuda
@pytest.mark.parametrize(
    "script",
    ["finetune_audio_ctc.py", "finetune_image_classification.py", "finetune_text_classification.py"],
)
def test_example_base_run_cuda(script, tmp_path):
    """Base size in bf16 on the GPU, a few steps: the Triton attention ran, the loss is finite."""
    command = [
        sys.executable,
        str(EXAMPLES / script),
        "--size",
        "base",
        "--max-steps",
        "5",
        "--output-dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "(base, " in output and "('attention', 'triton')" in output, output[-4000:]
    assert re.search(r"eval loss: \d", output), output[-4000:]


def test_example_without_espeak_falls_back_to_tones(tmp_path):
    """With no espeak-ng on the PATH the CTC example says so and trains on synthetic tones."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import finetune_audio_ctc
    finally:
        sys.path.remove(str(EXAMPLES))
    env_path = os.environ.get("PATH", "")
    try:
        os.environ["PATH"] = str(tmp_path)  # an empty folder: no espeak-ng
        examples = finetune_audio_ctc.make_examples(3, seed=0)
    finally:
        os.environ["PATH"] = env_path
    assert len(examples) == 3
    for example in examples:
        wave, labels = example["input_values"], example["labels"]
        assert wave.dtype == torch.float32 and wave.numel() > 1000 and wave.std() > 0.5
        assert labels.tolist() == [finetune_audio_ctc.CHAR_TO_ID[c] for c in example["text"].replace(" ", "|")]
    batch = finetune_audio_ctc.collate(examples)
    assert batch["input_values"].shape == batch["attention_mask"].shape
    assert (batch["labels"] == -100).any() or len({len(e["labels"]) for e in examples}) == 1


# ---------------------------------------------------------------------------------------------- compile


def _graph_breaks(model, inputs, launches=None) -> tuple[int, list]:
    """(graph break count, the breaks whose stack passes through d2v_kernels), the Triton backend
    forced; ``launches`` (the triton_launches fixture) counts the explained run's kernels alone."""
    with d2v_kernels.use_backend("triton"):
        with torch.no_grad():
            model(**inputs)  # transformers installs its output-capturing hooks on the first call, under a lock
        torch._dynamo.reset()
        if launches is not None:
            launches.clear()
        explanation = torch._dynamo.explain(model)(**inputs)
    ours = []
    for reason in explanation.break_reasons:
        if _breaks_in_our_code(reason.user_stack[-1]):
            ours.append((str(reason.reason)[:300], [frame.filename for frame in reason.user_stack]))
    return explanation.graph_break_count, ours


def _breaks_in_our_code(frame) -> bool:
    """Whether a graph break's innermost frame is ours: a line of the package, or in audio's
    encoder forward rebuilt from transformers' source, one of the lines put in its place (the
    rest is transformers' code: its layerdrop breaks in releases before 5.2x, in transformers'
    own model too)."""
    if frame.filename.startswith("<d2v_kernels:"):
        return (frame.line or "").strip() in {line.strip() for line in audio._SYNC_FREE_LINES}
    return "d2v_kernels" in frame.filename


def _assert_no_graph_break_of_our_own(reference, fused, inputs, launches) -> int:
    """No break comes from our code and the fused model breaks no more than transformers' own
    (0 with current transformers; older releases break in their layerdrop code in training mode);
    the traced run launched the Triton attention. Returns transformers' count."""
    ref_count, _ = _graph_breaks(reference, inputs)
    count, ours = _graph_breaks(fused, inputs, launches)
    assert launches["attention_fwd_kernel"] > 0, launches
    assert not ours, ours
    assert count <= ref_count, (count, ref_count)
    return ref_count


@pytest.mark.parametrize("class_name", ONE_PER_MODALITY)
def test_compile_training_with_loss_has_no_graph_breaks(class_name, one_thread, triton_launches):
    """Training mode with a loss: no graph break of ours, and the compiled loss and gradients
    (the Triton kernels, forward and backward) equal eager transformers'. (Audio with the feature
    encoder frozen, as for fine-tuning; unfrozen below.)"""
    reference, fused, config = small_pair(class_name)
    _train_mode(class_name, reference, fused)
    inputs = small_inputs(class_name, config)
    ref_breaks = _assert_no_graph_break_of_our_own(reference, fused, inputs, triton_launches)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=ref_breaks == 0, backend="aot_eager")
    triton_launches.clear()
    with d2v_kernels.use_backend("triton"):
        loss = compiled(**inputs).loss
        loss.backward()
    assert {"attention_fwd_kernel", "attention_bwd_dq_kernel", "row_norm_bwd_kernel"} <= set(triton_launches)
    ref_loss = reference(**inputs).loss
    torch.testing.assert_close(loss, ref_loss, atol=2e-5, rtol=1e-5)
    ref_loss.backward()
    _assert_grads_close(fused, reference)


def test_compile_training_unfrozen_audio_has_no_graph_breaks(one_thread, triton_launches):
    class_name = "Data2VecAudioForSequenceClassification"
    reference, fused, config = small_pair(class_name)
    reference.train()
    fused.train()
    _assert_no_graph_break_of_our_own(reference, fused, small_inputs(class_name, config), triton_launches)
    assert triton_launches["conv0_ln_gelu_kernel"] > 0, triton_launches


def test_compile_ctc_breaks_only_in_transformers_ctc_loss(one_thread, triton_launches):
    """CTC's loss (labels.max() check, masked_select of the targets) breaks the graph in transformers
    itself; the fused model adds no break of its own."""
    reference, fused, config = small_pair("Data2VecAudioForCTC")
    _train_mode("Data2VecAudioForCTC", reference, fused)
    inputs = small_inputs("Data2VecAudioForCTC", config)
    _assert_no_graph_break_of_our_own(reference, fused, inputs, triton_launches)
    without_labels = {k: v for k, v in inputs.items() if k != "labels"}
    _assert_no_graph_break_of_our_own(reference, fused, without_labels, triton_launches)


# ---------------------------------------------------------------------------------------------- precision, memory


def _enable_checkpointing(model):
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@pytest.mark.parametrize("class_name", ONE_PER_MODALITY[1:])
def test_gradient_checkpointing(class_name, one_thread):
    """Vision and text with activation checkpointing: the backward reruns each layer's forward
    through the Triton attention; same loss and gradients as transformers."""
    reference, fused, config = small_pair(class_name, num_hidden_layers=2)
    inputs = small_inputs(class_name, config)
    plain = copy.deepcopy(fused)
    for model in (reference, fused, plain):
        model.train()
    for model in (reference, fused):
        _enable_checkpointing(model)
    losses, calls = [reference(**inputs).loss], []
    for model in (fused, plain):
        with d2v_kernels.use_backend("triton"), d2v_kernels.record_dispatch() as counted:
            losses.append(model(**inputs).loss)
            losses[-1].backward()
        calls.append(counted)
    losses[0].backward()
    layers = config.num_hidden_layers
    assert calls[1][("attention", "triton")] == layers, calls[1]
    assert calls[0][("attention", "triton")] == 2 * layers, calls[0]  # the recompute ran the kernel
    assert all(backend == "triton" for counted in calls for _, backend in counted), calls
    torch.testing.assert_close(losses[1], losses[0], atol=2e-5, rtol=1e-5)
    _assert_grads_close(fused, reference)
    _assert_grads_close(fused, plain, atol=1e-6, rtol=1e-6)  # checkpointing changes nothing


@pytest.mark.parametrize(
    "class_name",
    ONE_PER_MODALITY,
)
def test_bf16_autocast_cpu(class_name, one_thread):
    """Under CPU bf16 autocast the fused model runs forward and backward through the Triton kernels,
    and its loss and gradients are as far from fp32 as transformers' own bf16 autocast run (a small
    multiple of it)."""
    reference, fused, config = small_pair(class_name)
    fp32 = copy.deepcopy(reference)
    _train_mode(class_name, reference, fused, fp32)
    inputs = small_inputs(class_name, config)
    exact = fp32(**inputs).loss
    exact.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = reference(**inputs).loss
        with d2v_kernels.use_backend("triton"), d2v_kernels.record_dispatch() as calls:
            loss = fused(**inputs).loss
    ref_loss.backward()
    with d2v_kernels.use_backend("triton"):
        loss.backward()
    assert calls[("attention", "triton")] and calls[("add_layer_norm", "triton")], calls
    assert all(backend == "triton" for _, backend in calls), calls
    ref_error = (ref_loss.float() - exact).abs().item()
    assert (loss.float() - exact).abs().item() <= 3 * ref_error + 5e-3 * exact.abs().item()
    exact_grads, ref_grads, grads = _grads(fp32), _grads(reference), _grads(fused)
    # The floor scales with the whole gradient: a gradient that is zero in exact arithmetic (a key
    # bias's, by softmax's shift invariance) gets the rounding of the terms that cancel into it.
    floor = 1e-5 * torch.cat([g.flatten() for g in exact_grads.values()]).norm().item()
    assert grads.keys() == exact_grads.keys()
    for name, exact_grad in exact_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        ref_error = (ref_grads[name] - exact_grad).norm().item()
        error = (grads[name] - exact_grad).norm().item()
        assert error <= 3 * ref_error + 2e-2 * exact_grad.norm().item() + floor, (name, error, ref_error, floor)


@pytest.mark.cuda
@pytest.mark.parametrize("class_name", ONE_PER_MODALITY)
def test_fp16_autocast_grad_scaler_cuda(class_name):
    """fp16 autocast with a GradScaler on the GPU: a few steps, finite losses that go down."""
    _, fused, config = build_pair(class_name)
    fused = fused.cuda()
    _train_mode(class_name, fused)
    inputs = {k: v.cuda() for k, v in inputs_for(class_name, config).items()}
    optimizer = torch.optim.AdamW(fused.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = fused(**inputs).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_frozen_feature_encoder_stays_fixed_while_training(one_thread):
    """freeze_feature_encoder() on the fused model: the conv stack does not move, the rest trains."""
    _, fused, config = build_pair("Data2VecAudioForCTC")
    fused.train()
    fused.freeze_feature_encoder()
    before = {name: p.detach().clone() for name, p in fused.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in fused.parameters() if p.requires_grad], lr=1e-3)
    inputs = inputs_for("Data2VecAudioForCTC", config)
    for _ in range(2):
        fused(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in fused.named_parameters():
        if ".feature_extractor." in name:
            assert not p.requires_grad and torch.equal(p, before[name]), name
        elif name.endswith("masked_spec_embed"):
            continue  # used only with time masking, which the test config turns off
        else:
            assert not torch.equal(p, before[name]), name


# ---------------------------------------------------------------------------------------------- convergence


def _batches(class_name, config, count):
    """A small fixed task: ``count`` batches whose labels the model must learn to predict."""
    return [inputs_for(class_name, config, batch=4, seed=100 + i) for i in range(count)]


def _loss_curve(model, batches, steps, lr=2e-3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.parametrize(
    ("class_name", "steps"),
    [
        ("Data2VecTextForSequenceClassification", 300),
        ("Data2VecVisionForImageClassification", 150),
        ("Data2VecAudioForSequenceClassification", 150),
    ],
)
def test_convergence_matches_transformers(class_name, steps, one_thread):
    """Same seed, same data, fp32 on the CPU: the optimize()d model's loss curve follows
    transformers' step by step, and the loss drops well below where it started."""
    reference, fused, config = build_pair(class_name)
    _train_mode(class_name, reference, fused)
    batches = _batches(class_name, config, 4)
    ref_curve = _loss_curve(reference, batches, steps)
    curve = _loss_curve(fused, batches, steps)
    torch.testing.assert_close(curve, ref_curve, atol=2e-3, rtol=2e-3)
    assert curve[-4:].mean() < 0.25 * curve[:4].mean(), curve[::10]


@pytest.mark.cuda
def test_convergence_matches_transformers_cuda():
    """On the GPU the kernels round differently from cuBLAS/eager: the curves agree more loosely."""
    class_name = "Data2VecTextForSequenceClassification"
    reference, fused, config = build_pair(class_name)
    reference, fused = reference.cuda().train(), fused.cuda().train()
    batches = [{k: v.cuda() for k, v in b.items()} for b in _batches(class_name, config, 4)]
    ref_curve = _loss_curve(reference, batches, 300)
    with d2v_kernels.record_dispatch() as calls:
        curve = _loss_curve(fused, batches, 300)
    assert calls[("attention", "triton")] > 0, calls
    torch.testing.assert_close(curve, ref_curve, atol=2e-2, rtol=2e-2)
    assert curve[-4:].mean() < 0.25 * curve[:4].mean(), curve[::10]


# ---------------------------------------------------------------------------------------------- checkpoints


def test_manual_checkpoint_continuation(one_thread):
    """state_dict + optimizer state saved mid-training and loaded into a fresh fused model: the
    continued losses and the final weights equal an uninterrupted run's."""
    class_name = "Data2VecAudioForCTC"
    _, fused, config = build_pair(class_name)
    fused.train()
    batches = _batches(class_name, config, 3)
    fresh = copy.deepcopy(fused)

    def steps(model, optimizer, batch_ids):
        losses = []
        for i in batch_ids:
            loss = model(**batches[i]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    optimizer = torch.optim.AdamW(fused.parameters(), lr=1e-3)
    steps(fused, optimizer, [0, 1, 2])
    buffer = io.BytesIO()
    torch.save({"model": fused.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    uninterrupted = steps(fused, optimizer, [0, 1, 2])

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh.load_state_dict(state["model"])
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_optimizer.load_state_dict(state["optimizer"])
    assert steps(fresh, fresh_optimizer, [0, 1, 2]) == uninterrupted
    for (name, p), q in zip(fused.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


class _LossRecordingTrainer(transformers.Trainer):
    """Keeps the loss of every training step (the logs average and round them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss = result[0] if return_outputs else result
        if model.training:
            self.step_losses.append(loss.item())
        return result


def test_trainer_checkpoint_resume_continues_identically(tmp_path, one_thread):
    """Trainer checkpoint at step 4 of 10 (across an epoch boundary, shuffled data, dropout on),
    resumed into a freshly built fused model: steps 5..10 and the final weights equal the
    uninterrupted run's."""
    class_name = "Data2VecTextForSequenceClassification"
    config = build_pair(class_name, hidden_dropout_prob=0.1)[2]
    dataset = []
    for i in range(6):
        batch = inputs_for(class_name, config, batch=4, seed=200 + i)
        dataset += [{k: v[row] for k, v in batch.items()} for row in range(4)]

    def make_trainer(output_dir):
        torch.manual_seed(0)
        model = d2v_kernels.models.Data2VecTextForSequenceClassification(config)
        args = transformers.TrainingArguments(
            output_dir=str(output_dir),
            max_steps=10,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            save_strategy="steps",
            save_steps=4,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            seed=3,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        return _LossRecordingTrainer(model=model, args=args, train_dataset=dataset)

    full = make_trainer(tmp_path / "full")
    full.train()
    assert len(full.step_losses) == 10
    resumed = make_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed.step_losses == full.step_losses[4:]
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
