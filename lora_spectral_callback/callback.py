"""LoRASpectralCallback: the SpectralMonitor on a schedule inside a transformers Trainer (or TRL trainer)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import baseline
from .alerts import Alert, IntruderThreshold
from .background import BackgroundMeasurer
from .config import SpectralConfig, require, require_int
from .distributed import any_rank
from .figures import figure_layers, require_matplotlib
from .guard import FAILED, FaultGuard
from .monitor import SpectralMonitor
from .report import SpectralReport
from .writers import GuardedWriter, TensorBoardWriter, default_log_dir, ensure_writable_dir, headline_metrics

logger = logging.getLogger(__name__)

__all__ = ["LoRASpectralCallback"]

_HISTORY_KEY = "spectral/intruders_total"
_WAIT_KEY = "spectral/alert_wait"
_BASELINE_KEY = "spectral/baseline_fingerprint"  # full fine-tuning: which stored pretrained copies were used


class LoRASpectralCallback(TrainerCallback):
    """Measure intruder dimensions of the LoRA-merged weights every ``every_n_steps`` and act on them.

    Measures at step 0 (or at the step a run resumes from, if its checkpoint holds no measurement), every
    ``every_n_steps`` optimizer steps, and at the end of training; a resumed run keeps the schedule and patience
    of an uninterrupted one. Writes TensorBoard tags (see ``writers``) to ``log_dir`` (default:
    :func:`~.writers.default_log_dir`) and the headline numbers to the Trainer's log history. When ``max_intruders`` /
    ``max_intruders_per_layer`` is exceeded for ``patience`` consecutive measurements it warns, calls
    ``on_alert(report)`` and, unless ``stop_training=False``, saves a checkpoint and stops training on every
    rank. NaN/Inf weights always warn and call the hook; they stop training only with ``stop_on_nonfinite``.
    ``forgetting_proxy`` (e.g. a :class:`~lora_spectral_callback.forgetting.ForgettingProxy`) is called with the
    model at each measurement; its metrics go to TensorBoard and the log history beside the spectral ones.

    Pictures (|cos| heatmaps, intruder grid, spectra; need matplotlib) are off by default because each costs far
    more than the scalars (rendering, and ~30 KB of event file per image): ``image_every_n_measurements=n``
    draws them at the first measurement, every n-th after it and the last, for the ``image_layers`` layers with
    the most intruders (all layers if negative).

    ``asynchronous=True`` copies the LoRA factors at the measurement step and measures in a background thread
    (see :mod:`.background`): metrics and any stop arrive at a later step (the first step end after it
    finishes) and are logged at the step they describe. If the previous measurement is still running at the next
    measurement step, that step waits for it (no measurement is skipped); train end waits too, then measures the
    final state synchronously. Under DDP this adds a one-integer all-reduce per step, so every rank stops together.

    Multi-process: every rank snapshots and measures its share of the matrices (under DDP: ``split_across_ranks``,
    on unless ``asynchronous``; with sharded weights, FSDP2 or DeepSpeed ZeRO-3, always, gathering the matrices in
    rounds) and rank 0 combines the reports, decides and writes; a stop reaches every rank through one all-reduce.
    With sharded weights ``asynchronous`` / ``forgetting_proxy`` are turned off (see :mod:`.sharding`).

    Remaining keyword options go to :class:`SpectralConfig` (``include``, ``exclude``, ``basis_dtype``, ...).

    Args:
        every_n_steps: Measure every N optimizer steps, plus at train start (step 0) and at the end.
        top_k: Top singular vectors examined per matrix (the paper's k).
        epsilon: Intruder threshold, or a list of them; the first is primary (totals, alerts).
        max_intruders: Alert when the model-wide count at the primary epsilon is greater than this.
        max_intruders_per_layer: Alert when any single matrix has more intruders than this.
        patience: Consecutive measurements over a limit before alerting.
        max_intruder_energy_share: Alert when the model-wide share of the top-k spectral energy carried by
            intruders is greater than this (in [0, 1]; does not saturate on large models).
        max_intruder_sigma_ratio: Alert when any layer's largest intruder singular value over its pretrained
            sigma_1 is greater than this.
        log_dir: TensorBoard run directory. Default: ``$TENSORBOARD_LOGGING_DIR/spectral`` or
            ``<output_dir>/runs/spectral``, a run of its own beside the Trainer's, never sharing its event file.
        on_alert: ``callable(report)`` called on alert; its exceptions are logged, never raised.
        stop_training: On alert, save a checkpoint and stop training on every rank; ``False``: warn and call
            ``on_alert`` only.
        stop_on_nonfinite: Also stop when a weight becomes NaN/Inf (always warned and reported).
        image_every_n_measurements: Draw pictures (needs matplotlib, extra ``viz``) at the first measurement,
            every n-th after it and the last; ``None``: no pictures.
        image_layers: Per-layer pictures for this many most-affected layers; negative: all layers.
        forgetting_proxy: Callable ``model -> {tag: float}`` called at each measurement, e.g. a
            :class:`~lora_spectral_callback.forgetting.ForgettingProxy`.
        asynchronous: Measure in a background thread from a copy of the LoRA factors: no stall; results (and a
            stop) arrive a step or more later, logged at the step they describe.
        **options: :class:`SpectralConfig` fields (``include``, ``exclude``, ``mode``, ``basis_device``, ...).

    Raises:
        ValueError: A bad option, naming it and what is allowed (before training starts).

    Example:
        >>> import contextlib, io, tempfile, torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
        >>> _ = torch.manual_seed(0)
        >>> config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
        >>> lora = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
        >>> model = get_peft_model(BertForSequenceClassification(config), lora)
        >>> data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": i % 2} for i in range(32)]
        >>> out = tempfile.mkdtemp()
        >>> callback = LoRASpectralCallback(every_n_steps=2, max_intruders=5, progress=False)
        >>> args = TrainingArguments(out, max_steps=4, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
        >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        >>> with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints every log line
        ...     _ = trainer.train()
        >>> [entry["step"] for entry in trainer.state.log_history if "spectral/intruders_total" in entry]
        [0, 2, 4]
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        top_k: int = 10,
        epsilon: float | list[float] = 0.5,
        max_intruders: int | None = None,
        max_intruders_per_layer: int | None = None,
        patience: int = 1,
        log_dir: str | None = None,
        on_alert: Callable[[SpectralReport], Any] | None = None,
        stop_training: bool = True,
        stop_on_nonfinite: bool = False,
        image_every_n_measurements: int | None = None,
        image_layers: int = 16,
        forgetting_proxy: Callable[[Any], dict[str, float]] | None = None,
        asynchronous: bool = False,
        max_intruder_energy_share: float | None = None,
        max_intruder_sigma_ratio: float | None = None,
        **options: Any,
    ) -> None:
        require_int("every_n_steps", every_n_steps, 1)
        for name, hook in (("on_alert", on_alert), ("forgetting_proxy", forgetting_proxy)):
            takes = "a SpectralReport" if name == "on_alert" else "the model"
            require(hook is None or callable(hook), name, hook, f"a callable taking {takes}")
        require_int("image_every_n_measurements", image_every_n_measurements, 1, optional=True)
        if image_every_n_measurements is not None:
            require_matplotlib("image_every_n_measurements")
        if log_dir is not None:
            ensure_writable_dir(log_dir)
        # configuration
        self.every_n_steps = every_n_steps
        # Under DDP every rank measures its share (synchronously: a background measurement runs on rank 0 alone).
        options = dict({"split_across_ranks": not asynchronous}, **options, top_k=top_k, epsilon=epsilon)
        if asynchronous and options["split_across_ranks"]:
            raise ValueError(
                "split_across_ranks=True is invalid with asynchronous=True: background measurement runs on rank 0 alone"
            )
        self.config = SpectralConfig(**options)  # checked now, not at train start; the monitor takes it as it is
        self.threshold = IntruderThreshold(
            max_intruders,
            max_intruders_per_layer,
            patience,
            max_intruder_energy_share=max_intruder_energy_share,
            max_intruder_sigma_ratio=max_intruder_sigma_ratio,
        )
        self.stop_training = stop_training
        self.stop_on_nonfinite = stop_on_nonfinite
        self.log_dir = log_dir
        self.on_alert = on_alert
        self.forgetting_proxy = forgetting_proxy
        self.asynchronous = bool(asynchronous)
        self.image_every_n_measurements = image_every_n_measurements
        self.image_layers = image_layers
        self.guard = FaultGuard(self.config.strict)
        # set up at train begin
        self.monitor: SpectralMonitor | None = None
        self.writer: GuardedWriter | None = None
        self.resolved_log_dir: str | None = None  # where the TensorBoard events went (main process)
        self._background: BackgroundMeasurer | None = None
        self._handler: Any = None  # the Trainer's CallbackHandler, to reach report_to integrations
        # run state (a resumed run restores it from the log history)
        self.last_report: SpectralReport | None = None
        self.last_alert: Alert | None = None
        self.last_measured_step = -1
        self._baseline_fingerprint: str | None = None
        self._measurements = 0
        self._stop_requested = False
        self._incomplete = False  # the last measurement left layers pending: train end measures again

    # -- Trainer events --------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._handler = _calling_callback_handler(self)
        if self.monitor is None:
            self.monitor = SpectralMonitor(kwargs["model"], self.config)
            self._adapt_to_sharding(self.monitor)
        monitor = self.monitor
        self._restore_from_history(state)
        output_dir = args.output_dir or "."
        if state.is_world_process_zero or monitor.split:  # before the snapshot, which needs the references
            resumed = self.last_measured_step >= 0
            self._baseline_fingerprint = baseline.save_or_restore(
                monitor, output_dir, resumed, self._baseline_fingerprint, write=state.is_world_process_zero
            )
        if state.is_world_process_zero or monitor.collective:
            monitor.start()  # in the background when it is slow: see SpectralConfig.snapshot
        if state.is_world_process_zero:
            if self.asynchronous and self._background is None:
                self._background = BackgroundMeasurer(monitor)
            if self.writer is None:
                self.writer = self._open_writer(self.log_dir or default_log_dir(output_dir))
        if self.last_measured_step < 0:  # a baseline, unless a resumed run's history already has one
            self._measure_and_act(args, state, control)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        due = state.global_step % self.every_n_steps == 0 and state.global_step > self.last_measured_step
        if self.asynchronous:
            self._deliver(args, state, control, wait=due)
        if due:
            self._measure_and_act(args, state, control)
        if self._stop_requested:  # applied here: the Trainer only honours a stop (and its save) after a step
            self._stop_requested = False
            logger.warning(
                "lora-spectral-callback: saving a checkpoint and stopping training at step %s", state.global_step
            )
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.asynchronous:
            self._deliver(args, state, control, wait=True)
        monitor = self.monitor
        if monitor is not None and (state.is_world_process_zero or monitor.collective):
            # the final numbers cover every layer, and no snapshot thread outlives training
            self.guard("snapshot", monitor.snapshot)
        if monitor is not None and (state.global_step > self.last_measured_step or self._incomplete):
            self._measure_and_act(args, state, control, final=True)
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # -- measuring and acting ----------------------------------------------------------------------------------
    def _measure_and_act(self, args, state: TrainerState, control: TrainerControl, final: bool = False) -> None:
        """Measure on the main process, record, and make every rank agree on whether to stop."""
        monitor, background, step = self._live_monitor, self._background, state.global_step
        self.last_measured_step = step
        stop = pending = False
        if state.is_world_process_zero and background is not None and not final:
            self.guard("measurement", lambda: background.submit(step))
        elif state.is_world_process_zero or monitor.collective:  # every rank takes part in a collective measurement
            report = self.guard("measurement", lambda: monitor.measure(step))
            if isinstance(report, SpectralReport):
                stop = self._handle(args, state, control, report, final)
                pending = bool(report.pending)
            if report is not FAILED:  # a collective failure fails on every rank, so all skip the pictures alike
                drawn = report if isinstance(report, SpectralReport) else None  # None: a rank other than the main
                self._write_pictures(drawn, step, final or step >= state.max_steps > 0)
        if not final:
            self._stop_requested = any_rank(stop) or self._stop_requested
            self._incomplete = any_rank(pending)  # every rank then joins the final measurement alike

    def _deliver(self, args, state: TrainerState, control: TrainerControl, wait: bool) -> None:
        """Asynchronous mode: record and act on a finished background measurement. Every rank calls this at
        every step end so that a stop found on rank 0 reaches all ranks at the same step."""
        background = self._background
        stop = False
        if state.is_world_process_zero and background is not None:
            report = self.guard("measurement", lambda: background.collect(wait))
            if isinstance(report, SpectralReport):
                stop = self._handle(args, state, control, report, final=False)
                step = state.global_step if report.step is None else report.step  # the step it describes
                self._write_pictures(report, step, step >= state.max_steps > 0)
        self._stop_requested = any_rank(stop) or self._stop_requested

    def _handle(self, args, state: TrainerState, control: TrainerControl, report: SpectralReport, final: bool) -> bool:
        """Record a finished measurement: alert (hook first), write, log. True means stop.

        A failing hook, proxy or writer is added to ``report.errors`` under its own name, so ``spectral/errors``
        counts it: in TensorBoard for a hook failure, in the log history (and report_to integrations) for a write
        failure, which cannot reach TensorBoard at that step."""
        self.last_report = report
        step = state.global_step if report.step is None else report.step  # the step it describes (asynchronous)
        alert = self.threshold.update(report)
        if alert is not None:
            self.last_alert = alert
            logger.warning("lora-spectral-callback: %s", alert.message())
            on_alert = self.on_alert
            if on_alert is not None:
                self.guard("on_alert hook", lambda: on_alert(report), report)
        drift = self._forgetting(report)  # before writing, so a failing proxy is counted in spectral/errors
        if self.writer is not None:
            self.writer.write(report, step)
            self.writer.write_scalars(drift, step)
        self._log(args, state, control, {**headline_metrics(report), **drift}, step)
        if alert is None:
            return False
        return (alert.nonfinite and self.stop_on_nonfinite) or (not alert.nonfinite and self.stop_training)

    def _forgetting(self, report: SpectralReport) -> dict[str, float]:
        proxy, model = self.forgetting_proxy, self._live_monitor.model
        if proxy is None:
            return {}
        drift = self.guard("forgetting proxy", lambda: proxy(model), report)
        return drift if isinstance(drift, dict) else {}

    def _log(self, args, state: TrainerState, control: TrainerControl, logs: dict[str, float], step: int) -> None:
        """Append to the Trainer's log history (with what a resumed run needs back) and pass the numbers to the
        report_to integrations (W&B, MLflow, ...) through the Trainer's own ``on_log`` event."""
        history: dict[str, Any] = {**logs, _WAIT_KEY: self.threshold.wait, "step": step}
        if self._baseline_fingerprint is not None:
            history[_BASELINE_KEY] = self._baseline_fingerprint
        state.log_history.append(history)
        handler = self._handler
        if handler is not None:
            # CallbackHandler.on_log clears control.should_log; on rank 0 only, that would skip the Trainer's own
            # logging step, whose loss gather is a collective under DDP: the ranks then deadlock or crash.
            should_log = control.should_log
            self.guard("Trainer log", lambda: handler.on_log(args, state, control, dict(logs)))
            control.should_log = should_log

    def _write_pictures(self, report: SpectralReport | None, step: int, final: bool) -> None:
        """Draw when due. Under a split across ranks every rank calls this (``report`` only on the main process):
        each rank holds its own layers' last vectors, and ``spectra`` gathers them."""
        every = self.image_every_n_measurements
        due = every is not None and (final or self._measurements % every == 0)
        self._measurements += 1
        monitor = self._live_monitor
        if not due or (report is None and not monitor.split):
            return
        # a layer reported exactly before its snapshot (zero update, background snapshot) has nothing to draw
        names = (
            None
            if report is None
            else [n for n in figure_layers(report, self.image_layers) if report.layers[n].singular_values]
        )
        spectra = self.guard("TensorBoard pictures", lambda: monitor.spectra(names))
        if isinstance(spectra, dict) and report is not None and self.writer is not None:
            self.writer.write_figures(report, spectra, step)

    # -- set-up ------------------------------------------------------------------------------------------------
    @property
    def _live_monitor(self) -> SpectralMonitor:
        if self.monitor is None:
            raise RuntimeError("LoRASpectralCallback has not seen on_train_begin yet")
        return self.monitor

    def _open_writer(self, log_dir: str) -> GuardedWriter | None:
        """The TensorBoard writer, or None if it cannot be opened (training goes on; numbers still reach the log
        history). The directory name is fixed, so a run continues the series: events an earlier run wrote after the
        last measurement this run restored (past its checkpoint; or all of them, for a new run in the same
        directory) are purged so that no step repeats or goes backwards."""
        self.resolved_log_dir = log_dir
        ensure_writable_dir(log_dir)
        writer = self.guard("TensorBoard open", lambda: TensorBoardWriter(log_dir, self.last_measured_step + 1))
        if not isinstance(writer, TensorBoardWriter):
            return None
        logger.info("lora-spectral-callback: TensorBoard logs in %s", log_dir)
        return GuardedWriter(writer, self.guard)

    def _adapt_to_sharding(self, monitor: SpectralMonitor) -> None:
        """With sharded weights every measurement is a collective run in step with training on all ranks, so the
        two features that would touch the weights on rank 0 alone (a gather, or a forward pass: both collectives)
        are turned off, loudly."""
        if not monitor.sharded:
            return
        why = "the model's weights are sharded, and on rank 0 alone it would run collectives the other ranks never join"
        if self.asynchronous:
            logger.warning("lora-spectral-callback: background measurement is off: %s", why)
            self.asynchronous = False
        if self.forgetting_proxy is not None:
            logger.warning("lora-spectral-callback: the forgetting proxy is off: %s", why)
            self.forgetting_proxy = None

    def _restore_from_history(self, state: TrainerState) -> None:
        """A resumed run continues the series: last measured step, patience and the baseline fingerprint come back
        from the log history, which the Trainer restores from ``trainer_state.json`` whether or not callback
        states are restored. A new run (empty history) starts afresh even if this callback object was used before."""
        self.last_measured_step = -1
        self.threshold.load_state_dict({"wait": 0})
        self._baseline_fingerprint = None
        for entry in reversed(state.log_history):
            if _HISTORY_KEY in entry:
                self.last_measured_step = int(entry["step"])
                self.threshold.load_state_dict({"wait": entry.get(_WAIT_KEY, 0)})
                fingerprint = entry.get(_BASELINE_KEY)
                self._baseline_fingerprint = None if fingerprint is None else str(fingerprint)
                return


def _calling_callback_handler(callback: TrainerCallback) -> Any:
    """The Trainer's CallbackHandler that is invoking ``callback`` (found on the call stack), or None.

    Callbacks are not handed the Trainer, yet its ``on_log`` event is how report_to integrations receive
    metrics; the handler is the caller of our event methods, so we look a few frames up for it.
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if callback in getattr(candidate, "callbacks", ()) and hasattr(candidate, "on_log"):
            return candidate
        frame = frame.f_back
    return None
