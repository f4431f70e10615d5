"""Embed every item description of a processed dataset with the LLM (sharded over ranks).

A thin wrapper kept for the documented ``tools/extract_item_embeddings.py`` commands: the code is
:mod:`reclora_ds.commands.extract_item_embeddings` (``python -m reclora_ds.commands.extract_item_embeddings``), whose docstring has
the usage.
"""

from reclora_ds.commands.extract_item_embeddings import main
from reclora_ds.distributed import run_and_exit

if __name__ == "__main__":
    run_and_exit(main)  # not sys.exit: see reclora_ds.distributed.run_and_exit
