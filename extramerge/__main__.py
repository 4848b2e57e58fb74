"""`python -m extramerge ...` runs the `extramerge` command line."""

from extramerge.cli import main

raise SystemExit(main())
