"""Write a SYNTHETIC MovieLens-25M-layout folder (made-up ratings) for benchmarks and tests.

A thin wrapper kept for the documented ``tools/make_synthetic_ml25m.py`` commands: the code is
:mod:`reclora_ds.commands.make_synthetic_ml25m` (``python -m reclora_ds.commands.make_synthetic_ml25m``), whose docstring has
the usage.
"""

import sys

from reclora_ds.commands.make_synthetic_ml25m import main

if __name__ == "__main__":
    sys.exit(main())
