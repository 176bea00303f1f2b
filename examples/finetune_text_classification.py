"""Fine-tune Data2VecTextForSequenceClassification with the transformers Trainer after
``d2v_kernels.optimize(model)``, on a synthetic sentiment task: a sentence of random words is
positive when it holds more positive than negative words. The word vocabulary is built here (no
tokenizer download); the model is randomly initialised from a config.

    python examples/finetune_text_classification.py              # tiny on a CPU, base on a GPU
    python examples/finetune_text_classification.py --size base  # base size, bf16 on a GPU
"""

from __future__ import annotations

import numpy as np
import torch
from _common import parse_args, prepare, train_and_report, training_arguments
from transformers import Data2VecTextConfig, Data2VecTextForSequenceClassification, Trainer

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # RoBERTa order: bos 0, pad 1, eos 2
POSITIVE = ["good", "great", "fine", "happy", "bright", "calm", "kind", "warm"]
NEGATIVE = ["bad", "awful", "sad", "dark", "cold", "rude", "angry", "poor"]
NEUTRAL = ["the", "a", "day", "was", "and", "it", "very", "cat", "house", "road", "today", "we"]
VOCAB = {word: i for i, word in enumerate(SPECIAL + POSITIVE + NEGATIVE + NEUTRAL)}
MAX_WORDS = 20

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def make_examples(count: int, seed: int) -> list[dict]:
    """Sentences of 4..MAX_WORDS words with a clear majority of positive or negative words."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        label = int(rng.integers(2))
        majority, minority = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
        n_minority = int(rng.integers(0, 3))
        n_majority = n_minority + int(rng.integers(1, 4))
        n_neutral = int(rng.integers(1, MAX_WORDS - n_majority - n_minority + 1))
        words = list(rng.choice(majority, n_majority)) + list(rng.choice(minority, n_minority))
        words += list(rng.choice(NEUTRAL, n_neutral))
        rng.shuffle(words)
        ids = [VOCAB["<s>"], *(VOCAB[w] for w in words), VOCAB["</s>"]]
        examples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(label)})
    return examples


def collate(batch: list[dict]) -> dict:
    """Pads to the longest sentence of the batch (right padding, attention mask 0 on padding)."""
    length = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), length), VOCAB["<pad>"])
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        input_ids[row, : len(item["input_ids"])] = item["input_ids"]
        attention_mask[row, : len(item["input_ids"])] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.stack([b["labels"] for b in batch]),
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], tiny_steps=200, base_steps=300)
    torch.manual_seed(args.seed)
    config = Data2VecTextConfig(
        vocab_size=len(VOCAB),
        max_position_embeddings=MAX_WORDS + 4,  # positions start after the padding index
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
        **(TINY if args.size == "tiny" else BASE),
    )
    model = prepare(Data2VecTextForSequenceClassification(config), args)
    train, evaluation = make_examples(2000, args.seed), make_examples(64, args.seed + 1)
    training_args = training_arguments(args, batch_size=16, learning_rate=2e-3 if args.size == "tiny" else 5e-5)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collate)
    _, logits = train_and_report(trainer, evaluation)
    labels = torch.stack([item["labels"] for item in evaluation])
    print(f"eval accuracy: {(logits.argmax(-1) == labels).float().mean().item():.3f}")


if __name__ == "__main__":
    main()
