"""`peftlab`: train an adapter locally, list the model catalogue and sample datasets.

    peftlab train --model tiny-llama --dataset sample-instructions --method lora \\
                  --set r=8 --set alpha=16 --steps 30 --output out/
    peftlab models
    peftlab datasets

`train` writes adapter_config.json + adapter_model.safetensors (HF PEFT layout; with
--method full, the whole model as transformers saves one, tokenizer included)
and metrics.jsonl (one JSON object per logged step and per evaluation; step 0 is
the base model before training) into --output. Every evaluation has eval_loss and the
task metrics of --eval-metrics as eval_<name> (a sample dataset's own by default:
accuracy and macro_f1 for sample-sentiment; none for sample-instructions, which scores
exact_match when asked).
--data is split 90/10 (--val-fraction), or trains whole with --val-data as the
validation split. Usage errors exit with code 2 and a one-line message, never a traceback.
"""

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from huggingface_hub import constants as hf_constants
from tqdm import tqdm

from peft_core import (
    apply,
    disabled,
    distributed,
    is_whole_model,
    save_adapter,
    trainable_parameters,
)
from peft_core.catalogue import CATALOGUE, load_model, model_dir, upstream_name
from peft_core.checks import ConfigError, settings
from peft_core.configs import (
    eval_metric_names,
    refuse_eval_metrics,
    refuse_fsdp,
    refuse_packing,
    refuse_quantized,
)
from peft_core.data import DatasetError, label_names, parse_dataset, split_rows
from peft_core.preflight import PreflightError, refuse_if_too_big
from peft_core.pretrained import load_config, load_directory, model_tasks
from peft_core.registry import METHOD_CONFIGS, with_tokenizer
from peft_core.samples import SAMPLES, sample_rows
from peft_core.sources import (
    ModelSourceError,
    hub_commit,
    hub_snapshot,
    is_hub_ref,
    model_files,
    parse_hub_ref,
)
from peft_core.train import (
    Callbacks,
    TrainConfig,
    TrainingError,
    compute_dtype,
    evaluate,
    train,
)

# Method name -> its config class (registry.METHOD_CONFIGS, from methods.METHOD_LIST); the
# CLI's defaults are the configs' own, as the web form's and the API's are.
METHODS: dict[str, type] = METHOD_CONFIGS
METRICS_FILE = "metrics.jsonl"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


