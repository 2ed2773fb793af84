"""The seed's table, from the product: every method and full fine-tuning on one model and
task, each over several seeds, measured and compared by PEFT Lab itself.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python benchmarks/seed_table.py [--model smollm2-135m-instruct] \\
        [--steps 30] [--seeds 3] [--methods lora,dora,ia3,prompt,prefix,bottleneck,mam,full]

A throwaway database on that server (created, migrated, dropped) and its own artifact
directory. The "compare all methods" sweep is created as the web creates it
(method_forms.expand_sweep, services.sweep_create: bottleneck adapters in their three
placements, `--seeds` runs per configuration), on the bundled sample-instructions task or,
with `--task dates`, an uploaded date-rewriting file ("2024-03-05" -> "5 March 2024", 400
training rows and a 48-row validation file, generated here), scored by exact match at the
end and at step 0 for the base model. Each run trains in
this process through the worker's own code (workers.training.execute_run: pre-flight,
training, the quick measurement), one after the other, so no two runs share the machine.
The table is the compare page's (webapp.experiments.configurations.tradeoffs), one row per
configuration:

    trainable %        of the model's parameters
    overhead           adapter ÷ base forward time, median of interleaved rounds ± half IQR;
                       merged ÷ base where the method merges; flagged when impossible
    peak memory        the training's own peak (CUDA's counter on a GPU; on a CPU the
                       allocator's bytes in use above the start)
    train s, tokens/s  the optimizer steps' own time (evaluations and measurement left out)
    exact match, loss  mean ± the 95 % interval over the seeds (Student's t), base below

Learning rates are each method's usual starting point (--lr method=value to change one):
a single rate would favour one family of methods, and the table compares methods.
"""

import argparse
import dataclasses
import datetime
import json
import os
import random
import socket
import sys
import time

from _throwaway_pg import throwaway_database

LEARNING_RATES = {  # the usual starting points (README: methods)
    "lora": 2e-4,
    "dora": 2e-4,
    "ia3": 3e-3,
    "prompt": 3e-2,
    "prefix": 1e-2,
    "bottleneck": 1e-3,
    "mam": 1e-3,
    "full": 2e-5,
}
ALL = ",".join(LEARNING_RATES)


def main() -> int:
    args = _arguments()
    throwaway_database("seeds", keep=args.keep)
    from webapp.experiments import configurations

    runs = _sweep_runs(args)
    started = time.perf_counter()
    for index, run in enumerate(runs, 1):
        began = time.perf_counter()
        _execute(run)
        run.refresh_from_db()
        print(f"[{index}/{len(runs)}] {run.name}: {run.status} in {time.perf_counter() - began:.0f} s"
              f"{_costs(run.profile)}" + (f" ({run.error})" if run.error else ""), flush=True)  # fmt: skip
    print(f"all runs: {time.perf_counter() - started:.0f} s\n")
    for run in runs:
        run.refresh_from_db()
    found = configurations.tradeoffs(runs, metric="eval_exact_match")
    _print_table(found, args)
    if args.keep:
        print(
            f"\nkept: DATABASE_URL={os.environ['DATABASE_URL']} "
            f"PEFTLAB_VAR_DIR={os.environ['PEFTLAB_VAR_DIR']}; log in as seeds / "
            f"seeds-table-pw at /compare/?sweep={runs[0].sweep_id}"
        )
    return 0


def _costs(profile: dict) -> str:
    """The run's training time and its measurement's, the share the issue bounds (≤ 10 %)."""
    train_s, measure_s = profile.get("train_s"), profile.get("measure_s")
    if not train_s or measure_s is None:
        return ""
    return (
        f"; training {train_s:.1f} s (steps' own time), measurement {measure_s:.1f} s "
        f"({measure_s / train_s:.0%} of training)"
    )


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", choices=("sample-instructions", "dates"), default="dates")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--methods", default=ALL, help=f"comma-separated (default {ALL})")
    parser.add_argument(
        "--placements", default="houlsby,pfeiffer,parallel", help="bottleneck placements"
    )
    parser.add_argument("--lr", action="append", default=[], help="method=rate, repeatable")
    parser.add_argument(
        "--keep", action="store_true", help="keep the database to open the compare page"
    )
    parser.add_argument(
        "--eval-metrics", default="exact_match", help="comma-separated; none for the loss alone"
    )
    parser.add_argument(
        "--eval-every", type=int, default=None, help="steps (default: once, at the end)"
    )
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(LEARNING_RATES)
    if unknown:
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    args.rates = dict(LEARNING_RATES)
    for given in args.lr:
        method, _, value = given.partition("=")
        if method not in LEARNING_RATES:
            parser.error(f"--lr {given}: name a method, e.g. lora=2e-4")
        args.rates[method] = float(value)
    return args


