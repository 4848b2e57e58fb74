"""``python -m paper_figures.fve_vs_window --out DIR [--quick] [--seed S]``: the figure of
:mod:`rivervalley.figures.fve_vs_window`."""

from rivervalley.figures import fve_vs_window, script_main

make = fve_vs_window.make


def main(argv=None):
    return script_main(fve_vs_window, argv)


if __name__ == "__main__":
    main()
