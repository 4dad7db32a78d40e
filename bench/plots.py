"""PNG plots for the reports: scaling with batch size or object count, with the quartile band drawn."""

from __future__ import annotations

from bench.context import Context
from bench.report import report_stem
from bench.timing import Stat


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(ctx: Context, plt, fig, name: str) -> str:
    """Lay out, write ``<report stem>_<name>.png`` into ``ctx.out`` and close the figure; return its name."""
    fig.tight_layout()
    fname = f"{report_stem(ctx.env)}_{name}.png"
    ctx.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(ctx.out / fname)
    plt.close(fig)
    return fname


def line_plot(
    ctx: Context,
    name: str,
    series: dict[str, list[tuple[float, Stat]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = True,
) -> str:
    """One line per series (median, with a q25-q75 band) on log-x axes; returns the PNG's file name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, pts in series.items():
        xs = [x for x, _ in pts]
        ax.plot(xs, [s.median for _, s in pts], marker="o", label=label)
        ax.fill_between(xs, [s.q25 for _, s in pts], [s.q75 for _, s in pts], alpha=0.25)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(ctx, plt, fig, name)


def bar_plot(
    ctx: Context, name: str, bars: dict[str, Stat], *, ylabel: str, title: str, logy: bool = True
) -> str:
    """One bar per entry (median, with a min-max whisker); returns the PNG's file name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    labels = list(bars)
    med = [bars[k].median for k in labels]
    err = [[bars[k].median - bars[k].min for k in labels], [bars[k].max - bars[k].median for k in labels]]
    ax.bar(range(len(labels)), med, yerr=err, capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return _save(ctx, plt, fig, name)
