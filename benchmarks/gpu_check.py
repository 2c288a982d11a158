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
   recount on the weights bitsandbytes dequantizes;
6. training overhead on a SmolLM2-135M-shaped Llama (random init from its config: 30 layers, LoRA r=16 on the 210
   linear layers, bf16, 8 x 256 random tokens per step), ``--overhead-steps`` Trainer steps without the callback,
   with it (``every_n_steps=50``) and with ``asynchronous=True``, in one process: wall times and the time spent
   inside the callback's Trainer events;
7. a profile (``torch.profiler``, CPU and CUDA) of one cold and one warm measurement of a Llama-3-8B-shaped q_proj
   (4096 x 4096, bf16, LoRA r=16, ``bench_llama.py``'s adapters): the operators that take the time, with the
   layer's solver steps and float64-resolved decisions; for a decision the float64 pass settled, what the working
   precision's solve left (its steps, whether it converged, each vector's error bound against its distance to the
   nearest threshold), which says why it was left open;
8. the same q_proj measured with each of the solver's small dense decompositions (``eigh``, ``eigvalsh``, ``svd``)
   left on the device instead of LAPACK (``lapack.on_cpu``), and the orthogonality and residual of the device's
   float32 ``eigh`` on one of its Rayleigh-Ritz Gram matrices: why they stay on LAPACK.

On a GPU (the intended use; results of a run on an H200 in docs/performance.md, "GPU check")::

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
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from bench_detection import run_case  # noqa: E402
from helpers import RandomTokens, reference_counts, tiny_bert  # noqa: E402

from lora_spectral_callback import LoRASpectralCallback, SpectralMonitor  # noqa: E402
from lora_spectral_callback.products import reduced_bits  # noqa: E402

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
    print(done.stdout, flush=True)  # the per-kind tables, for the timings page
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


def smollm2_shaped_overhead(args: argparse.Namespace) -> tuple[str, bool]:
    from bench_llama import KINDS
    from bench_training_overhead import timed_callback
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    small = args.quick or not args.device.startswith("cuda")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=4 if small else 30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    steps, batch, length = (4, 2, 32) if small else (args.overhead_steps, 8, 256)
    data = RandomTokens(n=steps * batch, length=length, vocab=config.vocab_size, causal=True)

    def train(callback) -> float:
        torch.manual_seed(0)
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, lora_alpha=32, target_modules=list(KINDS)))
        on_gpu = args.device.startswith("cuda")
        with tempfile.TemporaryDirectory() as out:
            training = TrainingArguments(
                output_dir=out,
                max_steps=steps,
                learning_rate=1e-3,
                per_device_train_batch_size=batch,
                save_strategy="no",
                logging_strategy="no",
                report_to=[],
                bf16=on_gpu,
                use_cpu=not on_gpu,
                disable_tqdm=True,
            )
            trainer = Trainer(model=model, args=training, train_dataset=data, callbacks=[callback] if callback else [])
            if on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainer.train()
            if on_gpu:
                torch.cuda.synchronize()
            return time.perf_counter() - t0

    every = 2 if small else 50
    train(None)  # warm-up: CUDA context, kernels, allocator
    without = train(None)
    parts = [f"{steps} steps, without {without:.1f} s"]
    ok = True
    for asynchronous in (False, True):
        callback = timed_callback(every_n_steps=every, progress=False, asynchronous=asynchronous)
        wall = train(callback)
        report = callback.last_report
        ok = (
            ok
            and report is not None
            and not report.errors
            and len(report.layers) == len(KINDS) * config.num_hidden_layers
        )
        label = "async" if asynchronous else "sync"
        last = sum(layer.seconds for layer in report.layers.values()) if report else float("nan")
        parts.append(
            f"{label} {wall:.1f} s ({100 * (wall / without - 1):+.1f} %, inside {callback.inside:.1f} s = "
            f"{100 * callback.inside / without:.1f} %, last measurement {last:.2f} s)"
        )
    return "; ".join(parts), ok


def q_proj_monitor(model: torch.nn.Module) -> SpectralMonitor:
    """A monitor of the Llama-shaped layer's q_proj alone (a 4096² matrix), its snapshot taken."""
    monitor = SpectralMonitor(model, include=r"\.q_proj$", epsilon=EPSILONS, progress=False)
    monitor.snapshot()
    return monitor


def profile_measurement(args: argparse.Namespace) -> tuple[str, bool]:
    from bench_llama import drift, llama_lora, train_adapters
    from torch.profiler import ProfilerActivity, profile

    from lora_spectral_callback import measure

    model = llama_lora(1, args.device, 0)
    monitor = q_proj_monitor(model)
    train_adapters(model, 1.0, 1)
    parts, ok = [], True
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    rough: list[measure.Decomposition] = []
    resolve = measure._resolve

    def spy(matrix, config, left_open, *rest):  # what the working precision left to the float64 pass
        rough.append(left_open)
        return resolve(matrix, config, left_open, *rest)

    for phase in ("cold", "warm"):
        if phase == "warm":
            drift(model, 0.05, 2)
        rough.clear()
        with profile(activities=activities) as prof, mock.patch.object(measure, "_resolve", spy):
            report = monitor.measure(1)
        layer = next(iter(report.layers.values()))
        ok = ok and not report.errors and layer.converged
        parts.append(f"{phase} {layer.seconds:.2f} s, {layer.iterations} steps, {layer.resolved} resolved")
        print(f"--- {phase}: {parts[-1]}")
        for left in rough:
            distance = (left.max_cos[None, :] - torch.tensor(EPSILONS, device=left.max_cos.device)[:, None]).abs()
            print(
                f"left open in {left.svd.U.dtype}: {left.svd.iterations} steps, converged {left.svd.converged}, "
                f"{left.uncertain} uncertain; per vector: max |cos| {fmt(left.max_cos)}, error bound "
                f"{fmt(left.svd.error)}, distance to the nearest ε {fmt(distance.amin(dim=0))}"
            )
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
    return "; ".join(parts), ok


