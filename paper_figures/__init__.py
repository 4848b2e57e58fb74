"""One script per paper figure; each writes a PNG and the data behind it (JSON) into one folder.

    python -m paper_figures.NAME --out DIR [--quick] [--seed S]
    rivervalley figures -o DIR                      # all of them

The figures themselves are library code in :mod:`rivervalley.figures` (with the ``FIGURES`` registry and
``run_all``); each script here is a thin command-line entry point with the same ``make`` function.
"""
