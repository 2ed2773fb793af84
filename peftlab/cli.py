"""`peftlab`: the command line (remote commands are added by the client module)."""

from peft_core.cli import main

__all__ = ["main"]
