# Dataset: its validation split (a validation file, or a fraction) and default task metrics;
# BaseEvaluation: the base model's evaluation, reused by later runs (issue 18, item 1 and 5).

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0019_run_search"),
    ]

    operations = [
        migrations.AddField(
            model_name="dataset",
            name="eval_metrics",
            field=models.JSONField(blank=True, default=list),
        ),
        migrations.AddField(
            model_name="dataset",
            name="val_fraction",
            field=models.FloatField(default=0.1),
        ),
        migrations.AddField(
            model_name="dataset",
            name="val_row_count",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.CreateModel(
            name="BaseEvaluation",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("key", models.CharField(max_length=64, unique=True)),
                ("parts", models.JSONField(default=dict)),
                ("metrics", models.JSONField(default=dict)),
                ("seconds", models.FloatField(default=0.0)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "run",
                    models.ForeignKey(
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to="experiments.run",
                    ),
                ),
            ],
        ),
    ]
