"""``lora-spectral``: measure a saved PEFT adapter (or a fully fine-tuned model) against its base model, post hoc.

    lora-spectral analyze BASE_DIR ADAPTER_DIR [--json] [--tensorboard DIR] [--top-k K] [--epsilon E[,E...]]
                                               [--initial-adapter INIT_DIR]
    lora-spectral analyze BASE_DIR --finetuned TUNED_DIR [...]

An adapter loads as ``PeftModel.from_pretrained`` would load it (any tuner that changes weights: LoRA and its
variants, AdaLoRA, LoHa, LoKr, VeRA, IA3, OFT, ...), with the transformers Auto class of its ``task_type``, after
fitting the base to what the adapter saved: a classification head in ``modules_to_save`` sets ``num_labels``, a
saved resized embedding resizes the vocabulary. The monitor is created between PEFT's injection and the loading
of the saved weights, so the initial factors of a base-rewriting init (PiSSA, OLoRA, ... run again by PEFT on the
given base) are recorded; ``--initial-adapter`` supplies them instead, for a trained adapter applied to a saved
residual base (PEFT's PiSSA/OLoRA/CorDA recipes save that initial adapter before training).

Everything numerical is the library's :class:`SpectralMonitor` (its full fine-tuning mode for ``--finetuned``);
this module only loads, prints and turns every expected failure into one line on stderr
(``lora-spectral: error: ...``, exit 1) instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence

from .report import LayerSpectra, SpectralReport

# What a mode returns: the report, and a function giving the pictures' data for some of its layers.
Analysis = tuple[SpectralReport, Callable[[list[str]], dict[str, LayerSpectra]]]

__all__ = ["main", "format_table"]

# PEFT task_type -> the transformers Auto class whose module names the adapter was saved against (FEATURE_EXTRACTION
# and no task_type: AutoModel).
_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


class CLIError(Exception):
    """An expected failure: printed as one line, exit status 1."""


def _epsilons(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or comma-separated list of numbers") from None
    if not values or not all(0 < e < 1 for e in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every epsilon must be strictly between 0 and 1")
    return values


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-spectral", description="Intruder dimensions of a fine-tune (arXiv 2410.21228)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("analyze", help="measure an adapter or a fine-tuned model against its base model")
    p.add_argument("base", metavar="BASE_DIR", help="saved pretrained model (save_pretrained directory)")
    p.add_argument("adapter", metavar="ADAPTER_DIR", nargs="?", help="saved PEFT adapter directory")
    p.add_argument(
        "--initial-adapter",
        metavar="INIT_DIR",
        help="the adapter as saved before training, when BASE_DIR is the residual base a PiSSA/OLoRA/CorDA/LoftQ "
        "init left: the pretrained weight is then BASE + its update",
    )
    p.add_argument("--finetuned", metavar="DIR", help="compare a fully fine-tuned model instead of an adapter")
    p.add_argument(
        "--json", action="store_true", help="print the report as JSON (SpectralReport.to_dict()) instead of a table"
    )
    p.add_argument(
        "--tensorboard", metavar="DIR", help="also write the callback's TensorBoard tags and pictures to DIR"
    )
    p.add_argument(
        "--top-k", type=_positive_int, default=10, help="top singular vectors examined per matrix (default 10)"
    )
    p.add_argument(
        "--epsilon",
        type=_epsilons,
        action="append",
        metavar="E[,E...]",
        help="intruder threshold(s) on max |cos|, repeatable; the first is primary (default 0.5)",
    )
    p.add_argument("--include", metavar="REGEX", help="only layers whose name matches this regular expression")
    p.add_argument(
        "--image-layers",
        type=int,
        default=16,
        metavar="N",
        help="per-layer pictures for the N layers with most intruders with --tensorboard (0: none, -1: all; default 16)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lora-spectral`` console script; returns the exit status.

    Example:
        >>> import contextlib, io, json, tempfile
        >>> from peft import LoraConfig, get_peft_model
        >>> from transformers import BertConfig, BertModel
        >>> base_dir, adapter_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
        >>> BertModel(config).save_pretrained(base_dir)
        >>> lora = LoraConfig(r=4, target_modules=["query", "value"])
        >>> get_peft_model(BertModel.from_pretrained(base_dir), lora).save_pretrained(adapter_dir)
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     status = main(["analyze", base_dir, adapter_dir, "--json", "--no-progress"])
        >>> report = json.loads(out.getvalue())
        >>> status, len(report["layers"]), report["intruders_total"]  # an untrained adapter: B = 0
        (0, 2, 0)
    """
    args = _parser().parse_args(argv)
    try:
        report, spectra_for = _analyze(args)
        if args.tensorboard:
            _write_tensorboard(args, report, spectra_for)
    except CLIError as err:
        print(f"lora-spectral: error: {err}", file=sys.stderr)
        return 1
    print(report.to_json(indent=2) if args.json else format_table(report))
    return 0


