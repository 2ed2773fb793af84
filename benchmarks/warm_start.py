"""Warm starts: seconds from a run's claim to its first training step, cold and warm.

    .venv/bin/python benchmarks/warm_start.py [--model smollm2-135m-instruct|tiny-llama]
        [--rounds 2] [--eval-batches 8]

The real worker path, in this process: workers.training.execute_run on queued LoRA runs
(the built-in instruction set) in a throwaway SQLite database. A run is cancelled right
after its first step. Marks along the way (patched in, nothing else changes):

    claimed      leases.run_claim returned
    rows         dataset_rows returned (train / validation rows)
    model        base_model_copy returned (cache hit or load)
    adapted      peft_core.apply returned
    base eval    evaluate() of the base model, before training (start, end)
    step 1       the loop's first heartbeat (the step starts) and its on_step (it ended)

"cold" is the first run of the process (empty model cache; the GGUF -> safetensors
conversion is already on disk: run once to make it, ~17-40 s). Then each round runs, on
the same base model:
    warm (shared copy)   workers.cache.shared_copy, new modules over the cached weights,
                         with the base model evaluated again (the memo switched off)
    warm (deepcopy)      the copy shared_copy replaced: copy.deepcopy of the cached model,
                         base model evaluated again
    + base metrics       the worker's path: shared copy, and the base evaluation
                         remembered per (model, data, eval settings) by
                         workers.cache.base_metrics (the cold run fills it)
Figures are medians over the rounds. Goal (issue 6, part 2): warm claim -> step 1 <= 2 s.
"""

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAR = tempfile.mkdtemp(prefix="peftlab-warm-start-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["PEFTLAB_VAR_DIR"] = VAR  # a throwaway SQLite database and broker folder
os.environ.pop("DATABASE_URL", None)
os.environ.setdefault("PEFTLAB_CACHE_DIR", str(ROOT / "var" / "cache"))  # converted models
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
sys.path.insert(0, str(ROOT))

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402

import peft_core  # noqa: E402
from webapp.experiments import leases  # noqa: E402
from workers import cache, training  # noqa: E402

PHASES = (
    ("claim -> rows", "claimed", "rows"),
    ("rows -> base model copy", "rows", "model"),
    ("copy -> adapter applied", "model", "adapted"),
    ("base evaluation", "eval_start", "eval_end"),
    ("eval end -> step 1 starts", "eval_end", "step_start"),
    ("step 1 (fwd + bwd + AdamW)", "step_start", "step_end"),
)


class Marks:
    """Timestamps of one run, set by the patched-in wrappers."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.at.setdefault(name, time.perf_counter())

    def span(self, start: str, end: str) -> float:
        return self.at[end] - self.at[start]


CURRENT = Marks()


def _after(name: str, function):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        CURRENT.mark(name)
        return result

    return wrapped


MEMO_BASE_METRICS = {"on": False}


def _base_metrics(memoised):
    """workers.cache.base_metrics, marked; with the memo off it evaluates every time (the
    path before the worker remembered base-model figures)."""

    def wrapped(key, evaluate):
        CURRENT.mark("eval_start")
        result = memoised(key, evaluate) if MEMO_BASE_METRICS["on"] else evaluate()
        CURRENT.mark("eval_end")
        return result

    return wrapped


def instrument() -> None:
    leases.run_claim = _after("claimed", leases.run_claim)
    training.dataset_rows = _after("rows", training.dataset_rows)
    training.base_model_copy = _after("model", training.base_model_copy)
    peft_core.apply = _after("adapted", peft_core.apply)
    cache.base_metrics = _base_metrics(cache.base_metrics)
    callbacks = training.RunCallbacks
    on_step = callbacks.on_step

    def should_stop(self) -> bool:  # asked before every step: step 1 starts, or it cancels
        if "step_end" in CURRENT.at:
            return True
        CURRENT.mark("step_start")
        return False

    def on_step_marked(self, step, metrics) -> None:
        CURRENT.mark("step_end")
        on_step(self, step, metrics)

    callbacks.on_step = on_step_marked
    callbacks.should_stop = should_stop  # cancel after step 1


def setup_database():
    from django.contrib.auth import get_user_model

    from webapp.accounts.models import Membership, Role, Team
    from webapp.experiments.models import Dataset, Project

    call_command("migrate", verbosity=0)
    team = Team.objects.create(name="Bench")
    user = get_user_model().objects.create_user(username="bench", password="bench-pw-9")
    Membership.objects.create(team=team, user=user, role=Role.OWNER)
    project = Project.objects.create(team=team, name="Default")
    dataset = Dataset.objects.get(builtin_key="sample-instructions")
    return project, user, dataset


def one_run(args, project, user, dataset, copier, memo_base_metrics=False) -> Marks:
    from webapp.experiments.models import Run

    global CURRENT
    train_config = {"steps": 2, "batch_size": 4, "max_length": 128}
    train_config["eval_batches"] = args.eval_batches
    run = Run.objects.create(
        project=project,
        name="warm-start",
        created_by=user,
        base_model=args.model,
        dataset=dataset,
        method="lora",
        method_config={"r": 8, "alpha": 16},
        train_config=train_config,
        total_steps=2,
    )
    cache.shared_copy = copier
    MEMO_BASE_METRICS["on"] = memo_base_metrics
    CURRENT = Marks()
    outcome = training.execute_run(run.id, worker="bench")
    if outcome != "cancelled":
        raise RuntimeError(f"run {run.id} ended {outcome!r}, expected 'cancelled' after step 1")
    return CURRENT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eval-batches", type=int, default=8)
    args = parser.parse_args()
    logging.getLogger("workers").setLevel(logging.WARNING)
    instrument()
    fixtures = setup_database()
    shared = cache.shared_copy
    arms: dict[str, list[Marks]] = {
        "cold": [],
        "warm (shared copy)": [],
        "warm (deepcopy)": [],
        "+ base metrics": [],
    }
    cache.clear()
    arms["cold"].append(one_run(args, *fixtures, shared, memo_base_metrics=True))
    for _ in range(args.rounds):
        arms["warm (shared copy)"].append(one_run(args, *fixtures, shared))
        arms["warm (deepcopy)"].append(one_run(args, *fixtures, copy.deepcopy))
        arms["+ base metrics"].append(one_run(args, *fixtures, shared, memo_base_metrics=True))
    report(args, arms)


def report(args, arms: dict[str, list[Marks]]) -> None:
    import torch

    print(
        f"{args.model}: LoRA r8, batch 4 x <=128 tokens, base eval {args.eval_batches} batches, "
        f"{torch.get_num_threads()} threads; seconds, median of {args.rounds} warm rounds"
    )
    names = list(arms)
    print(f"{'':30}" + "".join(f"{name:>19}" for name in names))
    for label, start, end in PHASES:
        cells = [statistics.median(m.span(start, end) for m in arms[n]) for n in names]
        print(f"{label:30}" + "".join(f"{cell:19.2f}" for cell in cells))
    totals = {
        "claim -> step 1 starts": lambda m: m.span("claimed", "step_start"),
        "  the same, less base eval": lambda m: (
            m.span("claimed", "step_start") - m.span("eval_start", "eval_end")
        ),
        "claim -> step 1 done": lambda m: m.span("claimed", "step_end"),
    }
    for label, total in totals.items():
        cells = [statistics.median(total(m) for m in arms[n]) for n in names]
        print(f"{label:30}" + "".join(f"{cell:19.2f}" for cell in cells))


if __name__ == "__main__":
    main()
