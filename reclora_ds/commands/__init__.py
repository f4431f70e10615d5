"""Entry points as package modules: each is one command with a ``main(argv=None)``, thin over library calls.

Run one as ``python -m reclora_ds.commands.<name>``, ``reclora-ds <name>`` or, from a checkout, through its
wrapper ``launch/<name>.py`` / ``tools/<name>.py``; the pipeline runs these modules (``python -m``, ``torchrun
-m``, ``deepspeed --module``). Nothing is imported here: ``python -m`` runs a module that is not yet loaded.
"""
