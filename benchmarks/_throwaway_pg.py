"""A throwaway PostgreSQL database for the metrics benchmarks, and percentiles.

`throwaway_database(tag)` creates `peftlab_bench_<tag>_<pid>` on the server that
DATABASE_URL names, points DATABASE_URL at it, sets Django up and migrates; `drop()` removes
it. Call it before importing anything from webapp.
"""

import atexit
import os
import statistics
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]


def throwaway_database(tag: str, *, keep: bool = False) -> str:
    """`keep`: the database is left in place at exit (to open its pages), not dropped."""
    server = os.environ.get("DATABASE_URL", "")
    if not server.startswith(("postgres://", "postgresql://")):
        sys.exit("Set DATABASE_URL=postgres://user@host:port/any_db (the server to use).")
    name = f"peftlab_bench_{tag}_{os.getpid()}"
    _admin(server, f'CREATE DATABASE "{name}"')
    if not keep:
        atexit.register(_admin, server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    parts = urlsplit(server)
    os.environ["DATABASE_URL"] = urlunsplit(parts._replace(path=f"/{name}"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    os.environ.setdefault("PEFTLAB_VAR_DIR", f"/tmp/peftlab-bench-{tag}-{os.getpid()}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    return os.environ["DATABASE_URL"]


def _admin(server: str, sql: str) -> None:
    import psycopg2

    parts = urlsplit(server)
    connection = psycopg2.connect(urlunsplit(parts._replace(path="/postgres")))
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(sql)
    connection.close()


def percentiles_ms(seconds: list[float]) -> str:
    """p50 / p95 / max in ms, and the interquartile spread (how noisy the machine was)."""
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    q1, p50, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0],) * 3
    return (
        f"p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  max {ms[-1]:7.1f} ms  "
        f"IQR/p50 {(q3 - q1) / p50:4.0%}  (n={len(ms)})"
    )
