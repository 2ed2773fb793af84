"""The training glue: a Run row in, peft_core training, metrics, adapter and status out.

Every write carries the fence number of this worker's claim; once the run is claimed again
or ended elsewhere, writes raise StaleFenceError and this worker stops without touching it.
"""

import dataclasses
import logging
import math
import os
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import OperationalError, connection

import peft_core
from peft_core import distributed
from peft_core.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_from_files,
    checkpoint_to_files,
)
from peft_core.checks import ConfigError
from peft_core.configs import EVAL_SECONDS, refuse_fsdp, refuse_packing, refuse_quantized
from peft_core.data import DatasetError, label_names, split_rows
from peft_core.decoding import greedy_completions
from peft_core.preflight import PreflightError, check, estimate_for_run, free_memory
from peft_core.profile import (
    ANSWER_MARGIN,
    MemoryTracker,
    answer_budget,
    inference_latency,
    prefill_batch,
    sample_generations,
)
from peft_core.samples import sample_rows
from peft_core.sources import ModelSourceError
from peft_core.train import (
    Callbacks,
    NonFiniteLossError,
    TrainConfig,
    compute_dtype,
    evaluate,
    train,
)
from webapp.experiments import artifacts, base_evals, dataset_files, leases, metrics, queue
from webapp.experiments.leases import StaleFenceError
from webapp.experiments.lineage import run_lineage_record
from webapp.experiments.metrics import Point
from webapp.experiments.models import ArtifactKind, Dataset, FailureClass, Run, RunStatus
from workers import cache as model_cache
from workers import cpu_share, drain, ranks, system
from workers.cache import base_model_copy
from workers.cpu_share import CpuShare
from workers.models import load_weights, upstream_of, weights_directory, weights_key, weights_of
from workers.system import DB_DOWN, reset_connection

logger = logging.getLogger(__name__)

FLUSH_EVERY_S = 1.0
STEP_LINE_EVERY_S = 5.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The measurement after training. Quick by default: one short row timed over 4 interleaved
# rounds and the adapter's answers to 2 prompts as one batch, each at most as long as the
# longest expected answer plus ANSWER_MARGIN tokens (the base's come with its evaluation):
# SmolLM2's README run measured in 2.0-2.2 s after 23-27 s of training steps on a 2-core CPU
# (docs/BENCHMARKS.md). The full profile (TrainConfig.measure) times a longer batch over
# more rounds and answers more prompts, longer.
MEASURE_QUICK = {"batch": (1, 32), "rounds": 4, "samples": 2, "new_tokens": 24}
MEASURE_FULL = {"batch": (4, 256), "rounds": 31, "samples": 8, "new_tokens": 48}
FULL = "full"  # full fine-tuning (peft_core.full): the whole model trains and is stored
# The settings the base model's evaluation depends on (base_eval_parts).
BASE_EVAL_SETTINGS = (
    "max_length", "batch_size", "eval_batches", "eval_metrics", "max_new_tokens", "precision",
    "quantize", "attn",
)  # fmt: skip


class Lease(threading.Thread):
    """Renews the run's lease every RUN_HEARTBEAT_EVERY_S, whatever the training loop does.

    A slow step, a long evaluation or loading a model never lets the lease lapse; a dead
    process stops renewing it, and the reaper notices. It has its own database connection
    (Django's are per thread) and survives the database being away.
    """

    def __init__(self, run_id: int, fence: int, every_s: float) -> None:
        super().__init__(name=f"lease-run-{run_id}", daemon=True)
        self.run_id, self.fence, self.every_s = run_id, fence, every_s
        self.lost = False  # the run was taken from this worker (reaped, or ended elsewhere)
        self.cancel_requested = False
        self._stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopped.wait(self.every_s):
                try:
                    self.cancel_requested = leases.run_heartbeat(
                        run_id=self.run_id, fence=self.fence
                    )
                except StaleFenceError:
                    self.lost = True
                    return
                except DB_DOWN as exc:
                    logger.warning("run %s: lease not renewed, database away: %s", self.run_id, exc)
                    reset_connection()
        finally:
            connection.close()

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=30)


