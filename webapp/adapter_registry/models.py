"""The model registry: a team's adapters promoted under a name, as MLflow's and W&B's
registries keep models. Not to be confused with webapp/registry, the *base* models runs start
from ("Models" on the pages).

A registered model is a team-scoped name; its versions 1, 2, … each point at one stored
adapter of a run (the run's adapter files of one artifact version: the bytes stay where the
run keeps them, the registry holds references). Aliases (`production`, `staging`, any slug)
point at one version each; moving one is written to the team's audit log.

A run with a registered version cannot be deleted (`on_delete=RESTRICT`, and
experiments.services.run_delete says so first): delete the version, then the run.
"""

from django.conf import settings
from django.db import models

from webapp.accounts.models import Team
from webapp.experiments.models import Run


class RegisteredModel(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="registered_models")
    name = models.CharField(max_length=100)  # a slug: services.NAME
    description = models.TextField(blank=True, default="", max_length=2000)
    # The last version number handed out: numbers are never reused, also after a delete.
    last_number = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="registered_unique_team_name")
        ]
        ordering = ["name", "team_id"]

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    """Version `number` of a registered model: run `run`'s adapter files of `adapter_version`
    (Artifact rows of kind adapter with that version). Immutable once written."""

    registered = models.ForeignKey(
        RegisteredModel, on_delete=models.CASCADE, related_name="versions"
    )
    number = models.PositiveIntegerField()
    run = models.ForeignKey(Run, on_delete=models.RESTRICT, related_name="registered_versions")
    adapter_version = models.PositiveIntegerField()
    description = models.TextField(blank=True, default="", max_length=2000)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["registered", "number"], name="version_unique_number"),
            models.UniqueConstraint(
                fields=["registered", "run", "adapter_version"], name="version_unique_adapter"
            ),
        ]
        ordering = ["registered_id", "-number"]

    def __str__(self) -> str:
        return f"{self.registered.name} v{self.number}"


class ModelAlias(models.Model):
    """A movable name for one version (`production`, `staging`, …); moves are audited."""

    registered = models.ForeignKey(
        RegisteredModel, on_delete=models.CASCADE, related_name="aliases"
    )
    name = models.CharField(max_length=50)  # a slug: services.ALIAS
    version = models.ForeignKey(ModelVersion, on_delete=models.RESTRICT, related_name="aliases")
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["registered", "name"], name="alias_unique_name")
        ]
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.registered.name}@{self.name}"