def small_decompositions(args: argparse.Namespace) -> tuple[str, bool]:
    """The 4096² q_proj measurement (cold, then warm after a 5 % drift) with the solver's small dense problems on
    LAPACK (as shipped, ``lapack.on_cpu``) and with each kind left on the device (cuSOLVER on a GPU), and how exactly
    the device's float32 ``eigh`` diagonalizes a Rayleigh-Ritz Gram matrix of that solve."""
    from bench_llama import drift, llama_lora, train_adapters

    from lora_spectral_callback import linalg

    model = llama_lora(1, args.device, 0)
    lapack = linalg.on_cpu
    grams: list[torch.Tensor] = []
    variants = {
        "LAPACK": (),
        "device eigh": (torch.linalg.eigh,),
        "device eigvalsh": (torch.linalg.eigvalsh,),
        "device svd": (torch.linalg.svd,),
        "LAPACK, tall QR on the CPU too": (),
    }
    qr = torch.linalg.qr

    def qr_on_cpu(A, mode="reduced"):
        return type(qr(A[:1, :1]))([t.to(A.device) for t in qr(A.cpu(), mode=mode)])

    parts: list[str] = []
    counts: dict[str, set] = {"cold": set(), "warm": set()}
    for name, on_device in variants.items():

        def small(decomposition, A, on_device=on_device):
            if decomposition is torch.linalg.eigh and not on_device:  # the Gram matrices of the LAPACK run
                grams.append(A.detach().clone())
            return decomposition(A) if decomposition in on_device else lapack(decomposition, A)

        train_adapters(model, 1.0, 1)
        monitor = q_proj_monitor(model)
        row = []
        tall_qr = qr_on_cpu if "tall QR" in name else qr
        with mock.patch.object(linalg, "on_cpu", small), mock.patch.object(torch.linalg, "qr", tall_qr):
            for phase in ("cold", "warm"):
                if phase == "warm":
                    drift(model, 0.05, 2)
                report = monitor.measure(1)
                layer = next(iter(report.layers.values()))
                counts[phase].add(tuple(layer.intruders_by_epsilon.items()))
                row.append(f"{phase} {layer.seconds:.2f} s {layer.iterations} steps {layer.resolved} resolved")
        parts.append(f"{name}: " + ", ".join(row))
        print(parts[-1], flush=True)
    G = max(grams, key=len).double()  # the widest search space
    for where in ("device", "cpu"):
        theta, Y = torch.linalg.eigh(G.float() if where == "device" else G.float().cpu())
        Y, theta = Y.double().to(G.device), theta.double().to(G.device)
        residual = torch.linalg.matrix_norm(G @ Y - Y * theta, 2) / torch.linalg.matrix_norm(G, 2)
        orthogonality = (Y.T @ Y - torch.eye(Y.shape[1], dtype=Y.dtype, device=Y.device)).abs().max()
        parts.append(
            f"float32 eigh on {where} of a {G.shape[0]}² Gram: residual {residual:.1e}, |YᵀY-I| {orthogonality:.1e}"
        )
        print(parts[-1], flush=True)
    return "; ".join(parts), all(len(c) == 1 for c in counts.values())


def fmt(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.2e}" for v in values.tolist()) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (detection at 512, tiny models)")
    parser.add_argument("--overhead-steps", type=int, default=300, help="Trainer steps of the overhead row")
    parser.add_argument("--only", nargs="+", help="run only the checks whose names start with these")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if on_gpu else f"{torch.get_num_threads()} CPU threads"
    products = reduced_bits(torch.device(args.device))
    print("$ python " + " ".join(sys.argv))
    print(f"torch {torch.__version__}, {where}, float32 products: {products or 'IEEE'} bits", flush=True)
    checks: dict[str, Callable[[argparse.Namespace], tuple[str, bool]]] = {
        "small decompositions, LAPACK vs device": small_decompositions,
        "profile of a 4096² measurement": profile_measurement,
        "tests/test_cuda.py": pytest_cuda,
        "detection, bases on CPU": detection("cpu"),
        f"detection, bases on {args.device}": detection(args.device),
        "bench_llama.py, 2 layers": llama,
        "background snapshot, TF32 on": background_snapshot_tf32,
        "QLoRA SFT (nf4, bf16 storage)": qlora_sft,
        "SmolLM2-shaped training overhead": smollm2_shaped_overhead,
    }
    if not on_gpu:
        del checks[f"detection, bases on {args.device}"], checks["bench_llama.py, 2 layers"]
    if args.only:
        checks = {name: check for name, check in checks.items() if name.startswith(tuple(args.only))}
    rows = []
    for name, check in checks.items():
        t0 = time.perf_counter()
        try:
            result, ok = check(args)
        except Exception as err:  # a failing check is a row, not the end of the others
            result, ok = f"{type(err).__name__}: {err}"[:200], False
        rows.append((name, result.replace("|", "/"), ok, time.perf_counter() - t0))
        print(f"{name}: {'ok' if ok else 'FAILED'} ({rows[-1][3]:.0f} s): {result}", flush=True)
    print()
    print("| check | result | ok | s |")
    print("|---|---|---|---:|")
    for name, result, ok, seconds in rows:
        print(f"| {name} | {result} | {'yes' if ok else 'NO'} | {seconds:.0f} |")
    sys.exit(0 if all(ok for _, _, ok, _ in rows) else 1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