class RunCallbacks(Callbacks):
    """Buffers metric points and log lines and flushes them about once a second.

    While PostgreSQL is unreachable the buffers grow and training goes on; the next flush
    that reaches the database writes them (points are idempotent on run + key + step).
    """

    def __init__(self, run_id: int, fence: int, memory: MemoryTracker | None = None) -> None:
        self.run_id, self.fence = run_id, fence
        self.memory = memory
        self.lease: Lease | None = None
        self.system: system.SystemSampler | None = None  # sys/ metrics (workers/system.py)
        self.points: list[Point] = []
        self.lines: list[str] = []
        self.step = 0
        self.cancel_requested = False
        self.db_down_since: float | None = None
        self.checkpoints_stored = 0
        self._last_flush = 0.0
        self._last_step_line = -math.inf
        # On a CPU, the run's share of the host's cores (workers/cpu_share.py)
        self.cpu_share = CpuShare() if DEVICE == "cpu" else None

    def share_cores(self) -> None:
        if self.cpu_share is not None:
            self.cpu_share.update()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        self._add(step, metrics)
        self.share_cores()
        if self.memory is not None:
            self.memory.sample()
        if time.monotonic() - self._last_flush >= FLUSH_EVERY_S:
            self.flush()

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._add(step, metrics)
        self.flush()
        self.share_cores()

    def on_log(self, line: str) -> None:
        logger.info("run %s: %s", self.run_id, line)
        if line.startswith("step ") and "skipped" not in line:
            # Routine progress: the chart has every step. The run's log keeps one such line
            # every few seconds, so its last lines still show what happened (lost, resumed).
            now = time.monotonic()
            if now - self._last_step_line < STEP_LINE_EVERY_S:
                return
            self._last_step_line = now
        self.lines.append(line)

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Store the checkpoint once every point before it is stored: a resume from it must
        not leave a gap in the curves."""
        self.flush()
        if self.points or self.db_down_since is not None:
            self.on_log(f"checkpoint at step {checkpoint.step} skipped: database unreachable")
            return
        files = checkpoint_to_files(checkpoint)
        try:
            leases.checkpoint_store(run_id=self.run_id, fence=self.fence, files=files)
        except DB_DOWN as exc:
            self._database_away(exc)
            return
        except OSError as exc:  # the artifact store: full, unreachable; the run goes on
            self.on_log(f"checkpoint at step {checkpoint.step} skipped: not stored ({exc})")
            return
        self.checkpoints_stored += 1
        size_mb = sum(len(data) for data in files.values()) / 2**20
        self.on_log(f"checkpoint at step {checkpoint.step} ({size_mb:.1f} MB)")

    def should_stop(self) -> bool:
        if self.lease is not None and self.lease.lost:
            raise StaleFenceError(f"run {self.run_id}: the lease was lost")
        if drain.DRAINING.is_set():  # the worker is shutting down (workers/drain.py)
            return True
        return self.cancel_requested or (self.lease is not None and self.lease.cancel_requested)

    def checkpoint_on_stop(self) -> bool:
        return drain.DRAINING.is_set()

    def _add(self, step: int, metrics: dict[str, float]) -> None:
        now = time.time()
        self.points.extend(Point(key, step, float(value), now) for key, value in metrics.items())

    def flush(self) -> None:
        """Write what is buffered. A database outage keeps it buffered; a lost fence raises."""
        self._last_flush = time.monotonic()
        ids = {"run_id": self.run_id, "fence": self.fence}
        try:
            if self.points:
                metrics.metrics_record(**ids, points=self.points)
                self.points = []
            if self.lines:
                leases.run_log_append(**ids, lines=self.lines)
                self.lines = []
            self.cancel_requested = leases.run_heartbeat(**ids, step=self.step)
        except DB_DOWN as exc:
            self._database_away(exc)
            return
        if self.db_down_since is not None:
            away = time.monotonic() - self.db_down_since
            self.db_down_since = None
            self.on_log(f"database back after {away:.0f} s; buffered metrics written")

    def flush_until_written(self) -> None:
        """Flush, waiting out a database outage of up to RUN_DB_OUTAGE_S (the run's end)."""
        _retrying(self.flush_strict)

    def flush_strict(self) -> None:
        self.flush()
        if self.db_down_since is not None:
            raise OperationalError("the database is still unreachable")

    def finish(self, status: str, **fields) -> None:
        """Write what is buffered, then end the run (leases.run_finish), waiting out a
        database outage of up to RUN_DB_OUTAGE_S for both."""
        if self.system is not None:
            self.system.stop()  # its last sample, at the last step, while the run is ours
        self.flush_until_written()
        _retrying(leases.run_finish, run_id=self.run_id, fence=self.fence, status=status, **fields)

    def _database_away(self, exc: Exception) -> None:
        if self.db_down_since is None:
            self.db_down_since = time.monotonic()
            logger.warning("run %s: database unreachable, buffering: %s", self.run_id, exc)
        reset_connection()


def _retrying(write, *args, **kwargs):
    """Call `write` until the database answers, for up to RUN_DB_OUTAGE_S."""
    deadline = time.monotonic() + settings.RUN_DB_OUTAGE_S
    delay = 0.5
    while True:
        try:
            return write(*args, **kwargs)
        except DB_DOWN as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("database unreachable (%s); retrying in %.1f s", exc, delay)
            reset_connection()
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def dataset_rows(dataset: Dataset) -> tuple[list[dict], list[dict]]:
    """(train, validation) rows; an upload's file is read through its sha256 check, so a
    damaged one fails the run for its dataset (DatasetDamaged) instead of training on it.
    An upload's validation rows are its validation file's (the file's last rows), else
    val_fraction of its rows."""
    if dataset.is_builtin:
        return sample_rows(dataset.builtin_key)
    rows = dataset_files.dataset_rows(dataset)
    if dataset.val_row_count:
        cut = len(rows) - dataset.val_row_count
        return rows[:cut], rows[cut:]
    return split_rows(rows, val_fraction=dataset.val_fraction, seed=0)


class RunConfigError(ValueError):
    """The run's stored method or training settings are refused by peft_core."""


def execute_run(run_id: int, *, worker: str) -> str:
    """Claim, train, record the end. Returns what happened, for the worker's log."""
    fence = _retrying(leases.run_claim, run_id=run_id, worker=worker)
    if fence is None:
        logger.info("run %s is not waiting for a worker (duplicate delivery or cancel)", run_id)
        return "skipped"
    callbacks = RunCallbacks(run_id, fence)
    callbacks.lease = Lease(run_id, fence, settings.RUN_HEARTBEAT_EVERY_S)
    callbacks.lease.start()
    try:
        run = _retrying(Run.objects.select_related("dataset").get, id=run_id)
        # System metrics of training (none for an uploaded adapter), lineage: workers/system.py
        if not run.external:
            callbacks.system = system.sampler_start(run, fence, step_of=lambda: callbacks.step)
        lineage = system.run_lineage(run)
        _retrying(run_lineage_record, run_id=run_id, fence=fence, lineage=lineage)
        if run.devices > 1 and not run.external:  # torchrun, one process per device
            status = ranks.train_on_ranks(run, callbacks)
        else:
            status = _train_run(run, callbacks)
    except StaleFenceError:
        logger.warning("run %s: claimed elsewhere or ended; this worker stops", run_id)
        return "stale"
    except Exception as exc:  # SystemExit and the like: the worker goes; the reaper sees to it
        logger.exception("run %s failed", run_id)
        _record_failure(callbacks, exc)
        return "failed"
    finally:
        callbacks.lease.stop()
        if callbacks.system is not None:
            callbacks.system.stop()
        if callbacks.cpu_share is not None:
            callbacks.cpu_share.restore()  # the worker's next run starts from the whole host
    return status


def failure_class_of(exc: BaseException) -> FailureClass:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return FailureClass.OUT_OF_MEMORY
    if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):
        return FailureClass.OUT_OF_MEMORY  # the CPU allocator's message
    if isinstance(exc, NonFiniteLossError):
        return FailureClass.NON_FINITE
    if isinstance(exc, SoftTimeLimitExceeded):
        return FailureClass.TIME_LIMIT
    if isinstance(exc, DatasetError):
        return FailureClass.DATASET
    if isinstance(exc, RunConfigError | ConfigError):  # ConfigError: the loaded model refused it
        return FailureClass.CONFIG
    if isinstance(exc, ModelSourceError):
        return FailureClass.MODEL
    return FailureClass.ERROR


