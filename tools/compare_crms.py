"""Compare trained CRMs on the same samples of a split: AUC with 95% CI, log loss, paired DeLong tests.

A thin wrapper kept for the documented ``tools/compare_crms.py`` commands: the code is
:mod:`reclora_ds.commands.compare_crms` (``python -m reclora_ds.commands.compare_crms``), whose docstring has
the usage.
"""

import sys

from reclora_ds.commands.compare_crms import main

if __name__ == "__main__":
    sys.exit(main())
