"""Per-sample p(yes) of a split: a trained stage-2 run (plora / lora) or the zero-shot backbone.

A thin wrapper kept for the documented ``tools/score.py`` commands: the code is
:mod:`reclora_ds.commands.score` (``python -m reclora_ds.commands.score``), whose docstring has
the usage.
"""

from reclora_ds.commands.score import main
from reclora_ds.distributed import run_and_exit

if __name__ == "__main__":
    run_and_exit(main)  # not sys.exit: see reclora_ds.distributed.run_and_exit
