"""Data2Vec self-supervised (continued) pre-training with ``d2v_kernels.pretraining``: an EMA teacher
gives layer-averaged targets, the student regresses them from a masked view.

The student is a Data2Vec{Audio,Vision,Text}Model loaded from ``--checkpoint`` (a transformers
checkpoint directory: continued pre-training on new data) or built from a config (``--size tiny``:
a CPU run of seconds; ``base``: the base architecture, random weights). The data are made here, as
in the fine-tuning examples (spoken phrases or tones, drawn shapes, generated sentences). Every
``--log-every`` steps it prints the loss, target and prediction variance (fairseq's
``target_var`` / ``pred_var``: a falling target variance is collapse) and the EMA decay; at the end
``save_pretrained`` writes the student for fine-tuning.

    python examples/pretrain.py --modality text                     # tiny on a CPU
    python examples/pretrain.py --modality audio --checkpoint path/to/data2vec-audio-base --steps 1000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import transformers
from finetune_audio_ctc import TINY as AUDIO_TINY
from finetune_audio_ctc import make_examples as spoken_phrases
from finetune_image_classification import TINY as VISION_TINY
from finetune_image_classification import make_examples as drawn_shapes
from finetune_text_classification import TINY as TEXT_TINY
from finetune_text_classification import VOCAB
from finetune_text_classification import make_examples as sentences

import d2v_kernels
from d2v_kernels import models
from d2v_kernels.pretraining import Data2VecPretrainer, PretrainingConfig

MODEL = {"audio": "Data2VecAudioModel", "vision": "Data2VecVisionModel", "text": "Data2VecTextModel"}
MODEL_INPUT = {"audio": "input_values", "text": "input_ids"}
TEXT_MASK_ID = len(VOCAB)  # the sentence vocabulary has no <mask>: one more id
TINY = {
    # mask_time_prob > 0: the audio model then has the masked_spec_embed the student is masked with
    "audio": dict(AUDIO_TINY, mask_time_prob=0.05, layerdrop=0.0),
    "vision": dict(VISION_TINY, num_hidden_layers=4, use_mask_token=True),
    "text": dict(TEXT_TINY, num_hidden_layers=4, vocab_size=TEXT_MASK_ID + 1),
}
BASE = {"audio": dict(mask_time_prob=0.05), "vision": dict(use_mask_token=True), "text": dict()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=tuple(MODEL), default="audio")
    parser.add_argument("--checkpoint", default=None, help="a transformers checkpoint directory to continue from")
    parser.add_argument("--size", choices=("tiny", "base"), default="base" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (4 for tiny audio: a CPU minute)")
    parser.add_argument("--learning-rate", type=float, default=None, help="default 2e-3 (tiny), 5e-4 (base)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="average_top_k_layers (default: the preset, capped by the depth)"
    )
    parser.add_argument("--ema-decay", type=float, default=None, help="default 0.99 for tiny runs, else the preset")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--output-dir", default=None, help="where save_pretrained writes (default: a temporary folder)")
    parser.add_argument("--no-optimize", action="store_true", help="transformers' model instead of the fused one")
    parser.add_argument("--bf16", action="store_true", help="autocast to bf16 (default on a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_student(args) -> torch.nn.Module:
    name = MODEL[args.modality]
    cls = getattr(transformers if args.no_optimize else models, name)
    if args.checkpoint:
        student = cls.from_pretrained(args.checkpoint)
        if args.modality == "vision" and student.embeddings.mask_token is None:
            raise SystemExit("the vision checkpoint has no mask token: its config needs use_mask_token=True")
    else:
        config_class = getattr(transformers, name.replace("Model", "Config"))
        student = cls(config_class(**(TINY if args.size == "tiny" else BASE)[args.modality]))
    return student


def make_batches(args, student) -> list[dict]:
    """About ``4 * batch_size`` examples, batched (right padding where lengths differ)."""
    if args.batch_size is None:
        args.batch_size = 4 if args.modality == "audio" and args.size == "tiny" and not args.checkpoint else 8
    count = 4 * args.batch_size
    if args.modality == "audio":
        items = [item["input_values"] for item in spoken_phrases(count, args.seed)]
    elif args.modality == "vision":
        size = student.config.image_size
        items = [item["pixel_values"] for item in drawn_shapes(count, size, args.seed)]
    else:
        items = [item["input_ids"] for item in sentences(count, args.seed)]
    batches = []
    for start in range(0, count, args.batch_size):
        chunk = items[start : start + args.batch_size]
        if args.modality == "vision":
            batches.append({"pixel_values": torch.stack(chunk)})
            continue
        length = max(len(x) for x in chunk)
        values = torch.full(
            (len(chunk), length), VOCAB["<pad>"] if args.modality == "text" else 0, dtype=chunk[0].dtype
        )
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for row, x in enumerate(chunk):
            values[row, : len(x)], mask[row, : len(x)] = x, 1
        batches.append({MODEL_INPUT[args.modality]: values, "attention_mask": mask})
    return batches


def progress(steps: int):
    """tqdm when installed and printing to a terminal, else a line per log."""
    if not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, unit="step", file=sys.stdout)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student = build_student(args).to(device)
    tiny = args.size == "tiny" and not args.checkpoint
    layers = student.config.num_hidden_layers
    preset = {"audio": PretrainingConfig.for_audio, "vision": PretrainingConfig.for_vision}.get(
        args.modality, PretrainingConfig.for_text
    )()
    overrides = dict(average_top_k_layers=min(args.top_k or preset.average_top_k_layers, layers), seed=args.seed)
    if tiny:
        # A short run: spans fit the tiny inputs; for audio and text the teacher must move within it
        # (vision keeps its preset's slow teacher: with a fast one the tiny vision model collapses on
        # these images within a few dozen steps, its target_var falling towards 0).
        if args.modality != "vision":
            overrides.update(ema_decay=0.99, ema_end_decay=0.999, ema_anneal_end_step=args.steps)
        overrides["mask_length"] = {"audio": 5, "vision": 4, "text": 3}[args.modality]
    if args.ema_decay is not None:
        overrides.update(ema_decay=args.ema_decay, ema_end_decay=max(args.ema_decay, preset.ema_end_decay))
    config = preset.__class__(**{**vars(preset), **overrides})
    pre = Data2VecPretrainer(student, config, mask_token_id=TEXT_MASK_ID if args.modality == "text" else None).to(
        device
    )
    pre.train()
    fused = sum(type(m).__module__.startswith("d2v_kernels") for m in student.modules())
    print(
        f"{type(student).__name__}: {sum(p.numel() for p in student.parameters()) / 1e6:.2f} M parameters, {fused} fused modules"
    )
    print(f"config: {config}")

    batches = make_batches(args, student)
    lr = args.learning_rate or (2e-3 if tiny else 5e-4)
    optimizer = torch.optim.AdamW([p for p in pre.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    bf16 = args.bf16 or device == "cuda"
    bar = progress(args.steps)
    start = time.perf_counter()
    with d2v_kernels.record_dispatch() as calls:
        for step in range(1, args.steps + 1):
            batch = {k: v.to(device) for k, v in batches[(step - 1) % len(batches)].items()}
            decay = pre.ema_decay
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                out = pre(**batch)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            pre.ema_step()
            line = (
                f"step {step:4d}  loss {out.loss.item():.4f}  target_var {out.target_var.item():.4f}  "
                f"pred_var {out.pred_var.item():.4f}  ema_decay {decay:.5f}"
            )
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(line.split("  ", 1)[1])
            if step % args.log_every == 0 or step in (1, args.steps):
                (bar.write if bar is not None else print)(line)
    if bar is not None:
        bar.close()
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s on {device}")
    print("dispatch:", dict(sorted(calls.items())))
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="d2v-pretrain-")
    pre.save_pretrained(output_dir)
    print(f"student saved to {output_dir} ({MODEL[args.modality]}.from_pretrained loads it)")


if __name__ == "__main__":
    main()
