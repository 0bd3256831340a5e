"""``python -m producer.cli``: the same as the ``vmq`` console script."""

from producer.cli import app

app()
