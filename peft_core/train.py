"""The training loop: AdamW on the trainable parameters, linear warmup, then a schedule.

    lr(s) = lr · (s + 1) / warmup                 for s < warmup       (s = 0 … steps − 1)
    afterwards, with p = (s − warmup) / (steps − warmup) ∈ [0, 1):
    linear    lr · (1 − p)
    cosine    lr · ½ (1 + cos πp)
    constant  lr

so no step is spent at lr 0 and the last step still moves a little.

One optimizer step sees `grad_accum` micro-batches of `batch_size` (each loss divided by
grad_accum, so the gradient is their mean). `precision` bf16/fp16 runs the forward under
autocast while the trainable parameters stay fp32 (the master copy: AdamW updates them in
fp32); fp16 scales the loss (torch.amp.GradScaler) and a step whose scaled gradients
overflow is the scaler's to skip, not a divergence. `gradient_checkpointing` recomputes each
block's activations in the backward pass (transformers' non-reentrant checkpointing).
`early_stop_patience` ends training after that many evaluations without a lower eval loss.
`packing` trains on rows of several causal-LM examples that attend only to themselves
(data.py draws one; peft_core.packing refuses a model, task or method that cannot); the
evaluation stays unpacked, so its loss compares with an unpacked run's.

Whatever is trainable is trained (`peft_core.apply` leaves only the adapter and a
classification head trainable), so this loop knows no PEFT method. It reports
through `Callbacks`: the web worker writes metrics and heartbeats to the database
and turns a cancel request into `should_stop()`, which is checked before every
step, so a cancelled run stops within one step.

Checkpoints. Every `checkpoint_every` steps (never at the last one, which the caller
saves as the adapter) the loop hands a `Checkpoint` to `Callbacks.on_checkpoint`.
`train(..., resume=checkpoint)` puts parameters, AdamW state, schedule, RNG and counters
back and goes on at step + 1 with the batches the uninterrupted run would have drawn
(step s always trains on batch s − 1 of the seeded stream), so a resumed run ends with
the same parameters as one that never stopped. A checkpoint of another config
(`TrainConfig.trajectory_digest`) or another set of trainable parameters is refused.

Non-finite steps. A step whose loss or gradient norm is nan/inf is skipped: no backward
(for a bad loss), no optimizer update, gradients dropped, its tokens not counted, no
on_step report. The schedule still advances, so step s always runs at lr(s) and the
run ends where it was configured to; a skipped step is a step with zero update. One bad
batch (an fp16 overflow, an odd row) costs a step, not the run; `max_nonfinite_steps`
in a row raise NonFiniteLossError, because then the run has diverged.

Losses: train_loss is the model's own mean over the batch's supervised tokens
(causal LM) or rows (seq-cls); eval_loss is the mean over all supervised tokens
(rows) of the evaluated batches, so batches of different sizes weigh fairly.

TrainConfig lives in configs.py (torch-free: the web judges values with it), re-exported here.
"""

import importlib.util
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peft_core import data, distributed, packing, task_metrics
from peft_core.checkpoint import Checkpoint, CheckpointError, capture_checkpoint, restore_checkpoint
from peft_core.configs import EVAL_SECONDS, TRAJECTORY_FIELDS, TrainConfig
from peft_core.data import Example, eval_batches, tokenize_rows, train_batches
from peft_core.decoding import greedy_completions
from peft_core.loss import causal_lm_loss


