"""``python -m paper_figures.pc_projection --out DIR [--quick] [--seed S]``: the figure of
:mod:`rivervalley.figures.pc_projection`."""

from rivervalley.figures import pc_projection, script_main

make = pc_projection.make


def main(argv=None):
    return script_main(pc_projection, argv)


if __name__ == "__main__":
    main()
