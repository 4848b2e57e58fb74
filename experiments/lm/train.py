"""Train a byte-level GPT-2 or LLaMA: ``python -m experiments.lm.train --help``.

The trainer lives in ``extramerge.lm`` (``config``, ``train``, ``checkpointing``, ``cli``, ...); this script
runs its command line.
"""

import sys

from extramerge.lm.cli import main

if __name__ == "__main__":
    sys.exit(main())
