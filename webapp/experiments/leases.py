"""The fenced writes of a claimed run, and the reaper's queries.

A worker claims a run (`run_claim`), which moves its fence on and returns it; every later
write names that fence. Once another claim has taken the run, or the run ended or was
marked lost, the stale worker's writes change nothing and raise StaleFenceError. The
reaper (`runs_reap`, `runs_unclaimed`) finds runs whose lease expired and moves their
fence on, so a presumed-dead worker's late writes are refused even before a new claim.

Which run a free worker takes is decided here too (`run_next_fair`), not by the order of
Celery's messages: a message for a run of queue Q is a turn for whichever waiting run of Q
goes next in the fair order.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Max, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from webapp.experiments import artifacts, quotas
from webapp.experiments.artifacts import next_version
from webapp.experiments.models import (
    CLAIMABLE_STATUSES,
    EXTERNAL_WORKER,
    Artifact,
    FailureClass,
    Run,
    RunStatus,
)
from webapp.experiments.queue import run_queue, run_queue_parts
from webapp.experiments.store import store_delete


class StaleFenceError(RuntimeError):
    """The run was claimed again or ended: this worker no longer owns it."""


def run_claim(*, run_id: int, worker: str) -> int | None:
    """Take a queued (or lost) run for this worker. Returns the new fence, or None.

    None means someone else holds or ended it: a duplicate delivery, a cancel, or a second
    message sent by the reaper for a run another worker already took.
    """
    now = timezone.now()
    with transaction.atomic():
        claimed = Run.objects.filter(id=run_id, status__in=CLAIMABLE_STATUSES).update(
            status=RunStatus.RUNNING,
            fence=F("fence") + 1,
            attempt=F("attempt") + 1,
            worker=worker[:255],
            started_at=Coalesce(F("started_at"), now),
            heartbeat_at=now,
            error="",
            failure_class="",
        )
        if claimed != 1:
            return None
        return Run.objects.values_list("fence", flat=True).get(id=run_id)


def run_next_fair(*, queue: str, exclude: Iterable[int] = ()) -> int | None:
    """The waiting run of `queue` that a free worker of it trains next, or None.

    Between teams: the team whose running runs hold the fewest devices, then the team whose
    last run started longest ago (or never), so one slot alternates between teams however
    many runs each queued. Within a team: higher priority, then first come. A team whose
    running runs hold its PEFTLAB_TEAM_MAX_RUNNING devices waits.
    """
    parts = run_queue_parts(queue)
    if parts is None:
        return None
    gpu_class, devices = parts
    waiting = Run.objects.filter(
        status__in=CLAIMABLE_STATUSES, gpu_class=gpu_class, devices=devices
    ).exclude(id__in=list(exclude))
    team_ids = set(waiting.values_list("project__team_id", flat=True).distinct())
    busy = quotas.running_devices(team_ids)
    last_start = _last_start(team_ids)
    turns = []
    for team_id in team_ids:
        if busy.get(team_id, 0) + devices > settings.TEAM_MAX_RUNNING:
            continue
        head = (
            waiting.filter(project__team_id=team_id)
            .order_by("-priority", "created_at", "id")
            .values_list("id", flat=True)
            .first()
        )
        started = last_start.get(team_id)
        turns.append((busy.get(team_id, 0), started is not None, started, head))
    return min(turns)[-1] if turns else None


def _last_start(team_ids) -> dict:
    rows = (
        Run.objects.filter(project__team_id__in=team_ids, started_at__isnull=False)
        .exclude(worker=EXTERNAL_WORKER)
        .values("project__team_id")
        .annotate(last=Max("started_at"))
    )
    return {row["project__team_id"]: row["last"] for row in rows}


def run_held_after(*, run_id: int) -> tuple[int, str] | None:
    """After run `run_id` ended: its team's next waiting run and its queue, if the team's
    device limit was holding it back (the worker then sends it a message: the one it had
    may have been spent by a worker that found the team at its limit)."""
    run = Run.objects.select_related("project").only("devices", "project__team_id").get(id=run_id)
    team_id = run.project.team_id
    head = (
        Run.objects.filter(project__team_id=team_id, status__in=CLAIMABLE_STATUSES)
        .order_by("-priority", "created_at", "id")
        .only("id", "devices", "gpu_class")
        .first()
    )
    if head is None:
        return None
    busy = quotas.running_devices([team_id]).get(team_id, 0)
    was_held = busy + run.devices + head.devices > settings.TEAM_MAX_RUNNING
    return (head.id, run_queue(head.gpu_class, head.devices)) if was_held else None


def owned(run_id: int, fence: int):
    """The run, if `fence` still holds it (claimed by this worker, not ended, not lost)."""
    return Run.objects.filter(id=run_id, fence=fence, status=RunStatus.RUNNING)


def run_heartbeat(*, run_id: int, fence: int, step: int | None = None) -> bool:
    """Renew the lease (and record progress); returns whether a cancel was requested."""
    fields = {"heartbeat_at": timezone.now()}
    if step is not None:
        fields["step"] = step
    if not owned(run_id, fence).update(**fields):
        raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
    return Run.objects.values_list("cancel_requested", flat=True).get(id=run_id)


def run_log_append(*, run_id: int, fence: int, lines: Iterable[str]) -> None:
    with transaction.atomic():
        run = owned(run_id, fence).select_for_update().only("log").first()
        if run is None:
            raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
        owned(run_id, fence).update(log=_log_with(run.log, list(lines)))


def artifact_version_next(*, run_id: int, fence: int, kind: str) -> int:
    """The version this attempt's files of `kind` take: one past the newest stored, so an
    adapter an earlier attempt stored stays beside the new one instead of being replaced."""
    if not owned(run_id, fence).exists():
        raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
    return next_version(run_id=run_id, kind=kind)


def artifact_store(
    *,
    run_id: int,
    fence: int,
    kind: str,
    name: str,
    data: bytes,
    version: int = 1,
    in_store: bool = False,
) -> Artifact:
    """Store one file of a run under `version` (artifacts.artifact_put: `in_store` for a
    model-sized file); a retry of the same write replaces what it wrote (the same name and
    version), never another version."""
    with transaction.atomic():
        if not owned(run_id, fence).select_for_update().exists():
            raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
        artifacts.artifacts_delete(
            Artifact.objects.filter(run_id=run_id, kind=kind, name=name, version=version)
        )
        return artifacts.artifact_put(
            run_id=run_id, kind=kind, name=name, data=data, version=version, in_store=in_store
        )


def run_finish(
    *,
    run_id: int,
    fence: int,
    status: str,
    error: str = "",
    failure_class: str = "",
    summary: dict | None = None,
    profile: dict | None = None,
) -> None:
    """End the run; its checkpoints go with it (a finished run is never resumed)."""
    fields = {
        "status": status,
        "finished_at": timezone.now(),
        "error": error[:10_000],
        "failure_class": failure_class,
    }
    if summary is not None:
        fields["summary"] = summary
    if profile is not None:
        fields["profile"] = profile
    with transaction.atomic():
        if not owned(run_id, fence).update(**fields):
            raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
        artifacts.checkpoints_delete(run_id=run_id)


def run_release(*, run_id: int, fence: int, reason: str) -> bool:
    """Give a running run back as lost, to be resumed from its checkpoint by the next worker
    (a worker shutting down). Moves the fence on, as the reaper does; the caller queues it
    again once this has committed. False when the fence no longer holds the run."""
    now = timezone.now()
    with transaction.atomic():
        run = owned(run_id, fence).select_for_update().only("log").first()
        if run is None:
            return False
        owned(run_id, fence).update(
            status=RunStatus.LOST,
            error=reason,
            heartbeat_at=now,  # since when it waits as lost
            fence=F("fence") + 1,
            log=_log_with(run.log, [f"released: {reason}"]),
        )
    return True


def checkpoint_store(*, run_id: int, fence: int, files: dict[str, bytes]) -> None:
    """Add `files` as the run's newest checkpoint and keep the last CHECKPOINTS_KEPT.

    The bytes go to the artifact store first, outside any transaction; the rows then appear
    all together or not at all, and files no row came to name are deleted again.
    """
    stored = artifacts.checkpoint_upload(run_id=run_id, files=files)
    try:
        with transaction.atomic():
            if not owned(run_id, fence).select_for_update().exists():
                raise StaleFenceError(f"run {run_id}: fence {fence} no longer holds it")
            keep = settings.CHECKPOINTS_KEPT
            artifacts.checkpoint_record(run_id=run_id, stored=stored, keep=keep)
    except BaseException:
        store_delete(file.key for file in stored.values())
        raise


def checkpoint_versions(*, run_id: int) -> list[int]:
    """The run's stored checkpoints, newest first."""
    return artifacts.checkpoint_versions(run_id=run_id)


