"""The main job: every stage from raw files to the results table, as one resumable command.

    reclora-ds pipeline --config launch/configs/quickstart.yaml [--from STAGE] [section.key=value ...]

:mod:`~reclora_ds.pipeline.config` reads the file, :mod:`~reclora_ds.pipeline.stages` turns it into
commands, :mod:`~reclora_ds.pipeline.runner` runs them with hashes and records, and
:mod:`~reclora_ds.pipeline.report` writes the final table.
"""