class UsageError(Exception):
    """A bad command line; reported as `peftlab: error: …` with exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # what a torchrun child is started with (--devices N)
    try:
        return args.run(args)
    except (UsageError, DatasetError) as error:
        parser.error(str(error))  # exits 2
    except TrainingError as error:
        print(f"peftlab: training failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("peftlab: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_command(commands)
    models = commands.add_parser("models", help="list the model catalogue")
    models.set_defaults(run=run_models)
    datasets = commands.add_parser("datasets", help="list the built-in sample datasets")
    datasets.set_defaults(run=run_datasets)
    return parser


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    train_parser = commands.add_parser("train", help="train an adapter locally")
    train_parser.add_argument(
        "--model",
        required=True,
        help=f"a bundled model ({', '.join(CATALOGUE)}), a directory in Hugging Face layout, "
        "or a Hub id@revision (resolved in the HF cache; only there when HF_HUB_OFFLINE=1)",
    )
    source = train_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=sorted(SAMPLES), help="a built-in sample dataset")
    source.add_argument(
        "--data", type=Path, help="a .csv or .jsonl file (split 90/10, or see --val-data)"
    )
    train_parser.add_argument(
        "--val-data",
        type=Path,
        metavar="FILE",
        help="with --data: a .csv or .jsonl validation file; --data is then all training",
    )
    train_parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"with --data alone: the share of its rows held out for validation, in "
        f"(0, {MAX_VAL_FRACTION}] (default {DEFAULT_VAL_FRACTION})",
    )
    train_parser.add_argument(
        "--task", choices=("causal-lm", "seq-cls"), help="default: the data's"
    )
    train_parser.add_argument("--method", choices=sorted(METHODS), default="lora")
    train_parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a method config field"
    )
    train_parser.add_argument("--output", type=Path, required=True, help="adapter directory")
    train_parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    train_parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    train_parser.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    train_parser.add_argument("--max-length", type=int, default=TrainConfig.max_length)
    train_parser.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    train_parser.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    train_parser.add_argument("--eval-batches", type=int, default=TrainConfig.eval_batches)
    train_parser.add_argument(
        "--eval-metrics",
        metavar="NAMES",
        help="task metrics beside the loss, comma-separated: accuracy, macro_f1 "
        "(classification); exact_match, contains, token_f1, rouge_l, chrf (generation, on "
        "greedy answers to the first eval-batches × batch-size validation prompts); none. "
        "Default: a sample dataset's own, none for --data",
    )
    train_parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=TrainConfig.max_new_tokens,
        help="generation metrics: the longest answer per prompt (each stops at its eos)",
    )
    train_parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    _add_envelope_arguments(train_parser)
    train_parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train (auto: a GPU if there is one)",
    )
    train_parser.add_argument(
        "--devices",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel processes (1-8), started with torchrun: one per GPU, or N CPU "
        "processes (gloo) with --device cpu; each takes 1/N of every batch",
    )
    train_parser.add_argument(
        "--parallel",
        choices=("ddp", "fsdp"),
        default=TrainConfig.parallel,
        help="with --devices 2 or more: ddp (each process holds the whole base) or fsdp (the "
        "frozen base is split over the processes, for a base that does not fit one device)",
    )
    train_parser.add_argument("--cache-dir", type=Path, help="model cache (~/.cache/peftlab)")
    train_parser.add_argument(
        "--no-preflight",
        action="store_true",
        help="train even when the estimated peak memory exceeds the free memory",
    )
    train_parser.set_defaults(run=run_train)


def _add_envelope_arguments(parser: argparse.ArgumentParser) -> None:
    """The training envelope's settings, named as TRL and Axolotl users know them."""
    values = {name: rule.values for name, (_, rule) in settings(TrainConfig).items()}
    parser.add_argument("--precision", choices=values["precision"], default=TrainConfig.precision)
    parser.add_argument("--schedule", choices=values["schedule"], default=TrainConfig.schedule)
    parser.add_argument("--attn", choices=values["attn"], default=TrainConfig.attn)
    parser.add_argument("--quantize", choices=values["quantize"], default=TrainConfig.quantize)
    parser.add_argument("--grad-accum", type=int, default=TrainConfig.grad_accum)
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations"
    )
    parser.add_argument("--max-grad-norm", type=float, default=TrainConfig.grad_clip)
    parser.add_argument("--early-stop-patience", type=int, default=TrainConfig.early_stop_patience)
    parser.add_argument(
        "--packing",
        action="store_true",
        help="causal LM: several examples per row of --max-length tokens, kept apart",
    )


# --- peftlab models / datasets ----------------------------------------------


def run_models(args: argparse.Namespace) -> int:
    for spec in CATALOGUE.values():
        print(f"{spec.key:24} {','.join(spec.tasks):18} {spec.title}")
    return 0


def run_datasets(args: argparse.Namespace) -> int:
    for spec in SAMPLES.values():
        print(f"{spec.key:24} {spec.task:10} {spec.description}")
    return 0


# --- peftlab train ----------------------------------------------------------


MAX_DEVICES = 8
DEFAULT_VAL_FRACTION = 0.1
MAX_VAL_FRACTION = 0.5


def run_train(args: argparse.Namespace) -> int:
    method_config = parse_method_config(METHODS[args.method], args.set)
    train_config = _train_config(args)
    _check_devices(args, train_config)
    if args.devices > 1 and not distributed.launched_by_torchrun():
        base = resolve_base(args.model)
        if base.directory is None:  # a bundled model: converted once here, not by each rank
            model_dir(base.name, cache_dir=args.cache_dir)
        return _torchrun(args)
    try:
        return _train_here(args, method_config, train_config)
    finally:
        distributed.shutdown()


def _check_devices(args: argparse.Namespace, train_config: TrainConfig) -> None:
    global DEVICE
    if not 1 <= args.devices <= MAX_DEVICES:
        raise UsageError(f"--devices must be 1 to {MAX_DEVICES}, not {args.devices}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no GPU is visible to torch here")
    if args.device != "auto":
        DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and args.devices > torch.cuda.device_count():
        raise UsageError(
            f"--devices {args.devices}: only {torch.cuda.device_count()} GPU(s) are visible"
        )
    try:
        refuse_fsdp(
            train_config.parallel, method=args.method, quantize=train_config.quantize,
            devices=args.devices,
        )  # fmt: skip
    except ValueError as error:
        raise UsageError(f"--parallel {error}") from None
    if args.devices > train_config.batch_size:
        raise UsageError(
            f"--devices {args.devices} needs --batch-size of at least {args.devices}: each "
            "process trains on its share of every batch"
        )


