"""The compare page for 20 runs x 100 000 steps: the curves query and the whole page.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python benchmarks/compare_query.py [--runs 20] [--steps 100000] [--requests 30]

A throwaway database on that server (created, migrated, dropped). Each run gets train_loss
and tokens at every step and eval_loss every 500 steps, written through
metrics.metrics_record (COPY, which also keeps the rollups), then finishes. Timed,
p50/p95 over the requests, the cold variants interleaved:

    cold curves   comparison.curves() with the cache emptied first: the series' rollups
                  (~800 rows per 100 000-step series) folded into ~1000 points each
    SQL buckets   the path the rollups replaced: PostgreSQL buckets every point (index-only
                  scan of the covering unique index) and sends ~1000 per series
    old curves    the path before that: every point read into Python, numpy picks
    warm curves   comparison.curves() again: finished runs' curves come from the cache
    page, cold    GET /compare/?runs=… through Django's test client, cache emptied first
    page, warm    the same, cache warm
    run page      selectors.metric_series() of one 100 000-step run (never cached)

The goal (issue 8, part 3): the compare query for 20 runs x 100 000 points <= 300 ms p95.
"""

import argparse
import statistics
import time

from _throwaway_pg import percentiles_ms, throwaway_database


def _seed(runs: int, steps: int) -> list:
    from django.contrib.auth import get_user_model

    from webapp.accounts.models import Membership, Role, Team
    from webapp.experiments import leases, metrics
    from webapp.experiments.models import Dataset, Project, Run, RunStatus

    team = Team.objects.create(name="Bench")
    project = Project.objects.create(team=team, name="compare")
    user = get_user_model().objects.create_user(username="bench")
    Membership.objects.create(team=team, user=user, role=Role.OWNER)
    dataset = Dataset.objects.filter(team=None).first()
    started = time.perf_counter()
    for i in range(runs):
        run = Run.objects.create(
            project=project,
            name=f"run-{i}",
            created_by=user,
            base_model="tiny-llama",
            dataset=dataset,
            method="lora",
            method_config={"r": 4 + i},
            total_steps=steps,
        )
        fence = leases.run_claim(run_id=run.id, worker="bench")
        metrics.metrics_record(run_id=run.id, fence=fence, points=_points(i, steps))
        leases.run_finish(run_id=run.id, fence=fence, status=RunStatus.SUCCEEDED)
    seconds = time.perf_counter() - started
    print(f"seeded {runs} runs x {steps:,} steps in {seconds:.0f} s")
    return user, list(Run.objects.filter(project=project).order_by("id"))


def _points(seed: int, steps: int) -> list:
    import numpy as np

    from webapp.experiments.metrics import Point

    rng = np.random.default_rng(seed)
    loss = 3.0 / np.sqrt(1 + np.arange(steps)) + 0.05 * rng.standard_normal(steps)
    loss[rng.integers(steps)] += 10.0  # one spike per run, which the chart must still show
    points = [Point("train_loss", s, float(v), 0.01 * s) for s, v in enumerate(loss)]
    points += [Point("tokens", s, 512.0 * s, 0.01 * s) for s in range(steps)]
    points += [Point("eval_loss", s, float(loss[s]), 0.01 * s) for s in range(0, steps, 500)]
    return points


# The bucketing query the rollups replaced (webapp/experiments/downsample.py before them):
# equal step ranges over every stored point, each bucket's extremes picked in PostgreSQL.
BUCKETS_SQL = """
WITH series AS (
    SELECT r.run_id, k.key, head.step AS lo, tail.step AS hi
    FROM unnest(%(run_ids)s::bigint[]) AS r (run_id)
    CROSS JOIN unnest(%(keys)s::varchar[]) AS k (key)
    CROSS JOIN LATERAL (
        SELECT step FROM experiments_metricpoint
        WHERE run_id = r.run_id AND key = k.key ORDER BY step LIMIT 1
    ) AS head
    CROSS JOIN LATERAL (
        SELECT step FROM experiments_metricpoint
        WHERE run_id = r.run_id AND key = k.key ORDER BY step DESC LIMIT 1
    ) AS tail
)
SELECT p.run_id, p.key,
       min(ARRAY[p.value, p.step, p.wall_time]), max(ARRAY[p.value, p.step, p.wall_time])
FROM series AS s
JOIN experiments_metricpoint AS p ON p.run_id = s.run_id AND p.key = s.key
GROUP BY p.run_id, p.key, (p.step - s.lo)::bigint * %(buckets)s / (s.hi - s.lo + 1)
"""


def _sql_buckets(run_ids: list[int], keys: tuple[str, ...]) -> int:
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL work_mem = '64MB'")
        cursor.execute(BUCKETS_SQL, {"run_ids": run_ids, "keys": list(keys), "buckets": 499})
        return len(cursor.fetchall())


def _timed(call, times: list[float]):
    started = time.perf_counter()
    result = call()
    times.append(time.perf_counter() - started)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--cold", type=int, default=20)
    parser.add_argument("--old", type=int, default=3)
    args = parser.parse_args()
    throwaway_database("compare")
    from django.core.cache import cache
    from django.db import connection
    from django.test import Client
    from django.test.utils import setup_test_environment
    from django.urls import reverse

    from webapp.experiments import comparison, downsample, selectors

    user, runs = _seed(args.runs, args.steps)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE experiments_metricpoint")  # as autovacuum would
    ids = [run.id for run in runs]
    times: dict[str, list[float]] = {
        name: [] for name in ("cold", "buckets", "old", "warm", "page_cold", "page", "run")
    }

    def old_curves():
        series = downsample._series_by_numpy(ids, comparison.CURVE_KEYS, comparison.MAX_POINTS)
        return len(series)

    setup_test_environment()
    client = Client()
    client.force_login(user)
    url = reverse("compare") + "?" + "&".join(f"runs={i}" for i in ids)
    for number in range(args.cold):
        cache.clear()
        curves = _timed(lambda: comparison.curves(runs), times["cold"])
        _timed(lambda: _sql_buckets(ids, comparison.CURVE_KEYS), times["buckets"])
        if number < args.old:
            _timed(old_curves, times["old"])
        cache.clear()
        response = _timed(lambda: client.get(url), times["page_cold"])
        assert response.status_code == 200, response.status_code
    kept = sum(len(c["train_loss"]["step"]) for c in curves.values())
    spikes = sum(max(c["train_loss"]["value"]) > 5.0 for c in curves.values())
    print(f"train_loss points sent: {kept:,} for {args.runs} runs; spikes kept: {spikes}")
    for _ in range(args.requests):
        _timed(lambda: comparison.curves(runs), times["warm"])
    for _ in range(args.requests):
        response = _timed(lambda: client.get(url), times["page"])
        assert response.status_code == 200, response.status_code
    for _ in range(args.requests):
        _timed(lambda: selectors.metric_series(run=runs[0]), times["run"])
    labels = {
        "cold": "curves, cold (rollups)",
        "buckets": "curves' query, SQL buckets of all points",
        "old": "curves, all points to numpy",
        "warm": "curves, warm (finished runs cached)",
        "page_cold": "compare page, cold (test client)",
        "page": "compare page, warm (test client)",
        "run": "run page series, 1 run (rollups)",
    }
    for name, label in labels.items():
        print(f"{label:42s} {percentiles_ms(times[name])}")
    buckets_vs_cold = [a / b for a, b in zip(times["buckets"], times["cold"], strict=True)]
    print(f"SQL buckets / rollups, paired: x{statistics.median(buckets_vs_cold):.1f}")
    print(f"page size: {len(response.content) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