class Callbacks:
    """Hooks the loop calls; every method is a no-op here, override what you need."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Every `log_every` steps: train_loss, learning_rate, tokens, grad_norm, elapsed."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation: eval_loss (and eval_accuracy for seq-cls)."""

    def on_log(self, line: str) -> None:
        """A human-readable progress line."""

    def should_stop(self) -> bool:
        """Checked before every step; True ends training (cancel)."""
        return False

    def checkpoint_on_stop(self) -> bool:
        """Asked once should_stop() ended training: True hands on_checkpoint the state after
        the last finished step (a worker shutting down resumes there elsewhere)."""
        return False

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Every `checkpoint_every` steps: store it (checkpoint_to_files) to resume later."""


@dataclass(frozen=True)
class TrainResult:
    steps_done: int
    stopped: bool  # True when should_stop() ended training early
    metrics: dict[str, float] = field(default_factory=dict)  # last train and eval metrics
    wall_s: float = 0.0
    tokens: int = 0  # non-padding tokens seen in training
    train_s: float = 0.0  # of wall_s, the optimizer steps alone (no evaluation)
    early_stopped: bool = False  # the eval loss stopped improving (early_stop_patience)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message says what to change."""


class NonFiniteLossError(TrainingError):
    """`max_nonfinite_steps` steps in a row had a nan/inf loss or gradient norm."""


def train(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    train_rows: Sequence[dict],
    val_rows: Sequence[dict],
    config: TrainConfig,
    callbacks: Callbacks | None = None,
    label_names: Sequence[str] | None = None,
    resume: Checkpoint | None = None,
) -> TrainResult:
    """Train `model`'s trainable parameters on `train_rows`, evaluate on `val_rows`.

    For seq-cls, class ids follow `label_names` (default: sorted labels of the
    training rows). With `resume`, training goes on after the checkpoint's step, on
    the same rows and config as the run that wrote it. The model is left in eval mode.
    """
    callbacks = callbacks or Callbacks()
    labels = _labels_for(model, task, train_rows, label_names)
    max_length = effective_max_length(model, config)
    train_examples = tokenize_rows(
        train_rows, tokenizer, task=task, max_length=max_length, labels=labels
    )
    val_examples = tokenize_rows(
        val_rows, tokenizer, task=task, max_length=max_length, labels=labels
    )
    torch.manual_seed(config.seed)
    prepare_model(model, config)
    if config.packing:  # refused with the reason before any step (peft_core.packing)
        packing.refuse_unpackable(model, task=task, autocast=autocast(config, _device_of(model)))
    loop = _Loop(model, tokenizer, config, callbacks)
    if resume is not None:
        loop.restore(resume)
    with packing.no_kv_cache(model) if config.packing else nullcontext():
        return loop.run(train_examples, val_examples, val_rows=val_rows, task=task)


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    rows: Sequence[dict],
    config: TrainConfig,
    label_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """eval_loss (and eval_accuracy for seq-cls) over the first config.eval_batches batches,
    and the task metrics of config.eval_metrics (`evaluation`)."""
    labels = _labels_for(model, task, rows, label_names)
    max_length = effective_max_length(model, config)
    examples = tokenize_rows(rows, tokenizer, task=task, max_length=max_length, labels=labels)
    return evaluation(model, tokenizer, examples=examples, rows=rows, config=config, task=task)


def evaluation(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    examples: Sequence[Example],
    rows: Sequence[dict],
    config: TrainConfig,
    task: str,
) -> dict[str, float]:
    """The loss (and seq-cls metrics) over `examples`; for a causal LM, the generation metrics
    of config.eval_metrics over `rows` (generation_metrics)."""
    metrics = evaluate_examples(model, examples, config=config, pad_token_id=tokenizer.pad_token_id)
    names = task_metrics.metrics_for_task(config.eval_metrics, task)
    if task == "causal-lm" and names:
        metrics |= generation_metrics(model, tokenizer, rows, config=config, names=names)
    return metrics