def _record_failure(callbacks: RunCallbacks, exc: BaseException) -> None:
    failure = failure_class_of(exc)
    if failure == FailureClass.TIME_LIMIT:
        reason = f"stopped at the time limit of {settings.RUN_TIME_LIMIT_S} s"
    elif failure in (FailureClass.ERROR, FailureClass.OUT_OF_MEMORY):
        reason = f"{type(exc).__name__}: {exc}"  # where it came from helps here
    else:
        reason = str(exc)
    callbacks.on_log(f"failed ({failure.label.lower()}): {reason}")
    try:
        callbacks.finish(RunStatus.FAILED, error=reason, failure_class=failure)
    except StaleFenceError:
        logger.warning("run %s: failure not recorded, the run is no longer ours", callbacks.run_id)


def _resume_point(run_id: int, callbacks: RunCallbacks) -> Checkpoint | None:
    """The newest stored checkpoint that passes its checks (sha256, format), else None."""
    for version in _retrying(leases.checkpoint_versions, run_id=run_id):
        try:
            files = _retrying(leases.checkpoint_files, run_id=run_id, version=version)
            return checkpoint_from_files(files)
        except (CheckpointError, artifacts.ArtifactDamaged) as exc:
            callbacks.on_log(f"stored checkpoint {version} is unusable ({exc})")
    return None