def _torchrun(args: argparse.Namespace) -> int:
    """Start `--devices` copies of this command under torchrun (a standalone rendezvous on
    this host); each joins the process group as it starts (distributed.init_from_torchrun)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={args.devices}", "-m", "peft_core.cli", *args.argv,
    ]  # fmt: skip
    return subprocess.run(command, check=False).returncode


def _train_here(args: argparse.Namespace, method_config: Any, train_config: TrainConfig) -> int:
    global DEVICE
    if distributed.launched_by_torchrun():
        DEVICE = distributed.init_from_torchrun(DEVICE.type)
    here = distributed.world()
    base = resolve_base(args.model)
    task, train_rows, val_rows = _load_rows(args, base)
    labels = label_names(train_rows) if task == "seq-cls" else None
    train_config = _with_eval_metrics(args, train_config, task, val_rows)
    try:
        refuse_quantized(args.method, train_config.quantize)
        refuse_packing(train_config.packing, method=args.method, task=task)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not args.no_preflight:
        _refuse_what_cannot_fit(base, task, labels, train_config, method_config, args.cache_dir)
    dtype = compute_dtype(train_config.precision, DEVICE)
    evaluation = {"task": task, "rows": val_rows, "config": train_config, "label_names": labels}
    if train_config.parallel == "fsdp":  # the base is split over the ranks, then evaluated

        def load_and_shard():
            model, tokenizer = _load_base(base, task, labels, args.cache_dir, dtype)
            torch.manual_seed(train_config.seed)
            apply(model, with_tokenizer(method_config, tokenizer))
            distributed.shard_base(model, DEVICE)
            return model, tokenizer

        model, tokenizer = distributed.in_turn(load_and_shard)
        with disabled(model):
            base_metrics, base_s = _timed_evaluation(model, tokenizer, evaluation)
    else:
        model, tokenizer = _load_base(
            base, task, labels, args.cache_dir, dtype, train_config.quantize
        )
        if train_config.quantize == "none":  # a quantised base is placed as it loads
            model.to(DEVICE)
        base_metrics, base_s = _timed_evaluation(model, tokenizer, evaluation)
        torch.manual_seed(train_config.seed)  # the adapter's initialisation, equal on each rank
        apply(model, with_tokenizer(method_config, tokenizer))
    if not here.is_main:  # a data-parallel helper: trains its share, writes nothing
        train(
            model, tokenizer, task=task, train_rows=train_rows, val_rows=val_rows,
            config=train_config, label_names=labels,
        )  # fmt: skip
        return 0
    ranks = f" on {here.size} processes ({DEVICE.type})" if here.parallel else ""
    if distributed.is_sharded(model):
        held, whole = distributed.held_here(model)
        ranks += f", FSDP: this process holds {held:,} of the base's {whole:,} split weights"
    print(
        f"{args.model} + {args.method}: {trainable_parameters(model):,} trainable parameters{ranks}"
    )
    print(
        f"{len(train_rows)} training rows, {len(val_rows)} validation rows; the base model's "
        f"evaluation took {base_s:.1f} s"
    )
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / METRICS_FILE, "w") as metrics_file:
        callbacks = ProgressCallbacks(train_config.steps, metrics_file)
        callbacks.on_eval(0, base_metrics)
        try:
            result = train(
                model, tokenizer, task=task, train_rows=train_rows, val_rows=val_rows,
                config=train_config, callbacks=callbacks, label_names=labels,
            )  # fmt: skip
        except ConfigError as error:  # a setting the loaded model refuses (e.g. packing)
            raise UsageError(str(error)) from None
        finally:
            callbacks.close()
    save_adapter(model, args.output, base_model_name_or_path=base.upstream, revision=base.revision)
    if is_whole_model(model):  # full fine-tuning: a whole model directory, tokenizer included
        tokenizer.save_pretrained(args.output)
    _print_summary(base_metrics, result.metrics, result.wall_s, args.output)
    return 0


def _timed_evaluation(model, tokenizer, evaluation: dict) -> tuple[dict[str, float], float]:
    started = time.perf_counter()
    metrics = evaluate(model, tokenizer, **evaluation)
    return metrics, time.perf_counter() - started


def parse_method_config(config_cls: type, assignments: Sequence[str]) -> Any:
    """`config_cls(**fields)` from "key=value" strings, converted to the fields' types."""
    hints = typing.get_type_hints(config_cls)
    fields = {field.name for field in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        key = key.strip()
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {assignment!r}")
        if key not in fields:
            raise UsageError(
                f"unknown {config_cls.__name__} field {key!r}; known: {', '.join(sorted(fields))}"
            )
        values[key] = convert_value(raw.strip(), hints[key], key)
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


def convert_value(raw: str, annotation: Any, key: str) -> Any:
    """`raw` as a value of `annotation`: int, float, bool, str, tuple[str, ...], or a union.

    In a union, the most specific type that reads `raw` wins ("8" is an int before
    a str). A tuple-or-str field (target_modules) reads comma-separated names as a
    tuple and anything else ("all-linear", a regex) as the string.
    """
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if type(None) in options and raw.lower() in ("none", "null", ""):
        return None
    kinds = sorted((o for o in options if o is not type(None)), key=_conversion_order)
    for kind in kinds:
        converted = _try_convert(raw, kind, tuple_needs_names=str in kinds)
        if converted is not _FAILED:
            return converted
    raise UsageError(f"--set {key}: cannot read {raw!r} as {_type_name(annotation)}")


_FAILED = object()
_NAME_LIST = re.compile(r"[\w.]+(\s*,\s*[\w.]+)*")
_CONVERSION_ORDER = (bool, int, float, tuple, str)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _conversion_order(kind: Any) -> int:
    origin = typing.get_origin(kind) or kind
    return (
        _CONVERSION_ORDER.index(origin) if origin in _CONVERSION_ORDER else len(_CONVERSION_ORDER)
    )


def _try_convert(raw: str, kind: Any, *, tuple_needs_names: bool) -> Any:
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        lowered = raw.lower()
        return True if lowered in TRUE_WORDS else False if lowered in FALSE_WORDS else _FAILED
    if origin is tuple:
        if tuple_needs_names and not _NAME_LIST.fullmatch(raw):
            return _FAILED
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    try:
        return origin(raw) if origin in (int, float, str) else _FAILED
    except ValueError:
        return _FAILED


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    try:
        return TrainConfig(
            steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
            max_length=args.max_length, warmup_steps=args.warmup_steps,
            eval_every=args.eval_every, seed=args.seed, precision=args.precision,
            schedule=args.schedule, attn=args.attn, grad_accum=args.grad_accum,
            gradient_checkpointing=args.gradient_checkpointing, grad_clip=args.max_grad_norm,
            early_stop_patience=args.early_stop_patience, quantize=args.quantize,
            packing=args.packing, parallel=args.parallel, eval_batches=args.eval_batches,
            max_new_tokens=args.max_new_tokens,
        )  # fmt: skip
    except ValueError as error:
        raise UsageError(str(error)) from None


def _with_eval_metrics(
    args: argparse.Namespace, config: TrainConfig, task: str, val_rows: list[dict]
) -> TrainConfig:
    """`config` with --eval-metrics (default: the sample dataset's own), refused where the
    task or the rows cannot compute them."""
    if args.eval_metrics is None:
        names = SAMPLES[args.dataset].eval_metrics if args.dataset else ()
    elif args.eval_metrics.strip().lower() == "none":
        names = ()
    else:
        names = args.eval_metrics
    columns = tuple(val_rows[0]) if val_rows else None
    try:
        names = eval_metric_names(names)
        refuse_eval_metrics(names, task=task, columns=columns)
    except ValueError as error:
        raise UsageError(f"--eval-metrics: {error}") from None
    return dataclasses.replace(config, eval_metrics=names)


def _load_rows(args: argparse.Namespace, base: "Base") -> tuple[str, list[dict], list[dict]]:
    """(task, train rows, validation rows) from --dataset or --data."""
    if args.dataset:
        if args.val_data is not None:
            raise UsageError("--val-data goes with --data; a sample dataset has its own split")
        task = SAMPLES[args.dataset].task
        if args.task and args.task != task:
            raise UsageError(f"{args.dataset} is a {task} dataset, not {args.task}")
        return (task, *sample_rows(args.dataset))
    task = args.task or base.tasks[0]
    rows = _read_rows(args.data, task, "--data")
    if args.val_data is not None:
        return task, rows, _read_rows(args.val_data, task, "--val-data")
    if not 0 < args.val_fraction <= MAX_VAL_FRACTION:
        raise UsageError(
            f"--val-fraction must be in (0, {MAX_VAL_FRACTION}], not {args.val_fraction}"
        )
    if len(rows) < 2:
        raise UsageError(f"{args.data} has {len(rows)} row; training and validation need 2 or more")
    return (task, *split_rows(rows, val_fraction=args.val_fraction, seed=args.seed))


def _read_rows(path: Path, task: str, option: str) -> list[dict]:
    fmt = _file_format(path, option)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    if option == "--data":
        return parse_dataset(content, fmt=fmt, task=task)
    try:
        return parse_dataset(content, fmt=fmt, task=task)
    except DatasetError as error:  # which of the two files the line is in
        raise UsageError(f"{option} {path.name}: {error}") from None


@dataclass(frozen=True)
class Base:
    """The base model --model names: a bundled key, or a directory (local or a Hub snapshot)."""

    name: str
    tasks: tuple[str, ...]
    upstream: str  # what the saved adapter names as base_model_name_or_path
    directory: Path | None = None  # None: a bundled model
    revision: str | None = None  # a Hub model's commit


def resolve_base(text: str) -> Base:
    """--model's base: a catalogue key, an existing directory, else a Hub id@revision."""
    if text in CATALOGUE:
        return Base(text, CATALOGUE[text].tasks, upstream_name(text))
    try:
        if Path(text).expanduser().is_dir():
            directory = Path(text).expanduser().resolve()
            upstream, revision = str(directory), None
        elif is_hub_ref(text):
            ref = parse_hub_ref(text)
            directory = hub_snapshot(ref, hf_constants.HF_HUB_CACHE)
            upstream, revision = ref.repo_id, hub_commit(directory)
        else:
            known = ", ".join(CATALOGUE)
            raise UsageError(
                f"--model {text!r} is not a bundled model ({known}), a directory, or a Hub id"
            )
        model_files(directory)  # refuses pickle-only weights and models that need their code
        tasks = model_tasks(load_config(directory))
    except ModelSourceError as error:
        raise UsageError(str(error)) from None
    if not tasks:
        raise UsageError(f"{text} has no causal-LM or sequence-classification head to train")
    return Base(text, tasks, upstream, directory, revision)


def _file_format(path: Path, option: str = "--data") -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ("csv", "jsonl"):
        raise UsageError(f"{option} must be a .csv or .jsonl file, got {path.name!r}")
    return suffix


def _load_base(
    base: Base,
    task: str,
    labels: list[str] | None,
    cache_dir: Path | None,
    dtype=None,
    quantize: str = "none",
):
    """The base model in `dtype`, the run's precision; quantised through bitsandbytes."""
    if task not in base.tasks:
        raise UsageError(f"model {base.name!r} supports {', '.join(base.tasks)}, not {task}")
    num_labels = len(labels or ()) or 2
    if quantize != "none":
        directory = base.directory or model_dir(base.name, cache_dir=cache_dir)
        name = str(dtype).removeprefix("torch.") if dtype is not None else None
        return load_directory(
            directory, task, num_labels=num_labels, dtype=name, quantize=quantize, device=DEVICE
        )
    if base.directory is None:
        model, tokenizer = load_model(base.name, task, num_labels=num_labels, cache_dir=cache_dir)
        return model.to(dtype or torch.float32), tokenizer
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    return load_directory(base.directory, task, num_labels=num_labels, dtype=name)


def _refuse_what_cannot_fit(
    base: Base,
    task: str,
    labels: list[str] | None,
    train_config: TrainConfig,
    method_config: Any,
    cache_dir: Path | None,
) -> None:
    """Exit 2 before loading when the run's estimated peak exceeds the free memory
    (peft_core.preflight, from config.json on the meta device); --no-preflight skips this."""
    directory = base.directory or model_dir(base.name, cache_dir=cache_dir)
    try:
        refuse_if_too_big(
            directory, train_config, method_config, str(DEVICE),
            task=task, num_labels=len(labels or ()) or 2, devices=distributed.world().size,
        )  # fmt: skip
    except PreflightError as error:
        raise UsageError(f"{error} (--no-preflight to try anyway)") from None


def _print_summary(
    base: dict[str, float], final: dict[str, float], wall_s: float, output: Path
) -> None:
    print(
        f"eval loss: base {base['eval_loss']:.4f} -> trained {final.get('eval_loss', float('nan')):.4f}"
    )
    for key in base:
        if key.startswith("eval_") and key != "eval_loss" and key in final:
            name = key.removeprefix("eval_")
            print(f"eval {name}: base {base[key]:.3f} -> trained {final[key]:.3f}")
    print(f"trained in {wall_s:.1f} s; adapter and {METRICS_FILE} written to {output}")


class ProgressCallbacks(Callbacks):
    """A tqdm bar with the live loss, and one metrics.jsonl line per step and evaluation."""

    def __init__(self, steps: int, metrics_file: TextIO) -> None:
        self.bar = tqdm(total=steps, unit="step", dynamic_ncols=True)
        self.metrics_file = metrics_file
        self.done = 0

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._write(step, metrics)
        self.bar.update(step - self.done)
        self.done = step
        self.bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._write(step, metrics)
        self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()

    def close(self) -> None:
        self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
