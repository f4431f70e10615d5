"""Download a public dataset (GroupLens MovieLens archives, checksummed; GoodReads: where to get it).

A thin wrapper of :mod:`reclora_ds.commands.download` (``reclora-ds download``), whose docstring has the usage.
"""

from reclora_ds.commands.download import main
from reclora_ds.distributed import run_and_exit

if __name__ == "__main__":
    run_and_exit(main)  # not sys.exit: see reclora_ds.distributed.run_and_exit
