"""`manage.py model_add --team T --name N (--path DIR | --hub ID@REV) [--wait S]`.

Registers a team's base model as the register page does, from the server's shell: the same
checks (allowed roots, safetensors only, no model code), then a worker inspects it.
"""

import time

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from webapp.accounts.models import Team
from webapp.registry.models import BaseModel, ModelStatus
from webapp.registry.services import model_register_for_team


class Command(BaseCommand):
    help = "Register a team's base model: a directory under PEFTLAB_MODEL_ROOTS or a Hub id@rev."

    def add_arguments(self, parser):
        parser.add_argument("--team", required=True, help="the team's name")
        parser.add_argument("--name", required=True, help="what runs will call the model")
        parser.add_argument("--title", default="")
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--path", help="a directory in Hugging Face layout")
        source.add_argument("--hub", help="a Hub id with a revision: org/name@rev")
        parser.add_argument(
            "--wait",
            type=float,
            default=0,
            help="seconds to wait for a worker's inspection (0: return once queued)",
        )

    def handle(self, *args, team, name, title, path, hub, wait, **options):
        found = Team.objects.filter(name=team).first()
        if found is None:
            raise CommandError(f"no team named {team!r}")
        try:
            model = model_register_for_team(
                team=found, name=name, title=title, path=path or "", hub=hub or ""
            )
        except ValidationError as error:
            raise CommandError(" ".join(error.messages)) from None
        self.stdout.write(f"registered {model.name} (id {model.id}); a worker inspects it")
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline:
            model = BaseModel.objects.get(id=model.id)
            if model.status != ModelStatus.INSPECTING:
                break
            time.sleep(0.5)
        if model.status == ModelStatus.REFUSED:
            raise CommandError(f"{model.name} was refused: {model.error}")
        self.stdout.write(f"{model.name}: {model.get_status_display().lower()}")
