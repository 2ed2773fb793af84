"""The training glue: a Run row in, peft_core training, metrics, adapter and status out.

Every write carries the fence number of this worker's claim; once the run is claimed again
or ended elsewhere, writes raise StaleFenceError and this worker stops without touching it.
"""

import json
import logging
import tempfile
import time
from pathlib import Path

import torch

import peft_core
from peft_core.data import label_names, split_rows
from peft_core.profile import MemoryTracker, inference_latency, sample_generations
from peft_core.samples import sample_rows
from peft_core.train import Callbacks, TrainConfig, evaluate, train
from webapp.experiments import services
from webapp.experiments.models import Dataset, Run, RunStatus
from webapp.experiments.services import Point, StaleFenceError
from workers.cache import base_model_copy

logger = logging.getLogger(__name__)

FLUSH_EVERY_S = 1.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROFILE_BATCH = (2, 64)  # a fixed batch (rows, tokens) for the latency figures
SAMPLE_PROMPTS = 3


class RunCallbacks(Callbacks):
    """Buffers metric points and log lines; flushes them with a heartbeat about once a second."""

    def __init__(self, run_id: int, fence: int, memory: MemoryTracker | None = None) -> None:
        self.run_id, self.fence = run_id, fence
        self.memory = memory
        self.points: list[Point] = []
        self.lines: list[str] = []
        self.step = 0
        self.cancel_requested = False
        self._last_flush = 0.0

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        self._add(step, metrics)
        if self.memory is not None:
            self.memory.sample()
        if time.monotonic() - self._last_flush >= FLUSH_EVERY_S:
            self.flush()

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._add(step, metrics)
        self.flush()

    def on_log(self, line: str) -> None:
        logger.info("run %s: %s", self.run_id, line)
        self.lines.append(line)

    def should_stop(self) -> bool:
        return self.cancel_requested

    def _add(self, step: int, metrics: dict[str, float]) -> None:
        now = time.time()
        self.points.extend(Point(key, step, float(value), now) for key, value in metrics.items())

    def flush(self) -> None:
        ids = {"run_id": self.run_id, "fence": self.fence}
        if self.points:
            services.metrics_record(**ids, points=self.points)
            self.points = []
        if self.lines:
            services.run_log_append(**ids, lines=self.lines)
            self.lines = []
        self.cancel_requested = services.run_heartbeat(**ids, step=self.step)
        self._last_flush = time.monotonic()


def dataset_rows(dataset: Dataset) -> tuple[list[dict], list[dict]]:
    if dataset.is_builtin:
        return sample_rows(dataset.builtin_key)
    content = Dataset.objects.values_list("content", flat=True).get(id=dataset.id)
    rows = [json.loads(line) for line in bytes(content).decode().splitlines() if line]
    return split_rows(rows, val_fraction=0.1, seed=0)


def execute_run(run_id: int, *, worker: str) -> str:
    """Claim, train, record the end. Returns what happened, for the worker's log."""
    fence = services.run_claim(run_id=run_id, worker=worker)
    if fence is None:
        logger.info("run %s was not queued (a duplicate delivery or a cancel): skipped", run_id)
        return "skipped"
    callbacks = RunCallbacks(run_id, fence)
    try:
        status = _train_run(Run.objects.select_related("dataset").get(id=run_id), callbacks)
    except StaleFenceError:
        logger.warning("run %s: claimed elsewhere or ended; this worker stops", run_id)
        return "stale"
    except Exception as exc:
        logger.exception("run %s failed", run_id)
        _record_failure(callbacks, exc)
        return "failed"
    return status


def _record_failure(callbacks: RunCallbacks, exc: Exception) -> None:
    reason = f"{type(exc).__name__}: {exc}"
    callbacks.on_log(f"failed: {reason}")
    try:
        callbacks.flush()
        services.run_finish(
            run_id=callbacks.run_id, fence=callbacks.fence, status=RunStatus.FAILED, error=reason
        )
    except StaleFenceError:
        logger.warning("run %s: failure not recorded, the run is no longer ours", callbacks.run_id)


