"""One house style for every figure in the book, and plot helpers that take tidy frames.

Figures carry no titles: the chapter's caption says what they show. Methods take colour-blind-safe
hues (:data:`METHOD_PALETTE`), and each method of chapter 08's comparison keeps its hue across
chapters (:func:`robustq.book.method_colors`); an ordered quantity (bit-width, depth) uses
:data:`ORDERED`, viridis without the yellow a line cannot be read in on white. Accuracies over seeds
are drawn seed by seed (:func:`seed_lines`), never as a mean ± sd band, which hides a collapsed seed
and can run past 100%.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

PALETTE = "colorblind"
ORDERED = "robustq_ordered"  # a matplotlib colormap name: seaborn palettes and cmaps both take it


def _register_ordered() -> None:
    if ORDERED not in mpl.colormaps:
        colors = mpl.colormaps["viridis"](np.linspace(0.0, 0.8, 256))
        mpl.colormaps.register(mpl.colors.ListedColormap(colors, name=ORDERED))


_register_ordered()


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


# Twelve hues a colour-blind reader tells apart (Paul Tol's "bright" and "muted" schemes,
# https://personal.sron.nl/~pault/): seaborn's colour-blind palette has five warm hues (orange,
# vermilion, brown, two pinks) that chapter 08's twelve methods made near-identical.
METHOD_PALETTE = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#332288", "#999933",
                  "#882255", "#44AA99", "#000000", "#BBBBBB")


def method_colors(methods: list[str], fixed: Sequence[str] = ()) -> dict[str, tuple[float, float, float]]:
    """One colour per method name from :data:`METHOD_PALETTE`, no hue twice in a figure of up to
    twelve methods (more get evenly spaced husl hues). A method in ``fixed`` always takes the hue of
    its position there, so it keeps its colour from chapter to chapter; the others take the hues
    left free, in order."""
    if len(methods) > len(METHOD_PALETTE):
        return dict(zip(methods, sns.color_palette("husl", len(methods))))
    palette = sns.color_palette(METHOD_PALETTE)
    slots = {name: position for position, name in enumerate(fixed) if position < len(palette)}
    taken = {slots[name] for name in methods if name in slots}
    free = iter(position for position in range(len(palette)) if position not in taken)
    return {name: palette[slots[name] if name in slots else next(free)] for name in methods}


def percent_axis(ax: plt.Axes, axis: str = "y") -> None:
    """Format an axis holding accuracies in [0, 1] as percentages."""
    formatter = mpl.ticker.PercentFormatter(xmax=1.0, decimals=0)
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(formatter)


def seed_lines(data: pd.DataFrame, x: str, y: str, hue: str, palette, ax: plt.Axes | None = None,
               units: str = "seed", legend: bool = True, **_facet_kws) -> plt.Axes:
    """``y`` against ``x`` per ``hue``: each seed (``units``) as a thin line, the median over seeds
    as a bold one with markers. A collapsed seed stays visible as its own line, where a mean ± sd
    band would hide it (and can reach past 100%). Extra keywords (``color``, ``label`` from
    ``FacetGrid.map_dataframe``) are ignored: ``palette`` colours the lines."""
    ax = ax or plt.gca()
    sns.lineplot(data=data, x=x, y=y, hue=hue, units=units, estimator=None, palette=palette, lw=0.7,
                 alpha=0.45, legend=False, ax=ax)
    sns.lineplot(data=data, x=x, y=y, hue=hue, estimator="median", errorbar=None, palette=palette, marker="o",
                 lw=1.8, legend=legend, ax=ax)
    return ax


def paired_points(data: pd.DataFrame, x: str, y: str, palette, ax: plt.Axes | None = None,
                  units: str = "seed") -> plt.Axes:
    """``y`` per category ``x`` (one model each): every seed (``units``) as a grey line joining its
    models, so that a paired difference reads as a slope and a collapsed seed stays visible, and
    each model's mean ± sd over seeds in its colour (``palette``, keyed by the values of ``x``)."""
    ax = ax or plt.gca()
    sns.lineplot(data=data, x=x, y=y, units=units, estimator=None, color="0.75", lw=1, ax=ax)
    sns.pointplot(data=data, x=x, y=y, hue=x, palette=palette, errorbar="sd", linestyle="none", legend=False,
                  ax=ax)
    return ax


def ceiling_line(ax: plt.Axes, value: float, label: str = "baseline float") -> None:
    """A dashed horizontal line at ``value`` (the float baseline's accuracy: the most a quantized
    model could win back), named at its right end."""
    ax.axhline(value, color="0.35", linestyle="--", linewidth=1)
    ax.annotate(label, (1.0, value), xycoords=("axes fraction", "data"), xytext=(-2, 2), textcoords="offset points",
                ha="right", va="bottom", fontsize="small", color="0.3")


ZOOM_ROW = "view"