def checkpoint_files(*, run_id: int, version: int | None = None) -> dict[str, bytes]:
    """A checkpoint (the newest unless `version`) as {file name: bytes}; empty when there is
    none. Raises ArtifactDamaged when a file fails its sha256 check."""
    versions = artifacts.checkpoint_versions(run_id=run_id)
    if version is None and not versions:
        return {}
    return artifacts.checkpoint_files(run_id=run_id, version=version or versions[0])


@dataclass(frozen=True)
class Reaped:
    lost: list[int]  # marked lost: to be sent to a worker again
    failed: list[int]  # out of attempts: failed as worker-lost


def runs_reap(*, lease_s: float, max_attempts: int) -> Reaped:
    """Mark runs whose lease expired lost (or failed, once out of attempts).

    Marking a run lost moves its fence on, so the presumed-dead worker's late writes are
    refused even before another worker claims it. The caller sends the lost runs' ids to
    the queue after this returns (committed).
    """
    now = timezone.now()
    lost, failed = [], []
    with transaction.atomic():
        stale = (
            Run.objects.select_for_update(skip_locked=True)
            .filter(status=RunStatus.RUNNING, heartbeat_at__lt=now - timedelta(seconds=lease_s))
            .exclude(worker=EXTERNAL_WORKER)  # trained elsewhere: no lease to expire
            .only("id", "attempt", "worker", "heartbeat_at", "log")
        )
        for run in stale:
            since = run.heartbeat_at.strftime("%H:%M:%S UTC")
            reason = f"worker {run.worker} stopped sending heartbeats at {since}"
            if run.attempt >= max_attempts:
                fields = {
                    "status": RunStatus.FAILED,
                    "failure_class": FailureClass.WORKER_LOST,
                    "error": f"{reason}; gave up after {run.attempt} attempts",
                    "finished_at": now,
                }
                failed.append(run.id)
                artifacts.checkpoints_delete(run_id=run.id)  # never resumed now
            else:
                fields = {
                    "status": RunStatus.LOST,
                    "error": f"{reason}; sent again (attempt {run.attempt + 1} of {max_attempts})",
                    "heartbeat_at": now,  # from here on: since when it waits as lost
                }
                lost.append(run.id)
            Run.objects.filter(id=run.id).update(
                fence=F("fence") + 1, log=_log_with(run.log, [f"lost: {fields['error']}"]), **fields
            )
    return Reaped(lost=lost, failed=failed)


def runs_unclaimed(*, older_than_s: float) -> list[int]:
    """Queued or lost runs no worker has claimed for a while (oldest first)."""
    since = timezone.now() - timedelta(seconds=older_than_s)
    queued = Q(status=RunStatus.QUEUED, created_at__lt=since)
    lost = Q(status=RunStatus.LOST, heartbeat_at__lt=since)
    return list(Run.objects.filter(queued | lost).order_by("id").values_list("id", flat=True))


def _log_with(log: str, lines: list[str]) -> str:
    return "\n".join((log.splitlines() + lines)[-settings.RUN_LOG_LINES :])
