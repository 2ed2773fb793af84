"""Metric storage for scale: rollups of every series, and fewer indexes per point.

- MetricPoint.run loses its own index: the unique (run, key, step) index starts with run.
- On PostgreSQL the unique (run, key, step) constraint takes value and wall time along
  (INCLUDE), replacing the separate covering index of 0006, so a stored point costs two
  index entries (primary key, unique) instead of four.
- MetricRollup: per series, bucket summaries at 16, 128 and 1024 steps, filled here from
  the points already stored and kept up to date by every later batch (PostgreSQL only).
"""

import django.db.models.deletion
from django.db import migrations, models

COVERING_UNIQUE = """
ALTER TABLE experiments_metricpoint DROP CONSTRAINT metric_unique_step;
ALTER TABLE experiments_metricpoint ADD CONSTRAINT metric_unique_step
    UNIQUE (run_id, key, step) INCLUDE (value, wall_time);
DROP INDEX IF EXISTS metric_series_covering;
"""
UNDO_COVERING_UNIQUE = """
ALTER TABLE experiments_metricpoint DROP CONSTRAINT metric_unique_step;
ALTER TABLE experiments_metricpoint ADD CONSTRAINT metric_unique_step UNIQUE (run_id, key, step);
CREATE INDEX IF NOT EXISTS metric_series_covering
    ON experiments_metricpoint (run_id, key, step) INCLUDE (value, wall_time);
"""
# The same summaries services._metric_points_copy keeps, from every point stored so far.
BACKFILL = """
INSERT INTO experiments_metricrollup (run_id, key, width, bucket, count,
    first_step, first_value, first_wall, last_step, last_value, last_wall,
    low_step, low_value, low_wall, high_step, high_value, high_wall)
SELECT run_id, key, width, bucket, n, f[1]::integer, f[2], f[3], l[1]::integer, l[2], l[3],
    lo[2]::integer, lo[1], lo[3], hi[2]::integer, hi[1], hi[3]
FROM (
    SELECT run_id, key, width, step / width AS bucket, count(*) AS n,
        min(ARRAY[step, value, wall_time]) AS f, max(ARRAY[step, value, wall_time]) AS l,
        min(ARRAY[value, step, wall_time]) AS lo, max(ARRAY[value, step, wall_time]) AS hi
    FROM experiments_metricpoint CROSS JOIN (VALUES (16), (128), (1024)) AS w (width)
    GROUP BY run_id, key, width, step / width
) AS buckets
"""


def _on_postgresql(sql: str):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql)

    return run


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0007_playground"),
    ]

    operations = [
        migrations.AlterField(
            model_name="metricpoint",
            name="run",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="metric_points",
                to="experiments.run",
            ),
        ),
        migrations.CreateModel(
            name="MetricRollup",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("key", models.CharField(max_length=64)),
                ("width", models.PositiveIntegerField()),
                ("bucket", models.PositiveIntegerField()),
                ("count", models.PositiveIntegerField()),
                ("first_step", models.PositiveIntegerField()),
                ("first_value", models.FloatField()),
                ("first_wall", models.FloatField()),
                ("last_step", models.PositiveIntegerField()),
                ("last_value", models.FloatField()),
                ("last_wall", models.FloatField()),
                ("low_step", models.PositiveIntegerField()),
                ("low_value", models.FloatField()),
                ("low_wall", models.FloatField()),
                ("high_step", models.PositiveIntegerField()),
                ("high_value", models.FloatField()),
                ("high_wall", models.FloatField()),
                (
                    "run",
                    models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="experiments.run",
                    ),
                ),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        fields=("run", "key", "width", "bucket"), name="metric_rollup_unique"
                    )
                ],
            },
        ),
        migrations.RunPython(_on_postgresql(COVERING_UNIQUE), _on_postgresql(UNDO_COVERING_UNIQUE)),
        migrations.RunPython(_on_postgresql(BACKFILL), migrations.RunPython.noop),
    ]
