"""``python -m reclora_ds`` = the ``reclora-ds`` command."""

import sys

from reclora_ds.cli import main

sys.exit(main())