def _train_run(run: Run, callbacks: RunCallbacks) -> str:
    if run.external:
        return _evaluate_uploaded(run, callbacks)
    task = run.dataset.task
    train_rows, val_rows = dataset_rows(run.dataset)
    labels = (run.dataset.label_names or label_names(train_rows)) if task == "seq-cls" else None
    callbacks.on_log(
        f"loading {run.base_model} ({len(train_rows)} train / {len(val_rows)} val rows)"
    )
    try:
        config = TrainConfig(**run.train_config)
    except (TypeError, ValueError) as exc:
        raise RunConfigError(str(exc)) from exc
    if not config.checkpoint_every:
        every = min(settings.RUN_CHECKPOINT_EVERY_STEPS, config.steps)
        config = dataclasses.replace(config, checkpoint_every=every)
    weights = weights_of(run.base_model, run.base_weights)
    dtype = compute_dtype(config.precision, DEVICE)  # the base in the run's precision
    try:
        refuse_quantized(run.method, config.quantize)
        refuse_packing(config.packing, method=run.method, task=task)
        refuse_fsdp(
            config.parallel, method=run.method, quantize=config.quantize, devices=run.devices
        )
    except ValueError as exc:
        raise RunConfigError(str(exc)) from exc
    if settings.PREFLIGHT:
        _preflight(run, callbacks, weights, config, task, len(labels or ()) or 2)
    num_labels = len(labels or ()) or 2
    if config.parallel == "fsdp":  # each rank in turn: loaded on the CPU, adapted, split
        model, tokenizer = distributed.in_turn(
            lambda: _sharded_model(run, weights, task, num_labels, dtype, config.seed)
        )
        callbacks.on_log(f"the base is split over {run.devices} processes (FSDP)")
    elif run.method == FULL:  # every weight trains: a copy of its own, never the cache's
        model, tokenizer = load_weights(weights, task, num_labels=num_labels, dtype=dtype)
        model = peft_core.apply(model.to(DEVICE), _method_config(run, tokenizer))
    else:
        model, tokenizer = base_model_copy(
            weights, task, num_labels, device=DEVICE, dtype=dtype, quantize=config.quantize
        )
        method_config = _method_config(run, tokenizer)
        torch.manual_seed(config.seed)  # the adapter's random init: the same run, same weights
        model = peft_core.apply(model, method_config)
    evaluation = {"task": task, "rows": val_rows, "config": config, "label_names": labels}
    callbacks.on_log(f"{peft_core.trainable_parameters(model):,} trainable parameters")

    parts = base_eval_parts(run, weights, config, labels, dtype)
    # Untrained, a fully fine-tuned model is its base; an adapter is switched off.
    with nullcontext() if run.method == FULL else peft_core.disabled(model):
        base_metrics, base_answers = _base_evaluation(
            run, model, tokenizer, evaluation, parts, callbacks
        )

    resume = _resume_point(run.id, callbacks)
    callbacks.memory = MemoryTracker(DEVICE)
    load_before = _conditions()
    result = train(
        model,
        tokenizer,
        task=task,
        train_rows=train_rows,
        val_rows=val_rows,
        config=config,
        callbacks=callbacks,
        label_names=labels,
        resume=resume,
    )
    if not distributed.world().is_main:
        return "trained its share"  # rank 0 stores the adapter and ends the run
    if result.stopped and drain.DRAINING.is_set():
        return _release(run, callbacks, result.steps_done)
    if result.stopped:
        callbacks.on_log(f"cancelled at step {result.steps_done}")
        callbacks.finish(RunStatus.CANCELLED)
        return "cancelled"

    # train() evaluated (and reported) at its last step; keep its eval figures.
    final_metrics = {k: v for k, v in result.metrics.items() if k.startswith("eval_")}
    peak_mb = callbacks.memory.peak_mb()
    load = _busiest(load_before, _conditions())
    training = _training_figures(result, peak_mb, callbacks.memory.kind, load)
    callbacks.flush_until_written()
    adapter_bytes = _store_adapter(run, callbacks.fence, model, tokenizer)
    if distributed.is_sharded(model):  # rank 0 cannot run the split model alone
        callbacks.on_log("inference latency and sample answers are not measured under FSDP")
        profile = _sizes(model, adapter_bytes) | training
    else:
        callbacks.on_log("measuring inference latency and sample answers")
        callbacks.flush()
        callbacks.share_cores()
        # A fully fine-tuned model has no adapter to switch off: the base is the cache's copy.
        base = None
        if run.method == FULL:
            base, _ = base_model_copy(weights, task, num_labels, device=DEVICE, dtype=dtype)
        profile = _profile(
            model, tokenizer, task, val_rows, adapter_bytes, training, config.measure == "full",
            base=base, base_answers=base_answers,
        )  # fmt: skip
    summary = {f"base_{key}": value for key, value in base_metrics.items()} | final_metrics
    callbacks.on_log(f"done: {_format(final_metrics)}")
    callbacks.finish(RunStatus.SUCCEEDED, summary=summary, profile=profile)
    return "succeeded"