def _analyze(args: argparse.Namespace) -> Analysis:
    """Check the arguments, load the models and measure."""
    if (args.adapter is None) == (args.finetuned is None):
        raise CLIError("give exactly one of ADAPTER_DIR or --finetuned DIR")
    if args.include is not None:
        try:
            re.compile(args.include)
        except re.error as err:
            raise CLIError(f"--include {args.include!r} is not a valid regular expression: {err}") from None
    if args.tensorboard and args.image_layers != 0:
        from .figures import require_matplotlib

        try:
            require_matplotlib("--tensorboard pictures (use --image-layers 0 for scalars only)")
        except ValueError as err:
            raise CLIError(str(err)) from None
    epsilons = [e for group in (args.epsilon or [[0.5]]) for e in group]
    _require_dir(args.base, "base model", "config.json")
    _quiet_transformers()
    if args.finetuned is not None:
        return _analyze_finetuned(args, epsilons)
    return _analyze_adapter(args, epsilons)


def _analyze_adapter(args: argparse.Namespace, epsilons: list[float]) -> Analysis:
    from .monitor import SpectralMonitor

    _require_dir(args.adapter, "adapter", "adapter_config.json")
    if args.initial_adapter is not None:
        _require_dir(args.initial_adapter, "initial adapter", "adapter_config.json")
    model = _attach_adapter(args.base, args.adapter)
    try:  # before the saved weights replace the initial ones (see the module docstring)
        monitor = SpectralMonitor(
            model, top_k=args.top_k, epsilon=epsilons, include=args.include, progress=not args.no_progress
        )
    except ValueError as err:
        raise CLIError(_one_line(err)) from None
    _load_adapter_weights(model, args.base, args.adapter)
    if args.initial_adapter is not None:
        _restore_initial(model, monitor.matrices, args.initial_adapter)
    monitor.snapshot()
    report = monitor.measure(step=None)
    assert report is not None  # a single process: measure always reports
    return report, lambda names: monitor.spectra(names)


def _analyze_finetuned(args: argparse.Namespace, epsilons: list[float]) -> Analysis:
    """The monitor's full fine-tuning mode: snapshot the base model's layers, load the fine-tuned weights into it,
    measure — the same code path as a live full fine-tune."""
    from .monitor import SpectralMonitor

    _require_dir(args.finetuned, "fine-tuned model", "config.json")
    model, tuned = _load_auto(args.base, "AutoModel"), _load_auto(args.finetuned, "AutoModel").state_dict()
    own = model.state_dict()
    shared = {key: value for key, value in tuned.items() if key in own}
    for key, value in shared.items():
        if value.shape != own[key].shape:
            raise CLIError(f"shape mismatch for {key}: base {tuple(own[key].shape)} vs fine-tuned {tuple(value.shape)}")
    if not shared:
        raise CLIError("the base and fine-tuned models share no parameter: base/fine-tuned mismatch")
    try:
        monitor = SpectralMonitor(
            model, mode="full", top_k=args.top_k, epsilon=epsilons, include=args.include, progress=not args.no_progress
        )
    except ValueError as err:
        raise CLIError(_one_line(err)) from None
    monitor.snapshot()  # the pretrained bases, before the fine-tuned weights replace the base ones
    model.load_state_dict(shared, strict=False)
    report = monitor.measure(step=None)
    assert report is not None  # a single process: measure always reports
    return report, lambda names: monitor.spectra(names)