def _sweep_runs(args) -> list:
    from django.contrib.auth import get_user_model

    from webapp.accounts.models import Membership, Role, Team
    from webapp.experiments import services
    from webapp.experiments.method_forms import expand_sweep
    from webapp.experiments.models import Dataset, Project

    team = Team.objects.create(name="Seeds")
    project = Project.objects.create(team=team, name="seed table")
    user = get_user_model().objects.create_user(username="seeds", password="seeds-table-pw")
    Membership.objects.create(team=team, user=user, role=Role.OWNER)
    if args.task == "dates":
        dataset = services.dataset_upload_create(
            user=user, team=team, name="dates", filename="dates.jsonl", data=_dates(400, seed=0),
            task="causal-lm", validation=("dates-val.jsonl", _dates(48, seed=1)),
            eval_metrics=["exact_match"],
        )  # fmt: skip
    else:
        dataset = Dataset.objects.get(team=None, builtin_key="sample-instructions")
    train = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        # the base at step 0 and the trained model at the end, unless asked
        "eval_every": args.steps if args.eval_every is None else args.eval_every,
        "eval_metrics": [m for m in args.eval_metrics.split(",") if m not in ("", "none")],
    }
    grid = {}
    if "bottleneck" in args.methods and args.placements:
        grid["bottleneck.placement"] = args.placements.split(",")
    items = expand_sweep(args.methods, grid, train, dataset.task, seeds=args.seeds)
    items = [  # each method at its own learning rate
        dataclasses.replace(item, train=item.train | {"learning_rate": args.rates[item.method]})
        for item in items
    ]
    sweep = services.sweep_create(
        user=user,
        project=project,
        name="seed table",
        base_model=args.model,
        dataset=dataset,
        items=items,
        grid=grid,
        train_config=train,
        seeds=args.seeds,
    )
    return list(sweep.runs.order_by("id"))


MONTHS = ("January February March April May June July August September October November "
          "December").split()  # fmt: skip


def _dates(count: int, seed: int) -> bytes:
    """JSON lines of a task with one right answer: "2024-03-05" -> "5 March 2024"."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(36500))
        row = {
            "prompt": f"Write the date {day.isoformat()} in words.",
            "completion": f"{day.day} {MONTHS[day.month - 1]} {day.year}",
        }
        lines.append(json.dumps(row))
    return ("\n".join(lines) + "\n").encode()


def _execute(run) -> None:
    from workers.training import execute_run

    execute_run(run.id, worker=f"bench@{socket.gethostname()}:{os.getpid()}")


def _interval(value) -> str:
    return "—" if value is None else value.text(seeds=False)


def _print_table(found, args) -> None:
    import torch

    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"{args.model}, {args.task}, {args.steps} steps × batch {args.batch_size} × "
        f"{args.max_length} tokens, {args.seeds} seeds, on {device} ({os.cpu_count()} CPUs)\n"
    )
    print(
        "| configuration | trainable % | overhead | merged | peak memory | train s | "
        "tokens/s | exact match (base) | eval loss (base) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for group, row, _ in found.table():
        overhead = row.get("inference_overhead")
        unmerged = f"{overhead:.2f}× ± {row['overhead_spread']:.2f}" if overhead else "—"
        if row.get("latency_flags"):
            unmerged += " ⚠"
        if row.get("whole_model"):
            merged = "n/a"
        elif row.get("merged_overhead"):
            merged = f"{row['merged_overhead']:.2f}× ± {row.get('merged_spread') or 0:.2f}"
        else:
            merged = "no"
        memory = row.get("peak_memory_mb")
        cells = [
            row["run"],
            _number(row.get("trainable_percent"), "{:.3f}"),
            unmerged,
            merged,
            f"{memory:.0f} MiB ({row.get('memory_kind')})" if memory is not None else "—",
            _number(row.get("train_s"), "{:.0f}"),
            _number(row.get("tokens_per_s"), "{:.0f}"),
            f"{_interval(group.values.get('eval_exact_match'))} "
            f"({_interval(group.bases.get('eval_exact_match'))})",
            f"{_interval(group.values.get('eval_loss'))} ({_interval(group.bases.get('eval_loss'))})",
        ]
        print("| " + " | ".join(cells) + " |")
    if found.recommendation:
        print(f"\nBest at each size: {found.recommendation}")
    flagged = [(row["run"], row["latency_flags"]) for _, row, _ in found.table()]
    for name, flags in flagged:
        for flag in flags:
            print(f"⚠ {name}: {flag}")


def _number(value, spec: str) -> str:
    return spec.format(value) if isinstance(value, int | float) else "—"


if __name__ == "__main__":
    sys.exit(main())
