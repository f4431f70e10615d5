"""Build the item FAISS index: embeddings -> PCA -> unit vectors -> index directory with a checked sidecar.

A thin wrapper kept for the documented ``tools/build_faiss_index.py`` commands: the code is
:mod:`reclora_ds.commands.build_faiss_index` (``python -m reclora_ds.commands.build_faiss_index``), whose docstring has
the usage.
"""

import sys

from reclora_ds.commands.build_faiss_index import main

if __name__ == "__main__":
    sys.exit(main())
