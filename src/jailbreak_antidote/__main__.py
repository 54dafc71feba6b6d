"""`python -m jailbreak_antidote ...` runs the `antidote` command line."""

from .cli import app

app()
