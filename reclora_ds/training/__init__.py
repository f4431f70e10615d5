"""Training recipes.

Stage 1 (the CRM): :mod:`~reclora_ds.training.crm_recipe`, its checkpoints in
:mod:`~reclora_ds.training.checkpoint`, the CRM states for stage 2 in :mod:`~reclora_ds.training.crm_states`.
Stage 2 (PLoRA with DeepSpeed ZeRO-2): :mod:`~reclora_ds.training.plora_recipe`, its batches (prompt tokens
and the CRM's ID view joined by ``sample_id``) in :mod:`~reclora_ds.training.plora_data`.
Metric loggers (TensorBoard on rank 0 only): :mod:`~reclora_ds.training.logger`.
"""
