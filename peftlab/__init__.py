"""PEFT Lab's Python client and command line (`peftlab`)."""
