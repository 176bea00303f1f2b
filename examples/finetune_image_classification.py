"""Fine-tune Data2VecVisionForImageClassification with the transformers Trainer after
``d2v_kernels.optimize(model)``, on generated images: one shape per class (disc, ring,
horizontal bar, vertical bar) drawn with numpy at a random place, size and colour on a noisy
background. The model is randomly initialised from a config (relative position bias on, as in the
released checkpoints); pixels go in directly, no image processor.

    python examples/finetune_image_classification.py              # tiny on a CPU, base on a GPU
    python examples/finetune_image_classification.py --size base  # 224 x 224, bf16 on a GPU
"""

from __future__ import annotations

import numpy as np
import torch
from _common import parse_args, prepare, train_and_report, training_arguments
from transformers import Data2VecVisionConfig, Data2VecVisionForImageClassification, Trainer

CLASSES = ("disc", "ring", "horizontal bar", "vertical bar")

COMMON = dict(use_relative_position_bias=True, layer_scale_init_value=0.1, use_mean_pooling=True)
TINY = dict(
    image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
)
BASE = dict(image_size=224, patch_size=16)  # the defaults are the base architecture


def draw(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (3, size, size) float32 image: ``shape`` in a random colour on a noisy background."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = rng.uniform(0.35, 0.65, 2)
    r = rng.uniform(0.2, 0.3)
    dy, dx = y - cy, x - cx
    if shape == "disc":
        mask = dy**2 + dx**2 < r**2
    elif shape == "ring":
        mask = np.abs(np.sqrt(dy**2 + dx**2) - r) < 0.06
    elif shape == "horizontal bar":
        mask = (np.abs(dy) < 0.08) & (np.abs(dx) < r * 1.5)
    else:  # vertical bar
        mask = (np.abs(dx) < 0.08) & (np.abs(dy) < r * 1.5)
    image = rng.normal(0.0, 0.1, (3, size, size)).astype(np.float32)
    image[:, mask] += rng.uniform(0.6, 1.0, 3).astype(np.float32)[:, None]
    return image


def make_examples(count: int, size: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(CLASSES), size=count)
    return [
        {"pixel_values": torch.from_numpy(draw(CLASSES[label], size, rng)), "labels": torch.tensor(int(label))}
        for label in labels
    ]


def collate(batch: list[dict]) -> dict:
    return {key: torch.stack([item[key] for item in batch]) for key in ("pixel_values", "labels")}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], tiny_steps=300, base_steps=500)
    torch.manual_seed(args.seed)
    config = Data2VecVisionConfig(
        num_labels=len(CLASSES),
        id2label=dict(enumerate(CLASSES)),
        label2id={name: i for i, name in enumerate(CLASSES)},
        **COMMON,
        **(TINY if args.size == "tiny" else BASE),
    )
    model = prepare(Data2VecVisionForImageClassification(config), args)
    count = 1000 if args.size == "tiny" else 4000
    train = make_examples(count, config.image_size, args.seed)
    evaluation = make_examples(64, config.image_size, args.seed + 1)
    training_args = training_arguments(args, batch_size=16, learning_rate=2e-3 if args.size == "tiny" else 5e-5)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collate)
    _, logits = train_and_report(trainer, evaluation)
    labels = torch.stack([item["labels"] for item in evaluation])
    print(f"eval accuracy: {(logits.argmax(-1) == labels).float().mean().item():.3f}")


if __name__ == "__main__":
    main()
