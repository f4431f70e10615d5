"""Retrieve every sample's long (CRM) and short (prompt) history and store them beside the processed dataset.

A thin wrapper kept for the documented ``tools/retrieve_histories.py`` commands: the code is
:mod:`reclora_ds.commands.retrieve_histories` (``python -m reclora_ds.commands.retrieve_histories``), whose docstring has
the usage.
"""

import sys

from reclora_ds.commands.retrieve_histories import main

if __name__ == "__main__":
    sys.exit(main())