def seed_grid(data: pd.DataFrame, x: str, y: str, hue: str, col: str, palette, *, height: float = 3.0,
              aspect: float = 1.2, units: str = "seed", zoom_from: float | None = None,
              zoom_label: str = "zoomed") -> sns.FacetGrid:
    """:func:`seed_lines` in one panel per value of ``col``, with one legend for the figure. With
    ``zoom_from``, a second row repeats the panels for ``x >= zoom_from`` on their own y-axis, so
    that differences of a point at W3 and above are not flattened by the tens of points lost at W2
    (the rows are the column :data:`ZOOM_ROW`; ``grid.axes[0]`` is the full row, ``zoom_label``
    names the second in its titles)."""
    colors = palette if isinstance(palette, dict) else level_colors(data[hue], palette)
    if zoom_from is None:
        grid = sns.FacetGrid(data, col=col, height=height, aspect=aspect)
    else:
        full, zoom = "all", zoom_label
        data = pd.concat([data.assign(**{ZOOM_ROW: full}), data[data[x] >= zoom_from].assign(**{ZOOM_ROW: zoom})],
                         ignore_index=True)
        grid = sns.FacetGrid(data, row=ZOOM_ROW, col=col, height=height * 0.8, aspect=aspect * 1.25,
                             sharey="row", row_order=[full, zoom], margin_titles=False)
        grid.set_titles(template="{col_name} · {row_name}")
    grid.map_dataframe(seed_lines, x=x, y=y, hue=hue, palette=colors, units=units, legend=False)
    handles = {str(level): mpl.lines.Line2D([], [], color=colors[level], marker="o", lw=1.8)
               for level in dict.fromkeys(data[hue])}
    grid.add_legend(legend_data=handles, title=hue)
    return grid


def level_colors(values: pd.Series, palette) -> dict:
    """One colour of ``palette`` per distinct value: numbers in increasing order (an ordered
    quantity), anything else in order of appearance."""
    levels = list(dict.fromkeys(values))
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in levels):
        levels = sorted(levels)
    return dict(zip(levels, sns.color_palette(palette, len(levels))))


CLAIM_MARKS = ("one seed", "mean, 95% interval", "τ", "equivalence margin", "room")  # the legend's order


def claim_panels(panels: Sequence[dict], columns: int = 4) -> plt.Figure:
    """One panel per graded claim. Each of ``panels`` has the claim's ``claim``, ``grade``,
    ``rule``, ``threshold``, ``unit``, per-seed ``differences`` (candidate - reference), their
    ``mean`` and the ``half_width`` of its 95% interval, and its ``room`` (NaN without one): each
    seed's difference is a dot (a collapsed seed shows as one far away), then the mean with its
    interval. The dashed line is tau (a paired claim) or the shaded band the margin (an equivalent
    one); the dotted line is the room the candidate had to win. Each panel's title gives its tau or
    margin and room; one legend, in a free cell or below the panels, names the marks, so that none
    covers a seed."""
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.35 * columns + 0.4, 3.0 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _claim_panel(ax, panel)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    marks = {label: handle for ax in axes.flat[:len(panels)]
             for handle, label in zip(*ax.get_legend_handles_labels())}
    marks = {label: marks[label] for label in CLAIM_MARKS if label in marks}
    if len(panels) < axes.size:  # in the free cell after the last panel
        free = axes.flat[len(panels)]
        free.set_visible(True)
        free.axis("off")
        free.legend(marks.values(), marks.keys(), loc="center", fontsize="small", frameon=False)
    else:
        fig.legend(marks.values(), marks.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=len(marks), fontsize="small", frameon=False)
    return fig


def _claim_panel(ax: plt.Axes, panel: dict) -> None:
    seeds = list(panel["differences"])
    mean_at = len(seeds) + 0.6
    ax.scatter(range(len(seeds)), list(panel["differences"].values()), s=22, color="#4477AA", zorder=3,
               label="one seed")
    half = panel["half_width"]
    ax.errorbar([mean_at], [panel["mean"]], yerr=[[half], [half]] if np.isfinite(half) else None, fmt="D",
                color="black", markersize=6, capsize=4, zorder=3, label="mean, 95% interval")
    ax.axhline(0.0, color="0.3", linewidth=0.9)
    threshold = panel["threshold"]
    if panel["rule"] == "paired":
        ax.axhline(threshold, color="#EE6677", linestyle="--", linewidth=1.2, label="τ")
        bounds = f"τ {threshold:g}"
    else:
        ax.axhspan(-threshold, threshold, color="#228833", alpha=0.15, label="equivalence margin")
        bounds = f"margin ±{threshold:g}"
    if np.isfinite(panel["room"]):
        ax.axhline(panel["room"], color="#AA3377", linestyle=":", linewidth=1.4, label="room")
        bounds += f", room {panel['room']:.2f}"
    ax.set_xticks([*range(len(seeds)), mean_at], [*(f"s{seed}" for seed in seeds), "mean"], fontsize="small")
    ax.set_xlim(-0.6, mean_at + 0.6)
    ax.set_title(f"{panel['claim']}\n{panel['grade']}\n{bounds}", fontsize="small")
    ax.set_ylabel(f"difference ({panel['unit']})", fontsize="small")
    ax.tick_params(axis="y", labelsize="small")
    ax.yaxis.get_offset_text().set_horizontalalignment("right")  # a "1e-5" clear of the title
