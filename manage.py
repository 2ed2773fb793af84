#!/usr/bin/env python
"""Django's command-line utility for PEFT Lab."""

import sys


def main() -> None:
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
