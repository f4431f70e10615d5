"""Export one user's (one sample's) PLoRA as a standard peft LoRA folder.

A thin wrapper kept for the documented ``tools/export_user_lora.py`` commands: the code is
:mod:`reclora_ds.commands.export_user_lora` (``python -m reclora_ds.commands.export_user_lora``), whose docstring has
the usage.
"""

import sys

from reclora_ds.commands.export_user_lora import main

if __name__ == "__main__":
    sys.exit(main())