@torch.no_grad()
def generation_metrics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict],
    *,
    config: TrainConfig,
    names: Sequence[str],
) -> dict[str, float]:
    """{eval_<name>: mean score} of the greedy answers to the first eval_batches × batch_size
    prompts (the rows the loss reads), at most config.max_new_tokens each (peft_core.decoding,
    task_metrics), generation_rows(config) at a time: a decoding step reads every weight
    whatever the batch (on a CPU, ~0.5 s for SmolLM2), so few large batches cost far less
    than many small ones, and without gradients a batch of 8 × batch_size rows needs less
    memory than training's batch_size.

    Ranks split each batch as the loss does and add their sums. Under FSDP every rank joins
    every forward: a rank without rows in a batch answers the batch's first prompt, uncounted,
    and generate() steps until all ranks are done (decoding's `synced`).
    """
    rows = [row for row in rows if "prompt" in row][: config.eval_batches * config.batch_size]
    here, sharded, device = distributed.world(), distributed.is_sharded(model), _device_of(model)
    sums, count, size = [0.0] * len(names), 0, generation_rows(config)
    for start in range(0, len(rows), size):
        batch = rows[start : start + size]
        first, stop = distributed.share_of(len(batch), here)
        mine = batch[first:stop]
        if not mine and not sharded:
            continue
        prompts = [row["prompt"] for row in mine or batch[:1]]
        with autocast(config, device):
            answers = greedy_completions(
                model, tokenizer, prompts, max_new_tokens=config.max_new_tokens, synced=sharded
            )
        if mine:
            scores = task_metrics.generation_sums(names, answers, [r["completion"] for r in mine])
            sums = [total + score for total, score in zip(sums, scores, strict=True)]
            count += len(mine)
    if here.parallel:
        *sums, count = distributed.sum_across([*sums, count], here, device)
    return task_metrics.generation_means(names, sums, round(count))


GENERATION_BATCH_FACTOR = 8  # generation_metrics' rows at a time, in training batches …
GENERATION_BATCH_MAX = 64  # … and at most


def generation_rows(config: TrainConfig) -> int:
    return max(
        config.batch_size, min(GENERATION_BATCH_FACTOR * config.batch_size, GENERATION_BATCH_MAX)
    )


ATTN_IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """fp32, bf16 or fp16: "auto" is bf16 on a CUDA GPU that supports it, else fp32."""
    if precision != "auto":
        return precision
    cuda = torch.device(device).type == "cuda"
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype a base model is loaded in for `precision` (fp32 for fp32)."""
    return HALF_DTYPES.get(resolve_precision(precision, device), torch.float32)


def autocast(config: TrainConfig, device: torch.device):
    """The forward's autocast context for the config's precision (a no-op for fp32)."""
    dtype = HALF_DTYPES.get(resolve_precision(config.precision, device))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def prepare_model(model: nn.Module, config: TrainConfig) -> None:
    """Attention kernel, gradient checkpointing and fp32 trainable weights, as configured."""
    if config.attn != "auto":
        wanted = ATTN_IMPLEMENTATIONS[config.attn]
        if wanted == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn flash needs the flash-attn package: pip install flash-attn")
        if getattr(model.config, "_attn_implementation", None) != wanted:
            try:
                model.set_attn_implementation(wanted)
            except (ValueError, ImportError) as error:
                raise ValueError(f"attn {config.attn}: {error}") from None
    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32 and param.is_floating_point():
            param.data = param.data.float()  # the master copy AdamW updates


def effective_max_length(model: nn.Module, config: TrainConfig) -> int:
    """config.max_length, capped at the model's position limit."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(config.max_length, limit) if isinstance(limit, int) else config.max_length


def _labels_for(
    model: nn.Module, task: str, rows: Sequence[dict], label_names: Sequence[str] | None
) -> list[str] | None:
    if task != "seq-cls":
        return None
    labels = list(label_names) if label_names is not None else data.label_names(rows)
    num_labels = getattr(getattr(model, "config", None), "num_labels", len(labels))
    if num_labels != len(labels):
        raise ValueError(
            f"the model has {num_labels} classes but the data has {len(labels)}: {labels}"
        )
    return labels


