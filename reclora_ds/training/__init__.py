"""Training recipes: stage 1 (the CRM) in :mod:`~reclora_ds.training.crm_recipe`, its checkpoints in
:mod:`~reclora_ds.training.checkpoint`, the CRM states for stage 2 in :mod:`~reclora_ds.training.crm_states`,
metric loggers in :mod:`~reclora_ds.training.logger`."""
