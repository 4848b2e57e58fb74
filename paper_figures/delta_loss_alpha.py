"""``python -m paper_figures.delta_loss_alpha --out DIR [--quick] [--seed S]``: the figure of
:mod:`rivervalley.figures.delta_loss_alpha`."""

from rivervalley.figures import delta_loss_alpha, script_main

make = delta_loss_alpha.make


def main(argv=None):
    return script_main(delta_loss_alpha, argv)


if __name__ == "__main__":
    main()
