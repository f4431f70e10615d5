"""Stage 2: tune PLoRA (or LoRA; or evaluate zero-shot) of a frozen LLM on the few-shot split, DeepSpeed ZeRO-2.

A thin wrapper kept for the documented ``launch/train_plora.py`` commands: the code is
:mod:`reclora_ds.commands.train_plora` (``python -m reclora_ds.commands.train_plora``), whose docstring has
the usage.
"""

from reclora_ds.commands.train_plora import main
from reclora_ds.distributed import run_and_exit
from reclora_ds.malloc_preload import declare_process_entry

if __name__ == "__main__":
    declare_process_entry()  # this process's command line is this command's: it may run again preloaded
    run_and_exit(main)  # not sys.exit: see reclora_ds.distributed.run_and_exit
