"""Search and sort by metric over 100 000 runs: the runs page's p50/p95 and the plans.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python benchmarks/run_search.py [--runs 100000] [--requests 20]

A throwaway database on that server (created, migrated, dropped). One team's runs with a
summary of two numbers (eval_loss spread over 0-10, eval_exact_match over 0-1) and a LoRA
rank of 4, 8, 16 or 32 (64 for one run in a hundred), written by one INSERT … SELECT, so the
trigger of migration 0019 fills the summary index as it would for any writer; a second team
of as many runs beside them. GET /runs/ through Django's test client as a member, for a
metric filter (1 % of the runs), a config filter (1 %), both, a sort of all the runs by a
metric, and for scale the first page as it was and a name search; then EXPLAIN ANALYZE of the metric filter with the
(key, value, run) index and with it dropped, side by side.
"""

import argparse
import time

from _throwaway_pg import percentiles_ms, throwaway_database

SEED = """
INSERT INTO experiments_run (project_id, name, created_by_id, base_model, base_weights, method,
    method_config, train_config, status, cancel_requested, attempt, fence, worker, step,
    total_steps, error, failure_class, log, summary, profile, external, notes, devices,
    gpu_class, priority, lineage, created_at)
SELECT %(project)s, 'run ' || i, %(user)s, 'tiny-llama', '{}', 'lora',
    jsonb_build_object('r', CASE WHEN i %% 100 = 0 THEN 64 ELSE (ARRAY[4, 8, 16, 32])[i %% 4 + 1] END),
    '{"steps": 1000, "learning_rate": 0.0002}', 'succeeded', false, 0, 0, '', 1000, 1000, '', '',
    '', jsonb_build_object('eval_loss', (i::bigint * 7919 %% 100000) / 10000.0,
                           'eval_exact_match', (i::bigint * 104729 %% 100000) / 100000.0),
    '{}', false, '', 1, 'any', 0, '{}', now() - i * interval '1 second'
FROM generate_series(1, %(count)s) AS i
"""


def _seed(count: int):
    from django.contrib.auth import get_user_model
    from django.db import connection

    from webapp.accounts.models import Membership, Role, Team
    from webapp.experiments.models import Project

    started = time.perf_counter()
    user = get_user_model().objects.create_user(username="bench")
    for name in ("Bench", "Other"):
        team = Team.objects.create(name=name)
        project = Project.objects.create(team=team, name="runs")
        if name == "Bench":
            Membership.objects.create(team=team, user=user, role=Role.MEMBER)
        with connection.cursor() as cursor:
            cursor.execute(SEED, {"project": project.id, "user": user.id, "count": count})
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")  # as autovacuum would
    print(f"seeded 2 teams x {count:,} runs (and their summary rows) in "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    return user


def _explain_ms(sql: str, params) -> tuple[float, str]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0][0]
    scans = []

    def walk(node):
        if "Index Name" in node or node["Node Type"] == "Seq Scan":
            scans.append(f"{node['Node Type']} {node.get('Index Name', node['Relation Name'])}")
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    return plan["Execution Time"], "; ".join(scans)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    throwaway_database("search")
    from django.db import connection
    from django.test import Client
    from django.test.utils import setup_test_environment
    from django.urls import reverse

    from webapp.experiments import selectors

    user = _seed(args.runs)
    setup_test_environment()
    client = Client()
    client.force_login(user)
    views = {
        "newest (base)": {},
        "eval_loss<0.1": {"q": "eval_loss<0.1"},
        "config.r=64": {"q": "config.r=64"},
        "both": {"q": "eval_loss<1 config.r=64"},
        "sort -metric": {"sort": "-eval_exact_match"},
        "name search": {"q": "run 0999"},
    }
    for label, params in views.items():
        response = client.get(reverse("runs"), params)
        assert response.status_code == 200 and response.context["runs"], label
        times = []
        for _ in range(args.requests):
            started = time.perf_counter()
            client.get(reverse("runs"), params)
            times.append(time.perf_counter() - started)
        count = response.context["page"].paginator.count
        print(f"{label:14s} {percentiles_ms(times)}  {count:,} runs match")

    query = selectors.run_filter_for_user(user=user, query="eval_loss<0.1")
    sql, params = query.query.sql_with_params()
    with_index, scans = _explain_ms(sql, params)
    print(f"eval_loss<0.1 with the index:    {with_index:7.1f} ms  ({scans})")
    with connection.cursor() as cursor:
        cursor.execute("DROP INDEX summary_value_key_value")
    without, scans = _explain_ms(sql, params)
    print(f"eval_loss<0.1 without the index: {without:7.1f} ms  ({scans})")
    print(f"ratio: {without / with_index:.0f}x")


if __name__ == "__main__":
    main()
