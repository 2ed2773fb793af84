"""The bundled catalogue's models as rows that every team sees (team NULL)."""

from django.db import migrations


def create_catalogue_rows(apps, schema_editor):
    from peft_core.catalogue import CATALOGUE

    BaseModel = apps.get_model("registry", "BaseModel")
    for spec in CATALOGUE.values():
        BaseModel.objects.update_or_create(
            team=None,
            name=spec.key,
            defaults={
                "title": spec.title,
                "description": spec.description,
                "source": "catalogue",
                "location": spec.key,
                "revision": spec.hub_id,
                "status": "ready",
                "tasks": list(spec.tasks),
            },
        )


class Migration(migrations.Migration):
    dependencies = [("registry", "0001_initial")]

    operations = [migrations.RunPython(create_catalogue_rows, migrations.RunPython.noop)]
