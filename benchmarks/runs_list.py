"""The runs list with 10 000 runs: p50/p95 of the page, and the queries behind it.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python benchmarks/runs_list.py [--runs 10000] [--requests 30]

A throwaway database on that server (created, migrated, dropped). One team's 10 000 runs
(long logs, summaries and profiles, as finished runs have; every third one tagged), on one
uploaded dataset (its rows are a file in the artifact store, not in the row); a second
team's 10 000 runs beside them. GET /runs/ through Django's test client as a member: the
first page, page 200, a tag filter and a name search, each p50/p95 over the requests, with
the number of SQL queries of one request.
The goal (issue 6, part 3): the runs list with 10 000 runs renders in <= 200 ms p95.
"""

import argparse
import time

from _throwaway_pg import percentiles_ms, throwaway_database


def _seed(count: int):
    from django.contrib.auth import get_user_model

    from webapp.accounts.models import Membership, Role, Team
    from webapp.experiments.models import Dataset, Project, Run, Tag

    started = time.perf_counter()
    user = get_user_model().objects.create_user(username="bench")
    for name in ("Bench", "Other"):
        team = Team.objects.create(name=name)
        project = Project.objects.create(team=team, name="runs")
        dataset = Dataset.objects.create(team=team, name=f"{name} upload", task="causal-lm")
        if name == "Bench":
            Membership.objects.create(team=team, user=user, role=Role.MEMBER)
        runs = Run.objects.bulk_create(
            [_run(project, dataset, user, i) for i in range(count)], batch_size=1000
        )
        tags = [Tag(run=run, name=f"tag-{i % 7}") for i, run in enumerate(runs) if i % 3 == 0]
        Tag.objects.bulk_create(tags, batch_size=1000)
    print(f"seeded 2 teams x {count:,} runs in {time.perf_counter() - started:.0f} s")
    return user


def _run(project, dataset, user, i: int):
    from webapp.experiments.models import Run

    return Run(
        project=project,
        name=f"run {i:05d}",
        created_by=user,
        base_model="tiny-llama",
        dataset=dataset,
        method=("lora", "dora", "ia3")[i % 3],
        method_config={"r": 8, "alpha": 16},
        train_config={"steps": 1000, "learning_rate": 1e-3},
        status=("succeeded", "failed", "running", "queued")[i % 4],
        step=i % 1000,
        total_steps=1000,
        log="step … loss …\n" * 2000,  # ~30 KB: a finished run's log
        summary={"eval_loss": 1.5, "eval_accuracy": 0.8},
        profile={"trainable_params": 10**6, "adapter_bytes": 4 * 10**6},
    )


def _counting(queries: list):
    def wrapper(execute, sql, *args):
        queries.append(sql)
        return execute(sql, *args)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    throwaway_database("runs")
    from django.db import connection
    from django.test import Client
    from django.test.utils import setup_test_environment
    from django.urls import reverse

    user = _seed(args.runs)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")  # as autovacuum would
    setup_test_environment()
    client = Client()
    client.force_login(user)
    views = {
        "first page": {},
        "page 200": {"page": 200},
        "tag filter": {"tag": "tag-3"},
        "name search": {"q": "run 0999"},
        "sort by name": {"sort": "name"},
    }
    for label, params in views.items():
        queries = []
        with connection.execute_wrapper(_counting(queries)):
            response = client.get(reverse("runs"), params)
        assert response.status_code == 200 and response.context["page"].object_list
        times = []
        for _ in range(args.requests):
            started = time.perf_counter()
            client.get(reverse("runs"), params)
            times.append(time.perf_counter() - started)
        print(f"{label:13s} {percentiles_ms(times)}  {len(queries)} queries")


if __name__ == "__main__":
    main()
