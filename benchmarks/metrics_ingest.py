"""Metric ingest: points/s sustained by 8 concurrent writers through metrics.metrics_record.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python benchmarks/metrics_ingest.py [--writers 8] [--seconds 10] [--rounds 2]

A throwaway database on that server (created, migrated, dropped). Each writer is a process
with its own claimed run, writing batches of 1000 points (train_loss, learning_rate and
tokens of 333 steps, what the training loop sends) through the real service function:
fence check under the run's lock, COPY, and the series' rollups kept up to date. The rounds
alternate these paths, patched in one at a time (nothing else changes), their order reversed
every other round, so a busy machine moves them alike:

    copy          the workers' path: a batch that only appends (as training's do) is copied
                  straight into the table, then its points folded into the rollups
    copy-staged   every batch through the staging table and INSERT … ON CONFLICT DO
                  NOTHING, rollups kept (the path for batches that may repeat points)
    copy-fk       copy with the database's foreign keys from points and rollups to their
                  run put back for the round (deferred, checked per row at commit: what
                  migration 0009 removed)
    copy-plain    every batch staged, no rollups, foreign keys back: the path before
                  this work
    bulk_create   the path before COPY: bulk_create(ignore_conflicts=True), foreign keys
                  back
    copy-uncapped copy without the check of the run's distinct keys against
                  PEFTLAB_MAX_METRIC_KEYS_PER_RUN: what that check costs (issue 17)

--modes copy,copy-uncapped runs only those.

The goal (issue 8, part 3): >= 100 000 points/s sustained from 8 writers.
"""

import argparse
import contextlib
import multiprocessing
import statistics
import time

from _throwaway_pg import percentiles_ms, throwaway_database

KEYS = ("train_loss", "learning_rate", "tokens")
STEPS_PER_BATCH = 1000 // len(KEYS) + 1


def _batch(step: int):
    from webapp.experiments.metrics import Point

    now = time.time()
    return [
        Point(key, s, 2.0 / (1 + s) if key != "tokens" else 512.0 * s, now)
        for s in range(step, step + STEPS_PER_BATCH)
        for key in KEYS
    ][:1000]


def _bulk_create(*, run_id: int, points) -> None:
    """The path before COPY: bulk_create(ignore_conflicts=True) in batches of 1000."""
    from webapp.experiments.models import MetricPoint

    rows = [
        MetricPoint(run_id=run_id, key=p.key, step=p.step, value=p.value, wall_time=p.wall_time)
        for p in points
    ]
    MetricPoint.objects.bulk_create(rows, batch_size=1000, ignore_conflicts=True)


# The move without the rollups: the points only.
PLAIN_MOVE = """WITH staged AS (DELETE FROM metric_staging RETURNING *)
    INSERT INTO experiments_metricpoint (run_id, key, step, value, wall_time)
    SELECT %(run_id)s, key, step, value, wall_time FROM staged
    ON CONFLICT (run_id, key, step) DO NOTHING"""

MODES = ("copy", "copy-staged", "copy-fk", "copy-plain", "bulk_create", "copy-uncapped")


def _writer(run_id: int, fence: int, mode: str, seconds: float, barrier, results) -> None:
    from django.db import connections

    from webapp.experiments import metrics

    connections.close_all()  # never share the parent's socket
    if mode == "bulk_create":
        metrics._metric_points_copy = _bulk_create
    if mode in ("copy-staged", "copy-plain"):
        metrics._appends = lambda *args: False
    if mode == "copy-plain":
        metrics.METRIC_MOVE = PLAIN_MOVE
    if mode == "copy-uncapped":
        metrics._metric_keys_check = lambda **kwargs: None
    step, points, latencies = 0, 0, []
    barrier.wait()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = _batch(step)
        began = time.perf_counter()
        points += metrics.metrics_record(run_id=run_id, fence=fence, points=batch)
        latencies.append(time.perf_counter() - began)
        step += STEPS_PER_BATCH
    results.put((points, time.perf_counter() - start, latencies))


