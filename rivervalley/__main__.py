"""``python -m rivervalley`` = the ``rivervalley`` command."""

import sys

from rivervalley.cli import main

sys.exit(main())
