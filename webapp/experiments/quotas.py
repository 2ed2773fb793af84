"""Per-team quotas and a per-user launch rate, judged inside the launch's transaction.

A launch first locks its user's and its team's rows, then counts: two launches of one team
(or one user) at once are judged one after the other, so both cannot pass on the same count.
A sweep is judged whole, before any of its runs exists: refused, nothing is created.

The counts come from PostgreSQL (runs queued, sweeps and runs created in the last minute),
so they are exact across any number of web processes and need no cache.
"""

from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Sum
from django.utils import timezone

from webapp.accounts.models import Team
from webapp.experiments.models import CLAIMABLE_STATUSES, EXTERNAL_WORKER, Run, RunStatus, Sweep

RATE_WINDOW = timedelta(minutes=1)


class QuotaExceeded(Exception):
    """A launch over a quota; its text names the limit (the API answers 429 with it)."""


def launch_check(*, user, team: Team, runs: int, devices: int) -> None:
    """Refuse a launch of `runs` runs of `devices` devices each over a quota. Call it in the
    launch's transaction (atomic), before creating anything."""
    get_user_model().objects.select_for_update().filter(id=user.id).exists()
    Team.objects.select_for_update().filter(id=team.id).exists()
    limit = settings.TEAM_MAX_RUNNING
    if devices > limit:
        raise QuotaExceeded(
            f"A run on {devices} devices can never start: team {team.name} may use "
            f"{limit} devices at once, its limit."
        )
    queued = Run.objects.filter(project__team=team, status__in=CLAIMABLE_STATUSES).count()
    if queued + runs > settings.TEAM_MAX_QUEUED:
        asked = f" and this launch adds {runs}" if runs > 1 else ""
        raise QuotaExceeded(
            f"Team {team.name} has {queued} queued runs{asked}; its limit is "
            f"{settings.TEAM_MAX_QUEUED}. Wait for some to start, or cancel some."
        )
    launched = launches_in_last_minute(user=user)
    if launched >= settings.LAUNCH_RATE:
        raise QuotaExceeded(
            f"You launched {launched} times in the last minute; the limit is "
            f"{settings.LAUNCH_RATE} launches a minute. Try again in a minute."
        )


def launches_in_last_minute(*, user) -> int:
    """A run launched alone counts one, a sweep counts one whatever its size."""
    since = timezone.now() - RATE_WINDOW
    runs = Run.objects.filter(created_by=user, created_at__gte=since, sweep__isnull=True)
    sweeps = Sweep.objects.filter(created_by=user, created_at__gte=since)
    return runs.count() + sweeps.count()


def running_devices(team_ids) -> dict[int, int]:
    """{team id: devices its running runs hold}, for the fair order and the device limit."""
    rows = (
        Run.objects.filter(project__team_id__in=team_ids, status=RunStatus.RUNNING)
        .exclude(worker=EXTERNAL_WORKER)  # trained elsewhere: holds none of our devices
        .values("project__team_id")
        .annotate(devices=Sum("devices"))
    )
    return {row["project__team_id"]: row["devices"] or 0 for row in rows}
