"""One check of everything the CUDA path promises, on a machine with one GPU, ending in one summary table.

Each row is a check that passes only if its counts equal a float64 recount (or its own assertions hold):

1. ``tests/test_cuda.py`` (a bf16 model measured on the GPU; a Trainer run in bf16);
2. detection at 4096 x 4096 with the bases on the CPU (pinned) and on the GPU, against one fp32 full SVD on the GPU,
   every count compared with float64 (``bench_detection.run_case``: the protocol of ``bench_detection.py``);
3. ``bench_llama.py`` on 2 Llama-3-8B-shaped decoder layers (14 matrices up to 14336 x 4096): runs, no layer fails;
4. the background snapshot with TF32 on (``allow_tf32`` for cuBLAS and cuDNN): layers pending while it runs, then
   counts equal to a float64 recount, CPU bases pinned;
5. a QLoRA SFT (nf4, ``bnb_4bit_quant_storage=bfloat16`` as FSDP-QLoRA stores it) of a tiny random-init Llama built
   from a config (no download), a few Trainer steps with the callback: the last report's counts equal a float64
   recount on the weights bitsandbytes dequantizes.

On a GPU (the intended use; the script has not been run on one yet)::

    python benchmarks/gpu_check.py

Every part that can also runs on CPU, at small sizes, to exercise the code paths (row 1 is then skipped by pytest,
row 3 left out: one Llama-shaped layer takes 5-10 minutes on CPU)::

    python benchmarks/gpu_check.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from bench_detection import run_case  # noqa: E402
from helpers import RandomTokens, reference_counts, tiny_bert  # noqa: E402

from lora_spectral_callback import LoRASpectralCallback, SpectralMonitor  # noqa: E402

EPSILONS = [0.5, 0.3, 0.7]


def pytest_cuda(args: argparse.Namespace) -> tuple[str, bool]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = done.stdout.strip().splitlines()
    return (lines[-1] if lines else done.stderr.strip()[-200:]), done.returncode == 0


def detection(basis_device: str) -> Callable[[argparse.Namespace], tuple[str, bool]]:
    def check(args: argparse.Namespace) -> tuple[str, bool]:
        options = {"seed": 0, "drift": 0.05, "basis_dtype": "float16", "repeats": 3, "baseline_repeats": 1}
        case = argparse.Namespace(device=args.device, basis_device=basis_device, **options)
        r = run_case(512 if args.quick else 4096, 0.1, case)
        result = (
            f"counts 0.3/0.5/0.7 {r['counts']}; fp32 SVD {r['base_s']:.2f} s (= float64: {r['base_ok']}), "
            f"warm {r['warm_s']:.3f} s, cold {r['cold_s']:.3f} s (= float64: {r['warm_ok']}, {r['cold_ok']})"
        )
        return result, r["warm_ok"] and r["cold_ok"]

    return check


def llama(args: argparse.Namespace) -> tuple[str, bool]:
    command = [sys.executable, "benchmarks/bench_llama.py", "--layers", "2", "--device", args.device]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    total = [line for line in done.stdout.splitlines() if line.startswith("| **one layer**")]
    ok = done.returncode == 0 and "(not converged)" not in done.stdout
    return (total[0] if total else done.stderr.strip()[-200:]), ok


def background_snapshot_tf32(args: argparse.Namespace) -> tuple[str, bool]:
    from peft import LoraConfig, get_peft_model
    from test_callback import weights_by_name
    from test_layers import randomize_lora

    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cpu_previous = torch.backends.mkldnn.matmul.fp32_precision  # on CPU: oneDNN's TF32 (where the CPU has it)
    torch.backends.mkldnn.matmul.fp32_precision = "tf32"
    try:
        model = get_peft_model(tiny_bert(hidden=128 if args.quick else 512), LoraConfig(r=8, target_modules=["query"]))
        randomize_lora(model, scale=0.1, seed=11)
        model = model.to(args.device, torch.bfloat16)
        monitor = SpectralMonitor(model, epsilon=EPSILONS, exact_below=0, basis_device="cpu", progress=False)
        monitor.snapshot(wait=False)
        during = monitor.measure(0)
        monitor.snapshot()  # waits for it
        report = monitor.measure(1)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
        torch.backends.mkldnn.matmul.fp32_precision = cpu_previous
    bases = [state.basis for state in monitor.snapshots.layers.values() if state.basis is not None]
    pinned = all(b.is_pinned() for b in bases) if args.device.startswith("cuda") else True
    base, merged = weights_by_name(model.to("cpu"))
    totals, per_layer = reference_counts(base, merged, EPSILONS)
    ok = not report.errors and {n: r.intruders for n, r in report.layers.items()} == per_layer and pinned
    result = (
        f"{len(during.pending)} of {len(monitor.matrices)} layers pending during the snapshot; counts 0.5 "
        f"{report.intruders_total} (float64 {totals[0.5]}); {report.uncertain} uncertain, bases pinned: {pinned}"
    )
    return result, ok


def qlora_sft(args: argparse.Namespace) -> tuple[str, bool]:
    from bitsandbytes.functional import dequantize_4bit
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    hidden = 128 if args.quick else 512
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    on_gpu = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as path:
        LlamaForCausalLM(config).save_pretrained(path)
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_quant_storage=torch.bfloat16,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        base = LlamaForCausalLM.from_pretrained(
            path, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": args.device}
        )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    with tempfile.TemporaryDirectory() as out:
        callback = LoRASpectralCallback(every_n_steps=4, epsilon=EPSILONS, progress=False)
        training = TrainingArguments(
            output_dir=out,
            max_steps=8,
            learning_rate=1e-2,
            per_device_train_batch_size=8,
            save_strategy="no",
            report_to=[],
            bf16=on_gpu,
            use_cpu=not on_gpu,
            disable_tqdm=True,
        )
        Trainer(model=model, args=training, train_dataset=RandomTokens(causal=True), callbacks=[callback]).train()
    report = callback.last_report
    assert report is not None
    weights, merged = {}, {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A"):
            W = module.get_base_layer().weight
            weights[name] = dequantize_4bit(W.data, W.quant_state).double().cpu()
            merged[name] = weights[name] + module.get_delta_weight("default").double().cpu()
    assert all(
        W.dtype == torch.bfloat16 for W in (m.get_base_layer().weight for m in model.modules() if hasattr(m, "lora_A"))
    )
    totals, per_layer = reference_counts(weights, merged, EPSILONS)
    ok = not report.errors and {n: r.intruders for n, r in report.layers.items()} == per_layer
    result = f"{len(per_layer)} layers; counts 0.5 {report.intruders_total} (float64 {totals[0.5]}); errors {len(report.errors)}"
    return result, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (detection at 512, tiny models)")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if on_gpu else f"{torch.get_num_threads()} CPU threads"
    print("$ python " + " ".join(sys.argv))
    print(f"torch {torch.__version__}, {where}", flush=True)
    checks: dict[str, Callable[[argparse.Namespace], tuple[str, bool]]] = {
        "tests/test_cuda.py": pytest_cuda,
        "detection, bases on CPU": detection("cpu"),
        f"detection, bases on {args.device}": detection(args.device),
        "bench_llama.py, 2 layers": llama,
        "background snapshot, TF32 on": background_snapshot_tf32,
        "QLoRA SFT (nf4, bf16 storage)": qlora_sft,
    }
    if not on_gpu:
        del checks[f"detection, bases on {args.device}"], checks["bench_llama.py, 2 layers"]
    rows = []
    for name, check in checks.items():
        t0 = time.perf_counter()
        try:
            result, ok = check(args)
        except Exception as err:  # a failing check is a row, not the end of the others
            result, ok = f"{type(err).__name__}: {err}"[:200], False
        rows.append((name, result.replace("|", "/"), ok, time.perf_counter() - t0))
        print(f"{name}: {'ok' if ok else 'FAILED'} ({rows[-1][3]:.0f} s)", flush=True)
    print()
    print("| check | result | ok | s |")
    print("|---|---|---|---:|")
    for name, result, ok, seconds in rows:
        print(f"| {name} | {result} | {'yes' if ok else 'NO'} | {seconds:.0f} |")
    sys.exit(0 if all(ok for _, _, ok, _ in rows) else 1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
