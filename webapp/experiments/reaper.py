"""The reaper: finds runs whose worker stopped heartbeating and sends them to a worker again.

It runs as its own small process (`python manage.py reaper`, the `reaper` service of
docker-compose.yml), never on a GPU worker, whose one slot is busy training; it needs only
the leases' queries and Celery, so it lives beside its command on the web side.

A run is presumed lost only when the reaper itself has been connected to PostgreSQL for a
whole lease: after a database outage every heartbeat looks old, and the workers need one
lease to renew theirs before the reaper may judge them.
"""

import logging
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection

from webapp.celery import app as celery_app
from webapp.experiments import leases, queue
from webapp.experiments.models import Run

logger = logging.getLogger(__name__)


@dataclass
class Reaper:
    lease_s: float = field(default_factory=lambda: settings.RUN_LEASE_S)
    max_attempts: int = field(default_factory=lambda: settings.RUN_MAX_ATTEMPTS)
    resend_after_s: float = field(default_factory=lambda: settings.RUN_RESEND_AFTER_S)
    connected_since: float | None = None  # monotonic time of the first pass in a row that worked

    def tick(self, now: float | None = None) -> leases.Reaped | None:
        """One pass. Returns what it reaped, or None while it may not judge (or the DB is down)."""
        now = time.monotonic() if now is None else now
        try:
            connection.ensure_connection()
        except (OperationalError, InterfaceError) as exc:
            self._disconnected(exc)
            return None
        if self.connected_since is None:
            self.connected_since = now
        if now - self.connected_since < self.lease_s:
            return None
        try:
            reaped = leases.runs_reap(lease_s=self.lease_s, max_attempts=self.max_attempts)
            unclaimed = leases.runs_unclaimed(older_than_s=self.resend_after_s)
        except (OperationalError, InterfaceError) as exc:
            self._disconnected(exc)
            return None
        queues = run_queues(reaped.lost + unclaimed)  # a run deleted meanwhile has none
        for run_id in reaped.lost:
            logger.warning("run %s lost: sending it to a worker again", run_id)
            if run_id in queues:
                queue.enqueue_run(run_id, queues[run_id])
        for run_id in reaped.failed:
            logger.warning("run %s lost on its last attempt: failed", run_id)
        resend = [r for r in unclaimed if r not in reaped.lost and r in queues]
        empty = {name: queue_length(name) == 0 for name in {queues[r] for r in resend}}
        resend = [run_id for run_id in resend if empty[queues[run_id]]]
        if resend:
            # Nothing is waiting in their queues, yet these runs wait for a worker: their
            # messages vanished (a broker restarted without persistence), or a worker spent
            # them while their team was at its device limit. A duplicate is harmless: the
            # claim lets one worker train, the others skip.
            logger.warning("runs %s wait with an empty queue: sending them again", resend)
            for run_id in resend:
                queue.enqueue_run(run_id, queues[run_id])
        return reaped

    def _disconnected(self, exc: Exception) -> None:
        if self.connected_since is not None:
            logger.warning(
                "reaper: database unreachable (%s); judging nobody until it is back", exc
            )
        self.connected_since = None
        try:
            connection.close()
        except (OperationalError, InterfaceError):
            pass

    def forever(self, every_s: float) -> None:
        logger.info(
            "reaper: lease %ss, %s attempts, a pass every %ss",
            self.lease_s,
            self.max_attempts,
            every_s,
        )
        while True:
            self.tick()
            time.sleep(every_s)


def run_queues(run_ids: list[int]) -> dict[int, str]:
    """{run id: the queue of the class and devices it needs}."""
    rows = Run.objects.filter(id__in=run_ids).values_list("id", "gpu_class", "devices")
    return {run_id: queue.run_queue(gpu_class, devices) for run_id, gpu_class, devices in rows}


def queue_length(name: str) -> int | None:
    """Messages waiting in the run queue `name`, or None if the broker cannot tell."""
    try:
        with celery_app.connection_for_write() as conn:
            # Not passive: Redis drops an empty list, and a passive declaration of it fails.
            declared = conn.default_channel.queue_declare(name, durable=True, auto_delete=False)
            return declared.message_count
    except Exception:  # a broker that cannot count: never resend blindly
        logger.exception("reaper: could not count the queue %s", name)
        return None