@torch.no_grad()
def evaluate_examples(
    model: nn.Module, examples: Sequence[Example], *, config: TrainConfig, pad_token_id: int
) -> dict[str, float]:
    """Token-weighted (causal LM) or row-weighted (seq-cls) loss, plus accuracy for seq-cls
    (and macro-F1 when config.eval_metrics asks for it)."""
    was_training = model.training
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    device = _device_of(model)
    classes = _counted_classes(model, examples, config)
    per_class = [0.0] * (3 * classes)  # task_metrics.class_counts: TP, FP, FN per class
    batches = eval_batches(
        examples,
        batch_size=config.batch_size,
        pad_token_id=pad_token_id,
        max_batches=config.eval_batches,
    )
    here = distributed.world()
    sharded = distributed.is_sharded(model)
    for whole in batches:
        batch = distributed.rows_of(whole, here)  # all of it in one process
        idle = batch["input_ids"].shape[0] == 0
        if idle and not sharded:
            continue
        if idle:  # FSDP gathers weights in every rank's forward: run one row, count nothing
            batch = {name: tensor[:1] for name, tensor in whole.items()}
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        with autocast(config, device):
            batch_loss, batch_count, predicted = _summed_loss(model, batch)
        if idle:
            continue
        loss_sum, count = loss_sum + batch_loss, count + batch_count
        if predicted is not None:
            expected = batch["labels"].tolist()
            correct += sum(p == e for p, e in zip(predicted, expected, strict=True))
            if classes:
                counts = task_metrics.class_counts(predicted, expected, classes)
                per_class = [a + b for a, b in zip(per_class, counts, strict=True)]
    if here.parallel:
        loss_sum, count, correct, *per_class = distributed.sum_across(
            [loss_sum, count, correct, *per_class], here, device
        )
        count, correct = round(count), round(correct)
    model.train(was_training)
    if count == 0:
        raise ValueError("no validation examples to evaluate")
    metrics = {"eval_loss": loss_sum / count}
    if examples and isinstance(examples[0].labels, int):
        metrics["eval_accuracy"] = correct / count
    if classes:
        metrics[task_metrics.metric_key("macro_f1")] = task_metrics.macro_f1(per_class)
    return metrics


def _counted_classes(model: nn.Module, examples: Sequence[Example], config: TrainConfig) -> int:
    """How many classes macro-F1 counts over: the model's labels where config asks for it."""
    if "macro_f1" not in config.eval_metrics or not examples:
        return 0
    if not isinstance(examples[0].labels, int):
        return 0
    return int(model.config.num_labels)