def base_eval_parts(run: Run, weights: dict, config: TrainConfig, labels, dtype) -> dict:
    """All that the base model's evaluation depends on (webapp/experiments/base_evals.py):
    equal parts, equal figures, whichever run or worker measures them."""
    dataset = run.dataset
    return {
        "team": run.project.team_id,
        "weights": list(weights_key(weights)),
        "task": dataset.task,
        "labels": list(labels or ()),
        "dataset": [dataset.id, dataset.file_sha256 or dataset.builtin_key],
        "split": [dataset.val_row_count, dataset.val_fraction],
        "eval": {name: getattr(config, name) for name in BASE_EVAL_SETTINGS},
        "dtype": str(dtype),
        "device": DEVICE,
        "devices": [run.devices, config.parallel if run.devices > 1 else ""],
        # the base's sample answers (causal LM): how many prompts, how many new tokens
        "answers": _answers_plan(config) if dataset.task == "causal-lm" else [],
    }


def _measure_plan(config: TrainConfig) -> dict:
    return MEASURE_FULL if config.measure == "full" else MEASURE_QUICK


def _answers_plan(config: TrainConfig) -> list[int]:
    """The sample answers: how many prompts, at most how many new tokens, and the margin over
    the longest expected answer (answer_budget)."""
    plan = _measure_plan(config)
    return [plan["samples"], plan["new_tokens"], ANSWER_MARGIN]