def _round(mode: str, writers: int, seconds: float, runs: list[tuple[int, int]]) -> dict:
    from django.db import connections

    connections.close_all()
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(writers), context.Queue()
    processes = [
        context.Process(target=_writer, args=(run_id, fence, mode, seconds, barrier, results))
        for run_id, fence in runs
    ]
    for process in processes:
        process.start()
    outcomes = [results.get() for _ in processes]
    for process in processes:
        process.join()
    points = sum(o[0] for o in outcomes)
    elapsed = max(o[1] for o in outcomes)
    return {
        "rate": points / elapsed,
        "points": points,
        "latencies": [x for o in outcomes for x in o[2]],
    }


FOREIGN_KEYS = {
    "experiments_metricpoint": "bench_metricpoint_run_fk",
    "experiments_metricrollup": "bench_metricrollup_run_fk",
}


@contextlib.contextmanager
def _foreign_keys(wanted: bool):
    """The foreign keys Django makes (deferrable, checked at commit), for the round only;
    NOT VALID: the rows already stored are not checked, as for a key that was always there."""
    from django.db import connection

    if wanted:
        with connection.cursor() as cursor:
            for table, name in FOREIGN_KEYS.items():
                cursor.execute(
                    f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY (run_id) "
                    "REFERENCES experiments_run (id) DEFERRABLE INITIALLY DEFERRED NOT VALID"
                )
    try:
        yield
    finally:
        if wanted:
            with connection.cursor() as cursor:
                for table, name in FOREIGN_KEYS.items():
                    cursor.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")


def _claimed_runs(project, dataset, user, count: int, label: str) -> list[tuple[int, int]]:
    from webapp.experiments import leases
    from webapp.experiments.models import Run

    runs = []
    for i in range(count):
        run = Run.objects.create(
            project=project,
            name=f"{label}-{i}",
            created_by=user,
            base_model="tiny-llama",
            dataset=dataset,
            method="lora",
            total_steps=10**6,
        )
        runs.append((run.id, leases.run_claim(run_id=run.id, worker=f"bench-{i}")))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES)
    )
    args = parser.parse_args()
    modes = tuple(mode for mode in MODES if mode in args.modes.split(","))
    throwaway_database("ingest")
    from django.contrib.auth import get_user_model

    from webapp.accounts.models import Team
    from webapp.experiments.models import Dataset, MetricPoint, Project

    team = Team.objects.create(name="Bench")
    project = Project.objects.create(team=team, name="ingest")
    user = get_user_model().objects.create_user(username="bench")
    dataset = Dataset.objects.filter(team=None).first()
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    latencies: dict[str, list[float]] = {mode: [] for mode in modes}
    print(f"{args.writers} writers x {args.seconds:.0f} s per round, batches of 1000 points")
    for number in range(args.rounds):
        for mode in modes if number % 2 == 0 else modes[::-1]:  # no mode always goes first
            runs = _claimed_runs(project, dataset, user, args.writers, f"{mode}-{number}")
            with _foreign_keys(mode in ("copy-fk", "copy-plain", "bulk_create")):
                outcome = _round(mode, args.writers, args.seconds, runs)
            rates[mode].append(outcome["rate"])
            latencies[mode] += outcome["latencies"]
            print(
                f"round {number + 1} {mode:12s} {outcome['rate']:10,.0f} points/s "
                f"({outcome['points']:,} points)"
            )
    for mode, values in rates.items():
        print(
            f"{mode:12s} median {statistics.median(values):10,.0f} points/s; "
            f"batch latency {percentiles_ms(latencies[mode])}"
        )
    for other in modes[1:] if "copy" in modes else ():
        ratios = [a / b for a, b in zip(rates["copy"], rates[other], strict=True)]
        print(f"copy / {other}: x{statistics.median(ratios):.2f} (median of paired rounds)")
    print(f"rows stored: {MetricPoint.objects.count():,}")


if __name__ == "__main__":
    main()