def _train_run(run: Run, callbacks: RunCallbacks) -> str:
    task = run.dataset.task
    train_rows, val_rows = dataset_rows(run.dataset)
    labels = (run.dataset.label_names or label_names(train_rows)) if task == "seq-cls" else None
    callbacks.on_log(
        f"loading {run.base_model} ({len(train_rows)} train / {len(val_rows)} val rows)"
    )
    model, tokenizer = base_model_copy(run.base_model, task, len(labels or ()) or 2)
    model.to(DEVICE)
    method_config = peft_core.build_config(run.method, run.method_config, tokenizer=tokenizer)
    config = TrainConfig(**run.train_config)
    torch.manual_seed(config.seed)  # the adapter's random init: the same run, the same weights
    model = peft_core.apply(model, method_config)
    evaluation = {"task": task, "rows": val_rows, "config": config, "label_names": labels}
    callbacks.on_log(f"{peft_core.trainable_parameters(model):,} trainable parameters")
    callbacks.on_log("evaluating the base model on the validation split")
    callbacks.flush()

    with peft_core.disabled(model):
        base_metrics = evaluate(model, tokenizer, **evaluation)
    callbacks.on_eval(0, {f"base_{key}": value for key, value in base_metrics.items()})
    callbacks.on_log(f"base model: {_format(base_metrics)}")

    callbacks.memory = MemoryTracker(DEVICE)
    result = train(
        model,
        tokenizer,
        task=task,
        train_rows=train_rows,
        val_rows=val_rows,
        config=config,
        callbacks=callbacks,
        label_names=labels,
    )
    if result.stopped:
        callbacks.on_log(f"cancelled at step {result.steps_done}")
        callbacks.flush()
        services.run_finish(run_id=run.id, fence=callbacks.fence, status=RunStatus.CANCELLED)
        return "cancelled"

    # train() evaluated (and reported) at its last step; keep its eval figures.
    final_metrics = {k: v for k, v in result.metrics.items() if k.startswith("eval_")}
    peak_mb = callbacks.memory.peak_mb()
    adapter_bytes = _store_adapter(run, callbacks.fence, model)
    callbacks.on_log("measuring inference latency and sample answers")
    callbacks.flush()
    profile = _profile(model, tokenizer, task, val_rows, result, adapter_bytes, peak_mb)
    summary = {f"base_{key}": value for key, value in base_metrics.items()} | final_metrics
    callbacks.on_log(f"done: {_format(final_metrics)}")
    callbacks.flush()
    services.run_finish(
        run_id=run.id,
        fence=callbacks.fence,
        status=RunStatus.SUCCEEDED,
        summary=summary,
        profile=profile,
    )
    return "succeeded"


def _store_adapter(run: Run, fence: int, model) -> int:
    total = 0
    with tempfile.TemporaryDirectory(prefix="peftlab-adapter-") as tmp:
        peft_core.save_adapter(model, tmp, base_model_name_or_path=run.base_model)
        for path in sorted(Path(tmp).iterdir()):
            data = path.read_bytes()
            services.artifact_store(
                run_id=run.id, fence=fence, kind="adapter", name=path.name, data=data
            )
            total += len(data)
    return total


def _profile(model, tokenizer, task, val_rows, result, adapter_bytes: int, peak_mb: float) -> dict:
    """What the adapter costs and gives, measured on this worker after training."""
    trainable = peft_core.trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, tokenizer.vocab_size, PROFILE_BATCH, generator=generator)
    batch = {
        "input_ids": input_ids.to(DEVICE),
        "attention_mask": torch.ones_like(input_ids).to(DEVICE),
    }
    latency = inference_latency(model, batch)
    profile = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "adapter_bytes": adapter_bytes,
        "peak_memory_mb": peak_mb,
        "memory_kind": "cuda" if DEVICE == "cuda" else "rss",
        "wall_s": result.wall_s,
        "tokens_per_s": result.tokens / result.wall_s if result.wall_s else 0.0,
        "mergeable": "merged_ms" in latency,
        "latency_batch": list(PROFILE_BATCH),
        **latency,
        "overhead": latency["adapter_ms"] / latency["base_ms"],
    }
    if task == "causal-lm":
        profile["samples"] = sample_generations(model, tokenizer, val_rows[:SAMPLE_PROMPTS])
    return profile


def _format(metrics: dict) -> str:
    return ", ".join(f"{key}={value:.4f}" for key, value in sorted(metrics.items()))