def _base_evaluation(
    run: Run, model, tokenizer, evaluation: dict, parts: dict, callbacks
) -> tuple[dict, list[str]]:
    """The base model's figures at step 0 and its answers to the first validation prompts
    (the sample answers' base side): read back when a run of the team measured the same
    `parts` before (on any worker), else measured here and kept. Ranks decide together:
    they evaluate together, or none does; rank 0 answers alone (a split base cannot)."""
    here = distributed.world()
    found = _retrying(base_evals.base_eval_find, parts=parts) if here.is_main else None
    if distributed.any_rank(found is not None, here, torch.device(DEVICE)):
        if found is None:
            return {}, []  # a helper rank: rank 0 reports them
        callbacks.on_eval(0, {f"base_{key}": value for key, value in found.metrics.items()})
        origin = f"run {found.run_id}" if found.run_id else "a deleted run"
        callbacks.on_log(f"base model: reused from {origin}: {_format(found.metrics)}")
        return dict(found.metrics), list(found.answers)
    callbacks.on_log(f"evaluating the base model on {len(evaluation['rows'])} validation rows")
    callbacks.flush()
    callbacks.share_cores()
    started = time.perf_counter()
    metrics = evaluate(model, tokenizer, **evaluation)
    answers = []
    if here.is_main and parts["answers"] and not distributed.is_sharded(model):
        count, cap, margin = parts["answers"]
        rows = evaluation["rows"][:count]
        prompts = [row.get("prompt") or row.get("text", "") for row in rows]
        new_tokens = answer_budget(tokenizer, rows, cap, margin)
        answers = greedy_completions(model, tokenizer, prompts, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - started
    if here.is_main:
        _retrying(
            base_evals.base_eval_record,
            parts=parts, metrics=metrics, run_id=run.id, seconds=seconds, answers=answers,
        )  # fmt: skip
    base = {f"base_{key}": value for key, value in metrics.items()}
    callbacks.on_eval(0, base | {EVAL_SECONDS: seconds})  # the time left counts evaluations
    callbacks.on_log(f"base model ({seconds:.1f} s): {_format(metrics)}")
    return metrics, answers


def _method_config(run: Run, tokenizer):
    try:
        return peft_core.build_config(run.method, run.method_config, tokenizer=tokenizer)
    except (TypeError, ValueError) as exc:
        raise RunConfigError(str(exc)) from exc


def _sharded_model(run: Run, weights: dict, task: str, num_labels: int, dtype, seed: int):
    """FSDP: the base loaded on the CPU for this run alone (not the shared cache, whose whole
    copy would stay in memory), adapted, then split over the ranks and moved to the device."""
    model, tokenizer = load_weights(weights, task, num_labels=num_labels, dtype=dtype)
    torch.manual_seed(seed)
    model = peft_core.apply(model, _method_config(run, tokenizer))
    distributed.shard_base(model, torch.device(DEVICE))
    return model, tokenizer


def _release(run: Run, callbacks: "RunCallbacks", step: int) -> str:
    """The worker is shutting down: the checkpoint of `step` is stored (on_checkpoint), the
    run goes back to its queue as lost and the next worker resumes it there."""
    reason = f"its worker shut down (SIGTERM) after step {step}; it resumes from there"
    callbacks.on_log(f"shutting down: checkpointed at step {step}, handing the run back")
    callbacks.flush_until_written()
    if _retrying(leases.run_release, run_id=run.id, fence=callbacks.fence, reason=reason):
        queue.enqueue_run(run.id, queue.run_queue(run.gpu_class, run.devices))
    return "released"


def _preflight(
    run: Run, callbacks: RunCallbacks, weights: dict, config: TrainConfig, task: str, labels: int
) -> None:
    """Refuse, as config and before a weight is read, a run whose estimated peak memory
    exceeds the device's free memory (peft_core.preflight): from config.json and the
    method applied on the meta device. A model the estimate cannot read trains anyway."""
    try:
        method_config = peft_core.build_config(run.method, run.method_config)
    except (TypeError, ValueError) as exc:
        raise RunConfigError(str(exc)) from exc
    directory = weights_directory(weights)  # ModelSourceError: the run fails as model
    try:
        estimate = estimate_for_run(
            directory, config, method_config, DEVICE, task=task, num_labels=labels,
            devices=run.devices,
        )  # fmt: skip
        check(estimate, DEVICE, free_memory(DEVICE) + model_cache.cached_bytes())
    except PreflightError as exc:
        raise RunConfigError(str(exc)) from exc
    except Exception as exc:  # an architecture the estimate does not know: not the run's fault
        logger.warning("run %s: no pre-flight estimate: %s", run.id, exc)
        callbacks.on_log(f"pre-flight skipped: {type(exc).__name__}: {exc}")
        return
    callbacks.on_log(f"pre-flight: needs {estimate.summary()}")


def _evaluate_uploaded(run: Run, callbacks: RunCallbacks) -> str:
    """An adapter trained elsewhere (uploaded, already checked): measured as a trained run is,
    so that it compares with them: base and adapter eval loss on the dataset's validation
    split under the default eval settings, parameters, latency, sample answers."""
    task = run.dataset.task
    train_rows, val_rows = dataset_rows(run.dataset)
    labels = (run.dataset.label_names or label_names(train_rows)) if task == "seq-cls" else None
    callbacks.on_log(f"loading {run.base_model} and the uploaded adapter")
    weights = weights_of(run.base_model, run.base_weights)
    model, tokenizer = base_model_copy(weights, task, len(labels or ()) or 2)
    files = _retrying(artifacts.artifact_files, run_id=run.id, kind=ArtifactKind.ADAPTER)
    model = peft_core.load_adapter_files(model, files).to(DEVICE)
    config = TrainConfig(eval_metrics=run.dataset.default_eval_metrics)
    evaluation = {"task": task, "rows": val_rows, "config": config, "label_names": labels}
    callbacks.on_log(f"evaluating on {len(val_rows)} validation rows of {run.dataset.name}")
    callbacks.flush()
    with peft_core.disabled(model):
        base_metrics = evaluate(model, tokenizer, **evaluation)
    adapter_metrics = evaluate(model, tokenizer, **evaluation)
    summary = {f"base_{key}": value for key, value in base_metrics.items()} | adapter_metrics
    callbacks.on_eval(0, summary)
    adapter_bytes = sum(len(data) for data in files.values())
    profile = _profile(model, tokenizer, task, val_rows, adapter_bytes, training={})
    callbacks.on_log(f"base model: {_format(base_metrics)}; adapter: {_format(adapter_metrics)}")
    callbacks.finish(RunStatus.SUCCEEDED, summary=summary, profile=profile)
    return "succeeded"


def _store_adapter(run: Run, fence: int, model, tokenizer) -> int:
    """The adapter's files as a new version (HF PEFT's layout); a fully fine-tuned model's
    are the whole model and its tokenizer, a directory from_pretrained loads, kept in the
    artifact store (model-sized), never the database."""
    total = 0
    whole = peft_core.is_whole_model(model)
    with tempfile.TemporaryDirectory(prefix="peftlab-adapter-") as tmp:
        name, revision = upstream_of(weights_of(run.base_model, run.base_weights))
        peft_core.save_adapter(model, tmp, base_model_name_or_path=name, revision=revision)
        if whole:
            tokenizer.save_pretrained(tmp)
        version = _retrying(
            leases.artifact_version_next, run_id=run.id, fence=fence, kind=ArtifactKind.ADAPTER
        )
        for path in sorted(Path(tmp).iterdir()):
            data = path.read_bytes()
            _retrying(
                leases.artifact_store,
                run_id=run.id,
                fence=fence,
                kind=ArtifactKind.ADAPTER,
                name=path.name,
                data=data,
                version=version,
                in_store=whole,
            )
            total += len(data)
    return total


def _profile(
    model,
    tokenizer,
    task,
    val_rows,
    adapter_bytes: int,
    training: dict,
    full: bool = False,
    base=None,
    base_answers: list[str] | None = None,
) -> dict:
    """What the adapter costs and gives, measured on this worker after training: quick by
    default (MEASURE_QUICK), the full profile (MEASURE_FULL) when the run asks for it.
    `base`: the base model, for a fully fine-tuned `model` (no adapter to switch off);
    `base_answers`: the base's sample answers, given with its evaluation (not generated)."""
    began = time.perf_counter()
    plan = MEASURE_FULL if full else MEASURE_QUICK
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, tokenizer.vocab_size, plan["batch"], generator=generator)
    batch = prefill_batch(model, input_ids.to(DEVICE))
    latency = inference_latency(model, batch, repeats=plan["rounds"], base=base)
    profile = {
        **_sizes(model, adapter_bytes),
        **training,
        "mergeable": "merged_ms" in latency,
        "latency_batch": list(plan["batch"]),
        "latency_logits": "last" if "logits_to_keep" in batch else "all",
        "latency_conditions": _conditions(),
        **latency,
    }
    if task == "causal-lm":
        rows = val_rows[: plan["samples"]]
        profile["samples"] = sample_generations(
            model,
            tokenizer,
            rows,
            max_new_tokens=answer_budget(tokenizer, rows, plan["new_tokens"]),
            base=base,
            base_answers=base_answers,
        )
    profile["measure"] = "full" if full else "quick"
    profile["measure_s"] = time.perf_counter() - began
    return profile


