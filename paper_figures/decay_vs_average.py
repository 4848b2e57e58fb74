"""``python -m paper_figures.decay_vs_average --out DIR [--quick] [--seed S]``: the figure of
:mod:`rivervalley.figures.decay_vs_average`."""

from rivervalley.figures import decay_vs_average, script_main

make = decay_vs_average.make


def main(argv=None):
    return script_main(decay_vs_average, argv)


if __name__ == "__main__":
    main()
