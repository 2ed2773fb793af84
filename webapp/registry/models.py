"""The base models a team can train on: the bundled catalogue (rows with no team, which every
team sees) and the team's own, a local directory under an allowed root or a Hub id@revision.

A row is registered, then inspected by a worker on the meta device (no weights loaded); only
a ready row can be launched on. Rows do not change after inspection: a run copies the row's
source, commit and content hash (Run.base_weights) when it is created, so it says exactly
which weights it used even if the name is later registered again elsewhere.
"""

from django.conf import settings
from django.db import models
from django.db.models import Q

from webapp.accounts.models import Team


class ModelSource(models.TextChoices):
    CATALOGUE = "catalogue", "Bundled"
    LOCAL = "local", "Local directory"
    HUB = "hub", "Hugging Face Hub"


class ModelStatus(models.TextChoices):
    INSPECTING = "inspecting", "Inspecting"
    READY = "ready", "Ready"
    REFUSED = "refused", "Refused"


class BaseModel(models.Model):
    team = models.ForeignKey(
        Team, on_delete=models.CASCADE, related_name="base_models", null=True, blank=True
    )
    # What runs, sweeps, the API and the CLI call it: a catalogue key, or a team's own name.
    name = models.CharField(max_length=100)
    title = models.CharField(max_length=200, blank=True, default="")
    description = models.TextField(blank=True, default="")
    source = models.CharField(max_length=12, choices=ModelSource.choices)
    # The catalogue key, the directory's real path, or the Hub repo id.
    location = models.CharField(max_length=1000)
    revision = models.CharField(max_length=100, blank=True, default="")  # as asked (Hub)
    commit = models.CharField(max_length=64, blank=True, default="")  # as resolved (Hub)
    content_sha256 = models.CharField(max_length=64, blank=True, default="")
    status = models.CharField(
        max_length=12, choices=ModelStatus.choices, default=ModelStatus.INSPECTING
    )
    error = models.TextField(blank=True, default="")
    tasks = models.JSONField(default=list)
    # inspect.py's report: architecture, sizes, dtype, every Linear, each method's places.
    facts = models.JSONField(default=dict)
    attempt = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    created_at = models.DateTimeField(auto_now_add=True)
    inspected_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="basemodel_unique_team_name"),
            models.UniqueConstraint(
                fields=["name"], condition=Q(team=None), name="basemodel_unique_global_name"
            ),
        ]
        ordering = ["team_id", "name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_ready(self) -> bool:
        return self.status == ModelStatus.READY

    @property
    def is_bundled(self) -> bool:
        return self.team_id is None

    @property
    def source_text(self) -> str:
        """Where the weights come from, in one line: "Qwen/Qwen2.5-0.5B@main (commit 1a2b…)"."""
        if self.source == ModelSource.HUB:
            commit = f" (commit {self.commit[:12]})" if self.commit else ""
            return f"{self.location}@{self.revision}{commit}"
        return self.location

    def weights(self) -> dict:
        """What a run records of its base model, and what a worker loads it from."""
        return {
            "name": self.name,
            "source": self.source,
            "location": self.location,
            "revision": self.revision,
            "commit": self.commit,
            "content_sha256": self.content_sha256,
            "dtype": self.facts.get("dtype", ""),
        }
