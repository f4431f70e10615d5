"""CRM states for stage 2: the frozen CRM's hidden vector of every sample of a split (or of listed samples).

A thin wrapper kept for the documented ``tools/compute_crm_states.py`` commands: the code is
:mod:`reclora_ds.commands.compute_crm_states` (``python -m reclora_ds.commands.compute_crm_states``), whose docstring has
the usage.
"""

import sys

from reclora_ds.commands.compute_crm_states import main

if __name__ == "__main__":
    sys.exit(main())
