"""``python -m paper_figures.sma_ema_response --out DIR [--quick] [--seed S]``: the figure of
:mod:`rivervalley.figures.sma_ema_response`."""

from rivervalley.figures import script_main, sma_ema_response

make = sma_ema_response.make


def main(argv=None):
    return script_main(sma_ema_response, argv)


if __name__ == "__main__":
    main()
