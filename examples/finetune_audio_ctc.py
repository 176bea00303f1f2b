"""Fine-tune Data2VecAudioForCTC with the transformers Trainer after ``d2v_kernels.optimize(model)``
on speech made here: short phrases spoken by ``espeak-ng`` (text to speech, resampled to 16 kHz),
transcribed at the character level. Without ``espeak-ng`` on the PATH the script says so and uses
synthetic tones instead (one pitch per character). The character vocabulary is built here and the
waveform goes in as ``input_values`` directly (no tokenizer or feature-extractor download); the
model is randomly initialised from a config. From random weights CTC needs thousands of steps
to get past emitting only blanks: the tiny run shows the pipeline (loss falls from ~30 to ~3), not a
recogniser; start from a pretrained checkpoint for that.

    python examples/finetune_audio_ctc.py              # tiny on a CPU, base on a GPU
    python examples/finetune_audio_ctc.py --size base  # base size, bf16 on a GPU
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch
from _common import parse_args, prepare, train_and_report, training_arguments
from transformers import Data2VecAudioConfig, Data2VecAudioForCTC, Trainer

SAMPLE_RATE = 16_000
WORDS = ("yes", "no", "up", "down", "left", "right", "go", "stop", "on", "off", "one", "two", "three", "red", "blue")
VOCAB = ["<pad>", "<unk>", "|", *"abcdefghijklmnopqrstuvwxyz'"]  # <pad> is the CTC blank, | between words
CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB)}

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    conv_dim=(32, 32, 32, 32),
    conv_kernel=(10, 4, 4, 2),
    conv_stride=(5, 4, 4, 2),  # 160 samples per frame: 100 frames per second
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    conv_pos_kernel_size=9,
    num_conv_pos_embedding_layers=2,
)
BASE = dict()  # the defaults are the base architecture


def speak(text: str, workdir: Path) -> np.ndarray:
    """``text`` spoken by espeak-ng, float32 at 16 kHz (linear resampling from its 22.05 kHz)."""
    path = workdir / "utterance.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), text], check=True, capture_output=True)
    with wave.open(str(path)) as file:
        rate = file.getframerate()
        audio = np.frombuffer(file.readframes(file.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    times = np.arange(int(len(audio) * SAMPLE_RATE / rate)) / SAMPLE_RATE
    return np.interp(times, np.arange(len(audio)) / rate, audio).astype(np.float32)


def tones(text: str, rng: np.random.Generator) -> np.ndarray:
    """Stand-in speech: 60 ms of one pitch per character, silence between words, some noise."""
    pieces = []
    for char in text:
        t = np.arange(int(0.06 * SAMPLE_RATE)) / SAMPLE_RATE
        if char == " ":
            pieces.append(np.zeros_like(t))
        else:
            pieces.append(np.sin(2 * np.pi * (150 + 40 * CHAR_TO_ID[char]) * t) * np.hanning(len(t)))
    audio = np.concatenate(pieces)
    return (audio + rng.normal(0, 0.02, len(audio))).astype(np.float32)


def make_examples(count: int, seed: int) -> list[dict]:
    """``count`` phrases of 1 to 3 words, their normalised waveforms and character labels."""
    rng = np.random.default_rng(seed)
    use_espeak = shutil.which("espeak-ng") is not None
    if not use_espeak:
        print("note: espeak-ng not found (apt-get install espeak-ng); training on synthetic tones instead of speech")
    examples = []
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(count):
            text = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
            audio = speak(text, Path(workdir)) if use_espeak else tones(text, rng)
            audio = (audio - audio.mean()) / (audio.std() + 1e-7)  # what the feature extractor's do_normalize does
            labels = [CHAR_TO_ID.get(c, CHAR_TO_ID["<unk>"]) for c in text.replace(" ", "|")]
            examples.append({"input_values": torch.from_numpy(audio), "labels": torch.tensor(labels), "text": text})
    return examples


def collate(batch: list[dict]) -> dict:
    """Right-pads the waveforms with zeros (attention mask 0) and the labels with -100."""
    samples = max(len(item["input_values"]) for item in batch)
    chars = max(len(item["labels"]) for item in batch)
    input_values = torch.zeros(len(batch), samples)
    attention_mask = torch.zeros(len(batch), samples, dtype=torch.long)
    labels = torch.full((len(batch), chars), -100)
    for row, item in enumerate(batch):
        input_values[row, : len(item["input_values"])] = item["input_values"]
        attention_mask[row, : len(item["input_values"])] = 1
        labels[row, : len(item["labels"])] = item["labels"]
    return {"input_values": input_values, "attention_mask": attention_mask, "labels": labels}


def greedy_decode(logits: torch.Tensor) -> str:
    """Best path: argmax per frame, merge repeats, drop blanks."""
    ids = torch.unique_consecutive(logits.argmax(-1)).tolist()
    return "".join(VOCAB[i] for i in ids if i != CHAR_TO_ID["<pad>"]).replace("|", " ").strip()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], tiny_steps=200, base_steps=1000)
    torch.manual_seed(args.seed)
    config = Data2VecAudioConfig(
        vocab_size=len(VOCAB),
        pad_token_id=CHAR_TO_ID["<pad>"],
        ctc_loss_reduction="mean",
        ctc_zero_infinity=True,
        **(TINY if args.size == "tiny" else BASE),
    )
    model = prepare(Data2VecAudioForCTC(config), args)
    model.freeze_feature_encoder()  # as in wav2vec2-style CTC fine-tuning
    batch_size = args.batch_size or 8
    train = make_examples(min(400 if args.size == "tiny" else 4000, 4 * batch_size * args.max_steps), args.seed)
    evaluation = make_examples(8, args.seed + 1)
    training_args = training_arguments(args, batch_size=batch_size, learning_rate=2e-3 if args.size == "tiny" else 1e-4)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collate)
    _, logits = train_and_report(trainer, evaluation)
    print(f"reference: {evaluation[0]['text']!r}, greedy CTC decoding: {greedy_decode(logits[0])!r}")


if __name__ == "__main__":
    main()