def _busiest(first: dict, second: dict) -> dict:
    """Of two samples of the conditions, the larger load and number of runs (a figure one
    sample lacks is the other's)."""
    busiest = dict(first)
    for key in ("load_1m", "runs_on_host"):
        known = [sample[key] for sample in (first, second) if key in sample]
        if known:
            busiest[key] = max(known)
    return busiest


def _conditions() -> dict:
    """What the timings ran beside: the host's CPUs and load, torch's threads, and the runs
    this host was training at the time (this one included; left out while the database is
    away: a figure about the timings never fails the run)."""
    figures = {
        "device": str(DEVICE),
        "cpus": os.cpu_count(),
        "load_1m": round(os.getloadavg()[0], 2),
        "threads": torch.get_num_threads(),
    }
    try:
        figures["runs_on_host"], _ = cpu_share.training_here()
    except DB_DOWN as exc:
        logger.warning("runs on this host not counted, database away: %s", exc)
        reset_connection()
    return figures


def _sizes(model, adapter_bytes: int) -> dict:
    trainable = peft_core.trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())  # a split (FSDP) tensor counts whole
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "adapter_bytes": adapter_bytes,
    }


def _training_figures(result, peak_mb: float, memory_kind: str, load: dict) -> dict:
    """Time and memory of the training itself: tokens/s over the optimizer steps' own time
    (train_s: evaluations and measurement left out), the load it ran under."""
    return {
        "peak_memory_mb": peak_mb,
        "memory_kind": memory_kind,
        "wall_s": result.wall_s,
        "train_s": result.train_s,
        "tokens_per_s": result.tokens / result.train_s if result.train_s else 0.0,
        "training_conditions": load,
    }


def _format(metrics: dict) -> str:
    return ", ".join(f"{key}={value:.4f}" for key, value in sorted(metrics.items()))


# For workers/ranks.py: each rank of a multi-device run trains through the same body.
train_run_body = _train_run
record_failure = _record_failure
