"""``python -m reclora_ds`` = the ``reclora-ds`` command."""

from reclora_ds.cli import run

run()