def _write_tensorboard(
    args: argparse.Namespace, report: SpectralReport, spectra_for: Callable[[list[str]], dict[str, LayerSpectra]]
) -> None:
    from .figures import figure_layers
    from .writers import TensorBoardWriter

    try:
        writer = TensorBoardWriter(args.tensorboard)
    except OSError as err:
        raise CLIError(f"--tensorboard {args.tensorboard!r} cannot be written: {err}") from None
    try:
        writer.write(report, 0)
        if args.image_layers != 0:
            writer.write_figures(report, spectra_for(figure_layers(report, args.image_layers)), 0)
    finally:
        writer.close()


def format_table(report: SpectralReport) -> str:
    """Human-readable per-layer table and totals (one intruder column per epsilon, primary first)."""
    eps = list(report.intruders_total_by_epsilon)
    names = list(report.layers)
    width = max([len("layer")] + [len(n) for n in names])
    head = (
        f"{'layer':<{width}}  "
        + "  ".join(f"{'intr@' + e:>9}" for e in eps)
        + f"  {'min max|cos|':>12}  {'eff.rank':>8}  {'top σ':>9}"
    )
    lines = [head, "-" * len(head)]
    for name in names:
        layer = report.layers[name]
        counts = "  ".join(f"{layer.intruders_by_epsilon[e]:>9}" for e in eps)
        flag = " (uncertain)" if layer.uncertain else ""
        lines.append(
            f"{name:<{width}}  {counts}  {min(layer.max_cos, default=float('nan')):>12.4f}  "
            f"{layer.effective_rank:>8.2f}  {(layer.singular_values or [float('nan')])[0]:>9.3f}{flag}"
        )
    lines.append("-" * len(head))
    hit = sum(1 for layer in report.layers.values() if layer.intruders)
    others = "".join(f"; at ε={e}: {report.intruders_total_by_epsilon[e]}" for e in eps[1:])
    lines.append(
        f"total: {report.intruders_total} intruder dimension(s) at ε={eps[0]} in {hit}/{len(names)} layers{others}; "
        f"mean effective rank {report.effective_rank_mean:.2f}; {report.seconds:.2f} s"
    )
    for name, error in report.errors.items():
        lines.append(f"skipped {name}: {error}")
    return "\n".join(lines)