def _summed_loss(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[float, int, list[int] | None]:
    """(summed loss, supervised count, predicted classes (seq-cls) or None) for one batch."""
    labels = batch["labels"]
    if labels.dim() == 1:  # seq-cls: logits (B, C), labels (B,)
        logits = _forward(model, batch).logits.float()
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        return loss.item(), labels.numel(), logits.argmax(-1).tolist()
    summed, count = causal_lm_loss(model, batch)  # position t predicts token t + 1
    return summed.item(), count, None


def train_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's mean loss: the model's own for seq-cls, the chunked head's for a causal LM."""
    if batch["labels"].dim() == 1:
        return model(**batch).loss
    summed, count = causal_lm_loss(model, batch)
    return summed / count  # nan for a batch with nothing supervised: a skipped step


def supervised_count(batch: dict[str, torch.Tensor]) -> int:
    """What a batch's mean loss divides by: supervised next tokens (causal LM) or rows."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.shape[0]
    return int((labels[:, 1:] != data.IGNORE_INDEX).sum())


def share_loss(model: nn.Module, batch: dict[str, torch.Tensor], total: int) -> torch.Tensor:
    """This rank's share of a micro-batch's mean loss: its rows' summed loss over `total`,
    the supervised count of the whole micro-batch across ranks (peft_core.distributed)."""
    if batch["labels"].dim() == 1:
        return model(**batch).loss * (batch["labels"].shape[0] / total)
    summed, _ = causal_lm_loss(model, batch)
    return summed / total


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _every(interval: int, step: int) -> bool:
    """True at every `interval`-th step; an interval of 0 means never."""
    return interval > 0 and step % interval == 0


class _Loop:
    """One training run's state: optimizer, schedule, counters."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        config: TrainConfig,
        callbacks: Callbacks,
    ) -> None:
        self.model, self.config, self.callbacks = model, config, callbacks
        self.tokenizer, self.pad_token_id = tokenizer, tokenizer.pad_token_id
        self.val_rows: Sequence[dict] = ()  # what the generation metrics answer (run())
        self.task = ""
        self.named_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.params = list(self.named_params.values())
        if not self.params:
            raise TrainingError("the model has no trainable parameters; apply an adapter first")
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.device = _device_of(model)
        fp16 = resolve_precision(config.precision, self.device) == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.best_eval: float | None = None
        self.evals_without_gain = 0
        self.early_stopped = False
        self.start_step = 0  # steps done before this run: a resumed checkpoint's step
        self.tokens = 0
        self.train_s = 0.0  # time in optimizer steps, evaluations left out
        self._step_started = 0.0
        self.nonfinite_streak = 0
        self.metrics: dict[str, float] = {}
        self.world = distributed.world()

    def _lr_factor(self, step: int) -> float:
        warmup, steps = self.config.warmup_steps, self.config.steps
        if step < warmup:
            return (step + 1) / warmup
        if self.config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if self.config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from `checkpoint`; refuse one of another config or model."""
        if checkpoint.config_digest != self.config.trajectory_digest():
            raise CheckpointError(
                "the checkpoint was written under another training config "
                f"(one of {', '.join(TRAJECTORY_FIELDS)} differs)"
            )
        if not 0 < checkpoint.step < self.config.steps:
            raise CheckpointError(
                f"the checkpoint is at step {checkpoint.step}; this run has {self.config.steps}"
            )
        restore_checkpoint(
            checkpoint,
            named_params=self.named_params,
            optimizer=self.optimizer,
            scheduler=self.schedule,
        )
        self.start_step, self.tokens = checkpoint.step, checkpoint.tokens
        self.nonfinite_streak = checkpoint.nonfinite_streak
        self.metrics = dict(checkpoint.metrics)

    def checkpoint(self, step: int) -> Checkpoint:
        return capture_checkpoint(
            step,
            named_params=self.named_params,
            optimizer=self.optimizer,
            scheduler=self.schedule,
            config_digest=self.config.trajectory_digest(),
            tokens=self.tokens,
            metrics=self.metrics,
            nonfinite_streak=self.nonfinite_streak,
        )

    def run(
        self,
        train_examples: list[Example],
        val_examples: list[Example],
        *,
        val_rows: Sequence[dict] = (),
        task: str = "",
    ) -> TrainResult:
        started = time.perf_counter()
        self.val_rows, self.task = val_rows, task
        if self.start_step:
            self.callbacks.on_log(f"resumed from step {self.start_step}")
        batches = train_batches(
            train_examples,
            batch_size=self.config.batch_size,
            pad_token_id=self.pad_token_id,
            seed=self.config.seed,
            skip=self.start_step * self.config.grad_accum,
            pack_length=effective_max_length(self.model, self.config)
            if self.config.packing
            else None,
        )
        steps_done, stopped = self._train_steps(batches, val_examples, started)
        if not stopped and not self.early_stopped:
            self._evaluate(steps_done, val_examples)
        self.model.eval()
        wall_s = time.perf_counter() - started
        return TrainResult(
            steps_done,
            stopped,
            dict(self.metrics),
            wall_s,
            self.tokens,
            train_s=self.train_s,
            early_stopped=self.early_stopped,
        )

    def _train_steps(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        val_examples: list[Example],
        started: float,
    ) -> tuple[int, bool]:
        self.model.train()
        batch_iter = iter(batches)
        for step in range(self.start_step + 1, self.config.steps + 1):
            if distributed.any_rank(self.callbacks.should_stop(), self.world, self.device):
                self.callbacks.on_log(f"stopped before step {step}")
                if self.start_step < step - 1 and self.callbacks.checkpoint_on_stop():
                    self.callbacks.on_checkpoint(self.checkpoint(step - 1))
                return step - 1, True
            micro = [next(batch_iter) for _ in range(self.config.grad_accum)]
            self._step_started = time.perf_counter()
            self._step(step, micro, started)
            self.train_s += time.perf_counter() - self._step_started
            if step < self.config.steps and _every(self.config.eval_every, step):
                self._evaluate(step, val_examples)
                self.model.train()
                if self._no_longer_improving():
                    self.callbacks.on_log(
                        f"stopped early at step {step}: eval loss {self.best_eval:.4f} not "
                        f"beaten in {self.evals_without_gain} evaluations"
                    )
                    self.early_stopped = True
                    return step, False
            if step < self.config.steps and _every(self.config.checkpoint_every, step):
                self.callbacks.on_checkpoint(self.checkpoint(step))
        return self.config.steps, False

    def _no_longer_improving(self) -> bool:
        """Early stopping's count: evaluations in a row without a lower eval loss."""
        loss = self.metrics.get("eval_loss")
        if loss is None or not self.config.early_stop_patience:
            return False
        if self.best_eval is None or loss < self.best_eval:
            self.best_eval, self.evals_without_gain = loss, 0
            return False
        self.evals_without_gain += 1
        return self.evals_without_gain >= self.config.early_stop_patience

    def _step(self, step: int, micro: list[dict[str, torch.Tensor]], started: float) -> None:
        """One optimizer step over `micro` (grad_accum micro-batches)."""
        learning_rate = self.schedule.get_last_lr()[0]
        if self.world.parallel:
            loss, tokens = self._parallel_backward(micro)
        else:
            loss, tokens = self._backward(micro)
        grad_norm = None
        if torch.isfinite(loss):
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            clip = self.config.grad_clip or math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if self.scaler and grad_norm is not None and not torch.isfinite(grad_norm):
            self._scaler_skip(step)  # fp16 overflow: the scaler lowers its scale
            return
        if grad_norm is None or not torch.isfinite(grad_norm):
            self._skip_step(step, loss.item(), None if grad_norm is None else grad_norm.item())
            return
        self.nonfinite_streak = 0
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens += tokens
        self._report_step(step, loss.item(), learning_rate, grad_norm.item(), started)

    def _backward(self, micro: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, int]:
        """One process: each micro-batch's mean loss, backward; (their mean, tokens)."""
        losses, tokens = [], 0
        for batch in micro:
            batch_tokens = int(batch["attention_mask"].sum())  # non-padding, packed or not
            batch = {k: v.to(self.device) for k, v in packing.model_batch(batch).items()}
            with autocast(self.config, self.device):
                loss = train_loss(self.model, batch)
            losses.append(loss.detach())
            if not torch.isfinite(loss):
                break
            scaled = loss / len(micro)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            tokens += batch_tokens
        return torch.stack(losses).float().mean(), tokens

    def _parallel_backward(self, micro: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, int]:
        """This rank's rows of each micro-batch, weighted by the micro-batch's supervised
        tokens over all ranks; the gradients then summed across ranks, so every rank holds
        what one process would have from the whole batch (peft_core.distributed)."""
        here = self.world
        sharded = distributed.is_sharded(self.model)  # FSDP: every rank in every forward
        batches = [packing.model_batch(distributed.rows_of(batch, here)) for batch in micro]
        totals = distributed.sum_across(
            [supervised_count(batch) for batch in batches], here, self.device
        )
        shares: list[float] = []
        for whole, batch, total in zip(micro, batches, totals, strict=True):
            idle = batch["labels"].shape[0] == 0
            if total == 0 or (idle and not sharded):
                shares.append(0.0 if total else math.nan)
                continue
            if idle:  # one row of the batch, weighted 0: it adds nothing to any gradient
                batch = {k: v[:1] for k, v in packing.model_batch(whole).items()}
            batch = {k: v.to(self.device) for k, v in batch.items()}
            rows = whole["input_ids"].shape[0]
            # The backward too draws its masks for the whole batch: under gradient
            # checkpointing it recomputes the forward, dropout masks included.
            with distributed.drawing_for_whole_batch(rows, here):
                with autocast(self.config, self.device):
                    loss = share_loss(self.model, batch, round(total))
                if idle:
                    loss = loss * 0.0
                shares.append(loss.item())
                if not math.isfinite(shares[-1]) and not sharded:
                    break
                scaled = loss / len(micro)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        shares += [math.nan] * (len(micro) - len(shares))  # a micro-batch not reached
        losses = distributed.sum_across(shares, here, self.device)
        distributed.sum_gradients(self.params, here)
        distributed.sync_random_state(here, self.device)
        if any(not math.isfinite(value) for value in losses):
            return torch.tensor(math.nan), 0
        tokens = sum(int(batch["attention_mask"].sum()) for batch in micro)  # as one process
        return torch.tensor(sum(losses) / len(micro)), tokens

    def _scaler_skip(self, step: int) -> None:
        self.scaler.step(self.optimizer)  # sees the inf and does not update
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.schedule.step()
        self.callbacks.on_log(f"step {step}/{self.config.steps}: fp16 overflow, loss scale lowered")

    def _skip_step(self, step: int, loss: float, grad_norm: float | None) -> None:
        """No update for a nan/inf step, but the schedule moves on (see the module doc)."""
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # skipping the update is the point, not a slip
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.schedule.step()
        self.nonfinite_streak += 1
        what = f"loss became {loss}" if grad_norm is None else f"gradient norm became {grad_norm}"
        streak, limit = self.nonfinite_streak, self.config.max_nonfinite_steps
        if streak >= limit:
            raise NonFiniteLossError(
                f"the {what} at step {step}, {streak} non-finite step(s) in a row "
                f"(max_nonfinite_steps {limit}); lower the learning rate "
                f"(now {self.config.learning_rate:g}) or check the data"
            )
        self.callbacks.on_log(
            f"step {step}/{self.config.steps} skipped: the {what} ({streak} in a row)"
        )

    def _report_step(
        self, step: int, loss: float, learning_rate: float, grad_norm: float, started: float
    ) -> None:
        metrics = {
            "train_loss": loss,
            "learning_rate": learning_rate,
            "tokens": float(self.tokens),
            "grad_norm": grad_norm,
            "elapsed": time.perf_counter() - started,
            # the steps' own time: what tokens/s and the time left are read from
            "train_s": self.train_s + time.perf_counter() - self._step_started,
        }
        self.metrics.update(metrics)
        if step % self.config.log_every == 0 or step == self.config.steps:
            self.callbacks.on_step(step, metrics)
            self.callbacks.on_log(
                f"step {step}/{self.config.steps} loss {loss:.4f} lr {learning_rate:.3g}"
            )

    def _evaluate(self, step: int, val_examples: list[Example]) -> None:
        if not val_examples:
            return
        began = time.perf_counter()
        metrics = evaluation(
            self.model, self.tokenizer, examples=val_examples, rows=self.val_rows,
            config=self.config, task=self.task,
        )  # fmt: skip
        self.metrics.update(metrics)
        # how long it took, beside its figures (not in the log line): the time left counts it
        self.callbacks.on_eval(step, metrics | {EVAL_SECONDS: time.perf_counter() - began})
        self.callbacks.on_log(
            f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )
