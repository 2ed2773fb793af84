"""Create the demo team, its default project and the demo user, once.

The password is random and printed a single time; a second call leaves everything as it is.
"""

import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from webapp.accounts.models import Membership, Role, Team
from webapp.experiments.models import Project


class Command(BaseCommand):
    help = "Create the demo team, project and user (random password, printed once)."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")
        parser.add_argument("--team", default="Demo team")

    @transaction.atomic
    def handle(self, *args, username: str, team: str, **options):
        team_obj, _ = Team.objects.get_or_create(name=team)
        Project.objects.get_or_create(team=team_obj, name="Default")
        user_model = get_user_model()
        if user_model.objects.filter(username=username).exists():
            self.stdout.write(
                f"User '{username}' exists. Forgot the password? "
                f"python manage.py changepassword {username}"
            )
            return
        password = secrets.token_urlsafe(12)
        user = user_model.objects.create_user(username=username, password=password)
        Membership.objects.create(team=team_obj, user=user, role=Role.OWNER)
        banner = "=" * 60
        address = settings.BIND_ADDRESS  # where bin/serve listens
        self.stdout.write(
            self.style.SUCCESS(
                f"\n{banner}\n  Log in at http://{address}/\n"
                f"  username: {username}\n  password: {password}\n"
                f"  (shown once; stored only as a hash)\n{banner}\n"
            )
        )