# -- loading -----------------------------------------------------------------------------------------------
def _require_dir(path: str, what: str, marker: str) -> None:
    if not os.path.isdir(path):
        raise CLIError(f"{what} directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, marker)):
        raise CLIError(f"{what} directory {path!r} has no {marker} (not a save_pretrained directory?)")


def _quiet_transformers() -> None:
    """Loading chatter (unused/newly initialised head weights) would bury the table; errors still surface."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_auto(path: str, auto_class: str, **kwargs):
    import transformers

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(transformers, auto_class).from_pretrained(path, **kwargs)
    except Exception as err:
        raise CLIError(f"cannot load {path!r} with {auto_class}: {_one_line(err)}") from None


def _attach_adapter(base_dir: str, adapter_dir: str):
    """The base model with the adapter's layers injected by PEFT (its init run) and the saved weights not loaded
    yet: the first half of ``PeftModel.from_pretrained``, :func:`_load_adapter_weights` is the second."""
    from peft import PeftConfig, PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    try:
        config = PeftConfig.from_pretrained(adapter_dir)
    except Exception as err:
        raise CLIError(f"cannot read adapter config in {adapter_dir!r}: {_one_line(err)}") from None
    if config.is_prompt_learning:
        raise CLIError(
            f"adapter {adapter_dir!r} is a {config.peft_type.value} adapter: prompt learning changes no weight "
            "matrix, there is nothing to measure"
        )
    config.inference_mode = True
    task = getattr(config.task_type, "value", config.task_type)
    base = _load_base(base_dir, adapter_dir, _AUTO_CLASSES.get(task, "AutoModel"))
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, (list, set, tuple)):  # a str is a regex: PEFT's own error covers it
        names = [name for name, _ in base.named_modules()]
        if not any(n == t or n.endswith("." + t) for t in targets for n in names):
            raise CLIError(
                f"none of the adapter's target modules {sorted(targets)} is in base model {base_dir!r} "
                f"({type(base).__name__}): base/adapter mismatch"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task, PeftModel)(base, config)
    except Exception as err:
        raise CLIError(f"adapter {adapter_dir!r} does not fit base model {base_dir!r}: {_one_line(err)}") from None


def _load_adapter_weights(model, base_dir: str, adapter_dir: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_adapter(adapter_dir, adapter_name="default")
    except Exception as err:
        raise CLIError(f"adapter {adapter_dir!r} does not fit base model {base_dir!r}: {_one_line(err)}") from None


def _load_base(base_dir: str, adapter_dir: str, auto_class: str):
    """The base model, fitted to the shapes the adapter saved for whole modules (``modules_to_save``, embeddings):
    a classification head of another size sets ``num_labels``, a larger or smaller embedding the vocabulary size.
    Other mismatches are left to PEFT's own error."""
    import torch
    import transformers
    from peft.utils import load_peft_weights

    try:
        config = transformers.AutoConfig.from_pretrained(base_dir)
        with torch.device("meta"), warnings.catch_warnings():  # shapes only, no memory
            warnings.simplefilter("ignore")
            skeleton = getattr(transformers, auto_class).from_config(config)
    except Exception as err:
        raise CLIError(f"cannot load {base_dir!r} with {auto_class}: {_one_line(err)}") from None
    try:
        saved = {
            key.removeprefix("base_model.model."): tensor.shape
            for key, tensor in load_peft_weights(adapter_dir).items()
        }
    except Exception as err:
        raise CLIError(f"cannot read the adapter weights in {adapter_dir!r}: {_one_line(err)}") from None
    shapes = {key: tensor.shape for key, tensor in skeleton.state_dict().items()}
    mismatched = {key: (shapes[key], shape) for key, shape in saved.items() if key in shapes and shapes[key] != shape}
    labels = {new[0] for own, new in mismatched.values() if own[0] == config.num_labels and own[1:] == new[1:]}
    embedding = skeleton.get_input_embeddings()
    embedding_key = next(
        (n for n, p in skeleton.named_parameters() if embedding is not None and p is embedding.weight), None
    )
    kwargs = {}
    if len(labels) == 1:
        (config.num_labels,) = labels
        kwargs = {"config": config, "ignore_mismatched_sizes": True}  # the base's own head is replaced anyway
    base = _load_auto(base_dir, auto_class, **kwargs)
    if embedding_key in mismatched:
        base.resize_token_embeddings(mismatched[embedding_key][1][0])
    return base


def _restore_initial(model, matrices: list, path: str) -> None:
    """Reference ``W_res + s B0 A0`` from the initial adapter at ``path`` for every monitored layer it covers."""
    from .inits import initial_factors_from_adapter

    try:
        with warnings.catch_warnings():  # PEFT warns about a second adapter beside a PiSSA/OLoRA one
            warnings.simplefilter("ignore")
            states = initial_factors_from_adapter(model, path)
    except Exception as err:
        raise CLIError(f"cannot load initial adapter {path!r}: {_one_line(err)}") from None
    missing = [m.name for m in matrices if m.name not in states or not hasattr(m, "restore_initial")]
    if missing:
        raise CLIError(f"initial adapter {path!r} has no LoRA factors for {', '.join(missing[:4])}")
    for matrix in matrices:
        matrix.restore_initial(states[matrix.name])


def _one_line(err: BaseException, limit: int = 300) -> str:
    """The informative part of an exception as one line (the first size mismatch of a load_state_dict error)."""
    text = str(err)
    mismatch = re.search(r"size mismatch for [^\n]*", text)
    line = " ".join((mismatch.group(0) if mismatch else text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
