"""The one plotting style of both packages: colours, sizes and resolution of every figure.

Pure data plus one context manager, so importing it costs nothing; matplotlib is imported only by
:func:`applied`. ``rivervalley.plots`` (paper figures, pyplot) and ``extramerge``'s figures (Agg canvas,
no pyplot) both draw under :func:`applied`, so a figure looks the same whichever package made it.
"""

from __future__ import annotations

__all__ = ["COLORS", "DPI", "SAVE_DPI", "STYLE", "applied"]

DPI = 110  # on-screen figure resolution
SAVE_DPI = 130  # PNG resolution of the paper figures

COLORS = {
    "raw": "#d62728",
    "sma": "#1f77b4",
    "ema": "#2ca02c",
    "theory": "#222222",
    "extra": "#9467bd",
    "decay": "#ff7f0e",
    "average": "#1f77b4",
    "bound": "#7f7f7f",
}

STYLE = {
    "figure.dpi": DPI,
    "savefig.dpi": SAVE_DPI,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def applied(**overrides):
    """A context manager under which matplotlib draws in this style (``overrides`` take precedence)."""
    import matplotlib

    return matplotlib.rc_context({**STYLE, **overrides})
