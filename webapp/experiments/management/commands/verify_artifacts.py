"""`python manage.py verify_artifacts`: re-read stored files and record which are damaged."""

import time

from django.core.management.base import BaseCommand, CommandError

from webapp.experiments.integrity import sweep_runs_folder, verify_datasets_due, verify_due


class Command(BaseCommand):
    help = (
        "Re-read the stored files not checked for PEFTLAB_ARTIFACT_RECHECK_DAYS (sha256 of "
        "every byte), record damage on the run pages, and delete files under runs/ that no "
        "row names (crashed uploads) once they are a day old. Run files first, then uploaded "
        "datasets. Exits 2 when a file is damaged."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--every", type=float, default=0, help="repeat every so many seconds (0: one pass)"
        )
        parser.add_argument(
            "--max-gib", type=float, default=50.0, help="read at most this much per pass"
        )

    def handle(self, *args, every: float, max_gib: float, **options):
        if max_gib <= 0 or every < 0:
            raise CommandError("--max-gib must be positive and --every not negative")
        while True:
            budget = int(max_gib * 2**30)
            checked = verify_due(max_bytes=budget)
            datasets = verify_datasets_due(max_bytes=max(budget - checked.bytes, 1))
            checked.files += datasets.files
            checked.bytes += datasets.bytes
            checked.damaged += datasets.damaged
            swept = sweep_runs_folder()
            self.stdout.write(
                f"checked {checked.files} files ({checked.bytes / 2**20:.1f} MiB), "
                f"damaged {len(checked.damaged)}, deleted {len(swept)} unnamed files"
            )
            for line in checked.damaged:
                self.stdout.write(f"DAMAGED {line}")
            if not every:
                if checked.damaged:
                    raise CommandError("damaged files found", returncode=2)
                return
            time.sleep(every)
