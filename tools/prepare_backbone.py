"""Fetch, convert and verify the default LLM backbone (SmolLM2-135M-Instruct) in the reclora_ds cache.

A thin wrapper kept for the documented ``tools/prepare_backbone.py`` commands: the code is
:mod:`reclora_ds.commands.prepare_backbone` (``python -m reclora_ds.commands.prepare_backbone``), whose docstring has
the usage.
"""

import sys

from reclora_ds.commands.prepare_backbone import main

if __name__ == "__main__":
    sys.exit(main())
