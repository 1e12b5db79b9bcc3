"""One house style for every figure in the book, and plot helpers that take tidy frames.

Figures carry no titles: the chapter's caption says what they show. Colours come from seaborn's
colour-blind palette; each method keeps its colour across chapters.
"""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import seaborn as sns

PALETTE = "colorblind"


def use_style() -> None:
    """Apply the book's plot style (seaborn whitegrid, colour-blind palette, crisp inline PNGs)."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE, font_scale=0.95)
    mpl.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 110,
            "figure.figsize": (7.0, 3.6),
            "figure.constrained_layout.use": True,
            "axes.titlesize": "medium",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.frameon": False,
        }
    )


def method_colors(methods: list[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per method name, in order: the colour-blind palette's ten, then its darker
    companion's, so that a figure of more than ten methods (chapter 08) repeats no colour."""
    colors = [*sns.color_palette(PALETTE), *sns.color_palette("dark")]
    if len(methods) > len(colors):
        colors = sns.color_palette("husl", len(methods))
    return dict(zip(methods, colors))


def percent_axis(ax: plt.Axes, axis: str = "y") -> None:
    """Format an axis holding accuracies in [0, 1] as percentages."""
    formatter = mpl.ticker.PercentFormatter(xmax=1.0, decimals=0)
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(formatter)
