"""The paper's experiments as commands: ``reclora-ds experiment --config launch/experiments/<name>.yaml``.

An experiment is a base pipeline config, named variants (override sets) and seeds
(:mod:`~reclora_ds.experiments.spec`); :mod:`~reclora_ds.experiments.plan` resolves every variant x seed into
stage folders keyed by hash, so what variants share (prepared data, embeddings, index, retrieval, a CRM) is
computed once; :mod:`~reclora_ds.experiments.run` runs them with the pipeline's executor and launchers;
:mod:`~reclora_ds.experiments.aggregate` writes the table (seed statistics, Rel., paired significance),
:mod:`~reclora_ds.experiments.plots` the figure and :mod:`~reclora_ds.experiments.hparams` TensorBoard's
HParams view.
"""
