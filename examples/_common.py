"""Shared plumbing of the fine-tuning examples: command line, TrainingArguments, the final report.

Each example builds its model from a config (``--size tiny``: a few-second CPU run; ``--size base``:
the real Data2Vec base architecture, randomly initialised, trained in bf16 on a GPU), feeds tensors
it makes itself (no hub downloads: no tokenizer, no feature extractor, no weights) and trains with
the transformers ``Trainer`` after ``d2v_kernels.optimize(model)``.
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch
from transformers import Trainer, TrainingArguments

import d2v_kernels


def parse_args(description: str, *, tiny_steps: int, base_steps: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    has_gpu = torch.cuda.is_available()
    parser.add_argument(
        "--size",
        choices=("tiny", "base"),
        default="base" if has_gpu else "tiny",
        help="tiny: a small random config that trains on a CPU in seconds; base: the real base size "
        "(bf16 on a GPU). Default: base with a GPU, tiny without.",
    )
    parser.add_argument("--tiny", dest="size", action="store_const", const="tiny", help="same as --size tiny")
    parser.add_argument("--max-steps", type=int, default=None, help=f"default {tiny_steps} (tiny), {base_steps} (base)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--output-dir", default=None, help="Trainer output folder (default: a temporary one)")
    parser.add_argument("--no-optimize", action="store_true", help="train the plain transformers model")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (TrainingArguments)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.max_steps is None:
        args.max_steps = tiny_steps if args.size == "tiny" else base_steps
    if args.size == "base" and not has_gpu:
        print("note: --size base without a GPU runs in fp32 on the CPU (slow)")
    return args


def prepare(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """``d2v_kernels.optimize(model)`` unless ``--no-optimize``; prints how many modules were swapped."""
    if not args.no_optimize:
        d2v_kernels.optimize(model)
    fused = sum(type(m).__module__.startswith("d2v_kernels") for m in model.modules())
    params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__} ({args.size}, {params / 1e6:.2f} M parameters): {fused} fused modules")
    return model


def training_arguments(args: argparse.Namespace, *, batch_size: int, learning_rate: float) -> TrainingArguments:
    use_gpu = torch.cuda.is_available()
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="d2v-finetune-")
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size or batch_size,
        per_device_eval_batch_size=args.batch_size or batch_size,
        learning_rate=args.learning_rate or learning_rate,
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not use_gpu,
        bf16=use_gpu and args.size == "base",
        torch_compile=args.compile,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )


def train_and_report(trainer: Trainer, eval_dataset) -> tuple[float, torch.Tensor]:
    """Trains, then predicts on ``eval_dataset`` while recording which implementation ran each op.

    Prints the first and last logged training loss, the eval loss and the dispatch counts; returns
    the eval loss and the logits.
    """
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    with d2v_kernels.record_dispatch() as calls:
        prediction = trainer.predict(eval_dataset)
    eval_loss = float(prediction.metrics.get("test_loss", math.nan))
    print(f"train loss: first logged {losses[0]:.4f}, last logged {losses[-1]:.4f}")
    print(f"eval loss: {eval_loss:.4f}")
    print("dispatch:", dict(sorted(calls.items())))
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return eval_loss, torch.as_tensor(logits)
