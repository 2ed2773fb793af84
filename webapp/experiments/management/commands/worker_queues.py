"""`python manage.py worker_queues`: the -Q list of a training worker, from its class and
device count (PEFTLAB_WORKER_GPU_CLASS, PEFTLAB_WORKER_DEVICES, or the options)."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from webapp.experiments import queue


def detected_devices() -> int:
    """The GPUs torch sees; 2 on a machine without any, so a devices=2 run (gloo on CPU)
    finds a worker on the embedded default."""
    import torch  # only here: the web never needs it for this

    return min(torch.cuda.device_count(), queue.MAX_DEVICES) or 2


class Command(BaseCommand):
    help = "Print the comma-separated run queues a training worker of this class and size serves."

    def add_arguments(self, parser):
        parser.add_argument("--class", dest="gpu_class", default=settings.WORKER_GPU_CLASS)
        parser.add_argument("--devices", type=int, default=settings.WORKER_DEVICES)

    def handle(self, *args, gpu_class: str, devices: int, **options):
        devices = devices or detected_devices()
        if not (queue.GPU_CLASS_RE.match(gpu_class) and 1 <= devices <= queue.MAX_DEVICES):
            raise CommandError("--class must match [a-z0-9-]{1,40}; --devices 1 to 8")
        self.stdout.write(",".join(queue.worker_queues(gpu_class, devices)))
