"""The CUDA path: a bf16 model on the GPU is measured on the GPU in fp32, with counts equal to a float64 CPU recount.
Skipped where there is no GPU (CI); run on a GPU machine with ``python -m pytest tests/test_cuda.py``."""

from __future__ import annotations

import pytest
import torch
from helpers import reference_counts, tiny_bert
from peft import LoraConfig, get_peft_model
from test_callback import RandomTokens, read_scalars, weights_by_name
from test_layers import randomize_lora
from training import make_trainer

from lora_spectral_callback import LoRASpectralCallback, SpectralMonitor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("exact_below", [512, 0], ids=["exact-svd", "iterative"])
def test_bf16_model_on_gpu_matches_float64_recount(exact_below):
    model = get_peft_model(tiny_bert(hidden=256), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    randomize_lora(model, scale=0.1, seed=11)
    model = model.to("cuda", torch.bfloat16)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state()
    report = SpectralMonitor(model, epsilon=[0.5, 0.3, 0.7], exact_below=exact_below, progress=False).measure(0)
    assert torch.equal(torch.get_rng_state(), cpu_rng) and torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert not report.errors
    base, merged = weights_by_name(model.to("cpu"))
    totals, per_layer = reference_counts(base, merged, [0.5, 0.3, 0.7])
    assert report.intruders_total_by_epsilon == {"0.5": totals[0.5], "0.3": totals[0.3], "0.7": totals[0.7]}
    assert {n: r.intruders for n, r in report.layers.items()} == per_layer


def test_trainer_on_gpu(tmp_path):
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    callback = LoRASpectralCallback(every_n_steps=5, log_dir=str(tmp_path / "tb"), progress=False)
    trainer = make_trainer(
        tmp_path / "out",
        model,
        [callback],
        10,
        data=RandomTokens(),
        learning_rate=5e-2,
        use_cpu=False,
        bf16=True,
        seed=42,
    )
    trainer.train()
    scalars, _ = read_scalars(str(tmp_path / "tb"))
    assert sorted(scalars["spectral/intruders_total"]) == [0, 5, 10]
    base, merged = weights_by_name(model.to("cpu"))
    totals, _ = reference_counts(base, merged, [0.5])
    assert scalars["spectral/intruders_total"][10] == totals[0.5]


def test_a_solve_on_the_gpu_takes_the_steps_it_takes_on_the_cpu():
    """The solver stops on CUDA where it stops on a CPU: with cuSOLVER's float32 eigh a 4096² solve once ran its 100
    steps there without settling its bound (``test_device_paths.py``: the small decompositions stay on LAPACK)."""
    from test_device_paths import flat_low_rank_updated

    from lora_spectral_callback.linalg import top_singular_triplets

    start = torch.linalg.qr(torch.randn(2048, 20, generator=torch.Generator().manual_seed(1))).Q
    solves = {
        device: top_singular_triplets(flat_low_rank_updated(2048, device=device), 10, start.to(device))
        for device in ("cpu", "cuda")
    }
    assert all(solve.converged for solve in solves.values())
    assert abs(solves["cuda"].iterations - solves["cpu"].iterations) <= 1
    assert torch.allclose(solves["cuda"].S.cpu(), solves["cpu"].S, rtol=1e-5)
