"""`python manage.py reaper`: mark runs whose worker died lost and send them again."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from webapp.experiments.reaper import Reaper


class Command(BaseCommand):
    help = "Find runs whose lease expired, mark them lost and send them to a worker again."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="one pass, then exit (cron)")
        parser.add_argument("--every", type=float, default=settings.RUN_REAPER_EVERY_S)

    def handle(self, *args, once: bool, every: float, **options):
        reaper = Reaper()
        if once:
            reaper.connected_since = float("-inf")  # a single pass judges at once
            reaped = reaper.tick()
            if reaped is None:
                raise CommandError("the database is unreachable")
            self.stdout.write(f"lost: {reaped.lost}  failed: {reaped.failed}")
            return
        reaper.forever(every)
