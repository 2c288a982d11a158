"""LoRASpectralCallback: the SpectralMonitor on a schedule inside a transformers Trainer (or TRL trainer)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .alerts import Alert, IntruderThreshold
from .background import BackgroundMeasurer
from .distributed import any_rank
from .figures import figure_layers, require_matplotlib
from .full_finetune import load_baseline, save_baseline
from .monitor import SpectralConfig, SpectralMonitor
from .report import SpectralReport
from .writers import MetricWriter, TensorBoardWriter, headline_metrics

logger = logging.getLogger(__name__)

__all__ = ["LoRASpectralCallback", "default_log_dir"]

_HISTORY_KEY = "spectral/intruders_total"
_WAIT_KEY = "spectral/alert_wait"
_BASELINE_KEY = "spectral/baseline_fingerprint"  # full fine-tuning: which stored pretrained copies were used
_BASELINE_FILE = "spectral_baseline.safetensors"
_MAX_WRITE_FAILURES = 3  # consecutive failed TensorBoard writes before the writer is given up
_FAILED = object()  # what _guarded returns when the guarded call failed


def default_log_dir(output_dir: str) -> str:
    """A run directory of our own beside the Trainer's TensorBoard logs, never sharing its event file.

    transformers 5.x has no ``TrainingArguments.logging_dir``: its TensorBoardCallback writes to
    ``$TENSORBOARD_LOGGING_DIR`` or ``<output_dir>/runs/<time>_<host>``. We use ``<that root>/spectral``, a
    fixed name so a resumed run continues the same series.
    """
    root = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(output_dir, "runs")
    return os.path.join(os.path.expanduser(root), "spectral")


class LoRASpectralCallback(TrainerCallback):
    """Measure intruder dimensions of the LoRA-merged weights every ``every_n_steps`` and act on them.

    Measures at step 0 (or at the step a run resumes from, if its checkpoint holds no measurement), every
    ``every_n_steps`` optimizer steps, and at the end of training; a resumed run keeps the schedule and patience
    of an uninterrupted one. Writes TensorBoard tags (see ``writers``) to ``log_dir`` (default:
    :func:`default_log_dir`) and the headline numbers to the Trainer's log history. When ``max_intruders`` /
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

    Multi-process: under DDP only rank 0 measures and writes; a stop reaches every rank through one all-reduce.
    With sharded weights (FSDP2, DeepSpeed ZeRO-3) every rank takes part in each measurement's gathers (rank 0
    still measures alone), and ``asynchronous`` / ``forgetting_proxy`` are turned off (see :mod:`.sharding`).

    Remaining keyword options go to :class:`SpectralConfig` (``include``, ``exclude``, ``basis_dtype``, ...).

    ``max_intruder_energy_share`` / ``max_intruder_sigma_ratio`` are limits that do not saturate on large models
    (share of the top-k spectral energy carried by intruders; largest intruder singular value over the pretrained
    sigma_1, in any layer); they alert like ``max_intruders``, see :class:`.alerts.IntruderThreshold`.
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
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps <= 0:
            raise ValueError(f"every_n_steps={every_n_steps!r} is invalid: must be an integer >= 1")
        if on_alert is not None and not callable(on_alert):
            raise ValueError(f"on_alert={on_alert!r} is invalid: must be a callable taking a SpectralReport")
        if image_every_n_measurements is not None:
            if not isinstance(image_every_n_measurements, int) or image_every_n_measurements <= 0:
                raise ValueError(
                    f"image_every_n_measurements={image_every_n_measurements!r} is invalid: must be None or an integer >= 1"
                )
            require_matplotlib("image_every_n_measurements")
        self.every_n_steps = every_n_steps
        self.image_every_n_measurements = image_every_n_measurements
        self.image_layers = image_layers
        self._measurements = 0
        self.options = dict(options, top_k=top_k, epsilon=epsilon)
        self.config = SpectralConfig(**self.options)  # fail now, not at train start
        self.threshold = IntruderThreshold(
            max_intruders,
            max_intruders_per_layer,
            patience,
            max_intruder_energy_share=max_intruder_energy_share,
            max_intruder_sigma_ratio=max_intruder_sigma_ratio,
        )
        self.stop_training = stop_training
        self.stop_on_nonfinite = stop_on_nonfinite
        self.asynchronous = bool(asynchronous)
        self._background: BackgroundMeasurer | None = None
        self.log_dir = log_dir
        if log_dir is not None:
            _ensure_writable_dir(log_dir)
        self.on_alert = on_alert
        if forgetting_proxy is not None and not callable(forgetting_proxy):
            raise ValueError(f"forgetting_proxy={forgetting_proxy!r} is invalid: must be a callable taking the model")
        self.forgetting_proxy = forgetting_proxy
        self.monitor: SpectralMonitor | None = None
        self.writer: MetricWriter | None = None
        self.last_report: SpectralReport | None = None
        self.last_alert: Alert | None = None
        self.last_measured_step = -1
        self.resolved_log_dir: str | None = None  # where the TensorBoard events went (main process)
        self._handler = None
        self._reported: set[tuple[str, str]] = set()
        self._write_failures = 0
        self._stop_requested = False
        self._baseline_fingerprint: str | None = None

    # -- Trainer events --------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._handler = _calling_callback_handler(self)
        model = kwargs.get("model")
        if self.monitor is None:
            self.monitor = SpectralMonitor(model, **self.options)
            self._adapt_to_sharding()
        self._restore_from_history(state)
        if state.is_world_process_zero:
            if self.monitor.mode == "full":
                self._full_finetune_baseline(args.output_dir)
            self.monitor.snapshot()
            if self.asynchronous and self._background is None:
                self._background = BackgroundMeasurer(self.monitor)
            if self.writer is None:
                log_dir = self.resolved_log_dir = self.log_dir or default_log_dir(args.output_dir)
                _ensure_writable_dir(log_dir)
                # The directory name is fixed, so a run continues the series: events an earlier run wrote after
                # the last measurement this run restored (it went past the checkpoint; or all of them, for a new
                # run in the same directory) are purged so no step repeats or goes backwards.
                writer = self._guarded(
                    "TensorBoard open", lambda: TensorBoardWriter(log_dir, self.last_measured_step + 1)
                )
                self.writer = None if writer is _FAILED else writer
                self._write_failures = 0
                if self.writer is not None:
                    logger.info("lora-spectral-callback: TensorBoard logs in %s", log_dir)
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
        if self.monitor is not None and state.global_step > self.last_measured_step:
            self._measure_and_act(args, state, control, final=True)
        if self.writer is not None:
            self._guarded("TensorBoard close", self.writer.close)
            self.writer = None

    # -- internals -------------------------------------------------------------------------------------------
    def _measure_and_act(self, args, state: TrainerState, control: TrainerControl, final: bool = False) -> None:
        """Measure on the main process, record, and make every rank agree on whether to stop."""
        step = state.global_step
        self.last_measured_step = step
        stop = False
        if state.is_world_process_zero and self._background is not None and not final:
            self._guarded("measurement", lambda: self._background.submit(step))
        elif state.is_world_process_zero or self.monitor.sharded:  # sharded: every rank takes part in the gathers
            report = self._guarded("measurement", lambda: self.monitor.measure(step))
            if report is not _FAILED and report is not None:
                stop = self._handle(args, state, control, report, final)
        if not final:
            self._stop_requested = any_rank(stop) or self._stop_requested

    def _deliver(self, args, state: TrainerState, control: TrainerControl, wait: bool) -> None:
        """Asynchronous mode: record and act on a finished background measurement. Every rank calls this at
        every step end so that a stop found on rank 0 reaches all ranks at the same step."""
        stop = False
        if state.is_world_process_zero and self._background is not None:
            report = self._guarded("measurement", lambda: self._background.collect(wait))
            if report is not None and report is not _FAILED:
                stop = self._handle(args, state, control, report, final=False)
        self._stop_requested = any_rank(stop) or self._stop_requested

    def _handle(self, args, state: TrainerState, control: TrainerControl, report: SpectralReport, final: bool) -> bool:
        """Record a finished measurement (alerts, TensorBoard, log history, pictures); True means stop."""
        self.last_report = report
        stop = self._record_and_decide(args, state, control, report)
        self._write_pictures(report, final or report.step >= state.max_steps > 0)
        return stop

    def _record_and_decide(self, args, state: TrainerState, control: TrainerControl, report: SpectralReport) -> bool:
        """Alert (hook first), then write and log. A failing hook or writer is added to ``report.errors`` under
        its own name, so ``spectral/errors`` counts it: in TensorBoard for a hook failure, in the log history
        (and report_to integrations) for a write failure, which cannot reach TensorBoard at that step."""
        alert = self.threshold.update(report)
        if alert is not None:
            self.last_alert = alert
            logger.warning("lora-spectral-callback: %s", alert.message())
            if self.on_alert is not None:
                self._guarded("on_alert hook", lambda: self.on_alert(report), report)
        drift = {}
        if self.forgetting_proxy is not None:  # before writing, so a failing proxy is counted in spectral/errors
            drift = self._guarded("forgetting proxy", lambda: self.forgetting_proxy(self.monitor.model), report)
            drift = {} if drift is _FAILED else drift
        self._write(report)
        if drift and self.writer is not None:
            self._guarded("TensorBoard write", lambda: self.writer.write_scalars(drift, report.step))
        logs = {**headline_metrics(report), **drift}
        history = {**logs, _WAIT_KEY: self.threshold.wait, "step": report.step}
        if self._baseline_fingerprint is not None:
            history[_BASELINE_KEY] = self._baseline_fingerprint
        state.log_history.append(history)
        if self._handler is not None:  # lets report_to integrations (W&B, MLflow, ...) see the numbers
            # CallbackHandler.on_log clears control.should_log; on rank 0 only, that would skip the Trainer's own
            # logging step, whose loss gather is a collective under DDP: the ranks then deadlock or crash.
            should_log = control.should_log
            self._guarded("Trainer log", lambda: self._handler.on_log(args, state, control, dict(logs)))
            control.should_log = should_log
        if alert is None:
            return False
        return (alert.nonfinite and self.stop_on_nonfinite) or (not alert.nonfinite and self.stop_training)

    def _write(self, report: SpectralReport) -> None:
        """Write to TensorBoard; after a failure the writer retries (reopening its file) at the next measurement,
        and after ``_MAX_WRITE_FAILURES`` consecutive failures it is dropped for the rest of the run."""
        if self.writer is None:
            return
        if self._guarded("TensorBoard write", lambda: self.writer.write(report, report.step), report) is not _FAILED:
            self._write_failures = 0
            return
        self._write_failures += 1
        if self._write_failures >= _MAX_WRITE_FAILURES:
            logger.warning(
                "lora-spectral-callback: TensorBoard writing disabled after %d consecutive failures; measurements "
                "continue in the Trainer's log history",
                self._write_failures,
            )
            self._guarded("TensorBoard close", self.writer.close)
            self.writer = None

    def _write_pictures(self, report: SpectralReport, final: bool) -> None:
        every = self.image_every_n_measurements
        due = every is not None and (final or self._measurements % every == 0)
        self._measurements += 1
        if due and self.writer is not None:
            names = figure_layers(report, self.image_layers)
            self._guarded(
                "TensorBoard pictures",
                lambda: self.writer.write_figures(report, self.monitor.spectra(names), report.step),
            )

    def _adapt_to_sharding(self) -> None:
        """With sharded weights every measurement is a collective run in step with training on all ranks, so the
        two features that would touch the weights on rank 0 alone (a gather, or a forward pass: both collectives)
        are turned off, loudly."""
        if not self.monitor.sharded:
            return
        why = "the model's weights are sharded, and on rank 0 alone it would run collectives the other ranks never join"
        if self.asynchronous:
            logger.warning("lora-spectral-callback: background measurement is off: %s", why)
            self.asynchronous = False
        if self.forgetting_proxy is not None:
            logger.warning("lora-spectral-callback: the forgetting proxy is off: %s", why)
            self.forgetting_proxy = None

    def _full_finetune_baseline(self, output_dir: str) -> None:
        """Full fine-tuning compares against copies of weights that training changes: the first run saves them
        beside its checkpoints, and a resumed run (whose model is already fine-tuned) reads them back, checked
        against the fingerprint in its log history; a missing or different baseline is a clear error."""
        path = os.path.join(output_dir, _BASELINE_FILE)
        if self.last_measured_step >= 0:
            load_baseline(self.monitor.matrices, path, self._baseline_fingerprint, self.monitor.keep_copy)
        else:
            os.makedirs(output_dir, exist_ok=True)
            self._baseline_fingerprint = save_baseline(self.monitor.matrices, path)

    def _restore_from_history(self, state: TrainerState) -> None:
        """A resumed run continues the series: last measured step and patience come back from the log history,
        which the Trainer restores from ``trainer_state.json`` whether or not callback states are restored.
        A new run (empty history) starts afresh even if this callback object was used before."""
        self.last_measured_step = -1
        self.threshold.load_state_dict({"wait": 0})
        self._baseline_fingerprint = None
        for entry in reversed(state.log_history):
            if _HISTORY_KEY in entry:
                self.last_measured_step = int(entry["step"])
                self.threshold.load_state_dict({"wait": entry.get(_WAIT_KEY, 0)})
                self._baseline_fingerprint = entry.get(_BASELINE_KEY)
                return

    def _guarded(self, what: str, fn: Callable[[], Any], report: SpectralReport | None = None) -> Any:
        """Run ``fn``; a failure is logged once per (what, error type), recorded in ``report.errors`` and
        swallowed, returning ``_FAILED`` (re-raised with ``strict=True``): monitoring must not take the
        training run down."""
        try:
            return fn()
        except Exception as err:
            if self.config.strict:
                raise
            reason = f"{type(err).__name__}: {err}"
            if report is not None:
                report.errors[what] = reason
            if (what, type(err).__name__) not in self._reported:
                self._reported.add((what, type(err).__name__))
                logger.warning("lora-spectral-callback: %s failed and was skipped (logged once): %s", what, reason)
            return _FAILED


def _calling_callback_handler(callback: TrainerCallback) -> Any:
    """The Trainer's CallbackHandler that is invoking ``callback`` (found on the call stack), or None.

    Callbacks are not handed the Trainer, yet its ``on_log`` event is how report_to integrations receive
    metrics; the handler is the caller of our event methods, so we look a few frames up for it.
    """
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if callback in getattr(candidate, "callbacks", ()) and hasattr(candidate, "on_log"):
            return candidate
        frame = frame.f_back
    return None


def _ensure_writable_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(f"log_dir={path!r} cannot be created: {err}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"log_dir={path!r} is not writable")
