"""Search and sort by metric (webapp/experiments/run_search.py explains the design).

- RunSummaryValue: each finite number of a run's summary as a row, with a btree on
  (key, value, run), so `eval_loss<1.2` is an index range scan. Kept by the database: a
  trigger on Run rewrites a run's rows whenever its summary is inserted or changed,
  whoever writes it. Filled here from the summaries already stored.
- On PostgreSQL, GIN indexes (jsonb_path_ops) on Run.method_config and Run.train_config,
  which answer the containment that `config.lora.r=8` becomes.
- RunListColumns: the metric columns each person's runs list shows.

The rule, the same on both databases: a summary's members whose value is a JSON number
(not a boolean) that a double holds (|x| < 1e308, and not so small that it underflows),
under a key of 1-64 of A-Z a-z 0-9 _ . / - (the metric keys' alphabet), the first 1 000 by
key. Anything else in the summary (text, lists, nested objects) is shown but not searched.
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

MAX_VALUES = 1000

# ---- PostgreSQL --------------------------------------------------------------------------
PG_NUMBERS = f"""
CREATE FUNCTION run_summary_numbers(summary jsonb)
RETURNS TABLE (key text, value double precision) LANGUAGE sql IMMUTABLE AS $$
    SELECT e.key, e.value::numeric::double precision
    FROM jsonb_each(CASE WHEN jsonb_typeof(summary) = 'object' THEN summary
                         ELSE '{{}}'::jsonb END) AS e
    -- CASE, not AND: the casts must only ever see numbers
    WHERE CASE WHEN jsonb_typeof(e.value) = 'number' AND e.key ~ '^[A-Za-z0-9_./-]{{1,64}}$'
          THEN abs(e.value::numeric) < 1e308
               AND (e.value::numeric = 0 OR abs(e.value::numeric) > 1e-300)
          ELSE false END
    ORDER BY e.key
    LIMIT {MAX_VALUES}
$$;
CREATE FUNCTION run_summary_values_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM experiments_runsummaryvalue WHERE run_id = NEW.id;
    INSERT INTO experiments_runsummaryvalue (run_id, key, value)
        SELECT NEW.id, n.key, n.value FROM run_summary_numbers(NEW.summary) AS n;
    RETURN NULL;
END
$$;
CREATE TRIGGER run_summary_values_insert AFTER INSERT ON experiments_run
    FOR EACH ROW WHEN (NEW.summary <> '{{}}'::jsonb)
    EXECUTE FUNCTION run_summary_values_write();
CREATE TRIGGER run_summary_values_update AFTER UPDATE OF summary ON experiments_run
    FOR EACH ROW WHEN (OLD.summary IS DISTINCT FROM NEW.summary)
    EXECUTE FUNCTION run_summary_values_write();
INSERT INTO experiments_runsummaryvalue (run_id, key, value)
    SELECT r.id, n.key, n.value
    FROM experiments_run AS r CROSS JOIN LATERAL run_summary_numbers(r.summary) AS n;
CREATE INDEX run_method_config_gin ON experiments_run USING gin (method_config jsonb_path_ops);
CREATE INDEX run_train_config_gin ON experiments_run USING gin (train_config jsonb_path_ops);
"""
PG_UNDO = """
DROP INDEX IF EXISTS run_method_config_gin;
DROP INDEX IF EXISTS run_train_config_gin;
DROP TRIGGER IF EXISTS run_summary_values_insert ON experiments_run;
DROP TRIGGER IF EXISTS run_summary_values_update ON experiments_run;
DROP FUNCTION IF EXISTS run_summary_values_write();
DROP FUNCTION IF EXISTS run_summary_numbers(jsonb);
"""

# ---- SQLite (the embedded default) -------------------------------------------------------
# The members of {summary} (json_each of text that is no JSON object would fail or yield
# array items, so anything else reads as {{}}), and those the rule keeps.
SQLITE_MEMBERS = """json_each(CASE WHEN json_valid({summary}) AND json_type({summary}) = 'object'
    THEN {summary} ELSE '{{}}' END) AS e"""
SQLITE_KEPT = """e.type IN ('integer', 'real') AND typeof(e.key) = 'text'
    AND length(e.key) BETWEEN 1 AND 64 AND e.key NOT GLOB '*[^A-Za-z0-9_./-]*'
    AND abs(e.value) < 1e308"""
SQLITE_WRITE = f"""
    INSERT INTO experiments_runsummaryvalue (run_id, key, value)
    SELECT NEW.id, e.key, e.value FROM {SQLITE_MEMBERS.format(summary="NEW.summary")}
    WHERE {SQLITE_KEPT} ORDER BY e.key LIMIT {MAX_VALUES};
"""
SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER run_summary_values_insert AFTER INSERT ON experiments_run
    BEGIN {SQLITE_WRITE} END""",
    f"""CREATE TRIGGER run_summary_values_update AFTER UPDATE OF summary ON experiments_run
    WHEN OLD.summary IS NOT NEW.summary
    BEGIN DELETE FROM experiments_runsummaryvalue WHERE run_id = NEW.id; {SQLITE_WRITE} END""",
    f"""INSERT INTO experiments_runsummaryvalue (run_id, key, value)
    SELECT run_id, key, value FROM (
        SELECT r.id AS run_id, e.key AS key, e.value AS value,
            row_number() OVER (PARTITION BY r.id ORDER BY e.key) AS nth
        FROM experiments_run AS r, {SQLITE_MEMBERS.format(summary="r.summary")}
        WHERE {SQLITE_KEPT}
    ) WHERE nth <= {MAX_VALUES}""",
]
SQLITE_UNDO = [
    "DROP TRIGGER IF EXISTS run_summary_values_insert",
    "DROP TRIGGER IF EXISTS run_summary_values_update",
]


def forwards(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_NUMBERS)
    elif vendor == "sqlite":
        for statement in SQLITE_TRIGGERS:
            schema_editor.execute(statement)
    else:
        raise RuntimeError(f"run search: no summary triggers written for {vendor}")


def backwards(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    for statement in [PG_UNDO] if vendor == "postgresql" else SQLITE_UNDO:
        schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0018_artifact_file_kind"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="RunSummaryValue",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("key", models.CharField(max_length=64)),
                ("value", models.FloatField()),
                (
                    "run",
                    models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="summary_values",
                        to="experiments.run",
                    ),
                ),
            ],
            options={
                "indexes": [
                    models.Index(fields=["key", "value", "run"], name="summary_value_key_value")
                ],
                "constraints": [
                    models.UniqueConstraint(fields=("run", "key"), name="summary_value_unique_key")
                ],
            },
        ),
        migrations.CreateModel(
            name="RunListColumns",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("keys", models.JSONField(default=list)),
                (
                    "user",
                    models.OneToOneField(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="run_list_columns",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
        ),
        migrations.RunPython(forwards, backwards, elidable=False),
    ]
