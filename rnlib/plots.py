"""Figures: one seaborn style, one save helper (PNG + PDF, stable names), and the curves two notebooks share."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless under papermill; notebooks still show the figure inline via display()
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
TARGET_COLORS = {"standard": "#d55e00", "defended": "#0072b2", "sft_refusal": "#009e73", "entropy": "#cc79a7"}


def save(fig, name: str, figures_dir: str | Path) -> list[Path]:
    """Write figures_dir/name.png and .pdf; return both paths."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    return paths


def save_table(table, name: str, figures_dir: str | Path, title: str, note: str = "") -> None:
    """Write figures_dir/name.csv and name.md: a titled markdown section that docs/results.md is assembled from."""
    out = Path(figures_dir)
    table.to_csv(out / f"{name}.csv", index=False)
    text = f"## {title}\n\n" + (f"{note}\n\n" if note else "") + table.to_markdown(index=False, floatfmt=".2f")
    (out / f"{name}.md").write_text(text + "\n")


def curves(data, y: str, ylabel: str, band: str | None = None, col: str = "domain", hue: str = "target",
           ylim=None, xlabel: str = "step"):
    """Metric vs step, one panel per `col`, one line per `hue` (mean over seeds).

    The shaded band is +-1 sd over seeds when several seeds ran, else +-`band` (a run's own spread, e.g. the
    harm score's sd over sampled answers). The legend says which.
    """
    panels = sorted(data[col].dropna().unique())
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        for name, group in data[data[col] == panel].groupby(hue):
            by_step = group.groupby("step")
            mean = by_step[y].mean()
            n_seeds = group["seed"].nunique()
            spread = by_step[y].std() if n_seeds > 1 else (by_step[band].mean() if band else None)
            color = TARGET_COLORS.get(name) if hue == "target" else None
            line, = ax.plot(mean.index, mean.values, marker="o", ms=3, color=color,
                            label=f"{name} (n={n_seeds} seed{'s' if n_seeds > 1 else ''})")
            if spread is not None:
                ax.fill_between(mean.index, mean - spread.fillna(0), mean + spread.fillna(0), alpha=0.2,
                                color=line.get_color(), lw=0)
        ax.set(title=str(panel), xlabel=xlabel, ylabel=ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.legend(fontsize=8, title="band: sd over seeds" if data["seed"].nunique() > 1 else
                  (f"band: {band}" if band else None), title_fontsize=7)
    return fig


def rate_bars(checks, x: str, hue: str, kind: str = "benign", bar: float | None = None):
    """Refusal rates from `train.refusal_checks` as grouped bars with their 95% intervals (seaborn's barplot
    cannot draw precomputed intervals); `bar` draws a dashed line at a target rate."""
    categories, levels = list(dict.fromkeys(checks[x])), list(dict.fromkeys(checks[hue]))
    width = 0.8 / len(levels)
    fig, ax = plt.subplots(figsize=(1.2 * len(categories) * max(1, len(levels) / 2) + 2.5, 3.4))
    for j, level in enumerate(levels):
        rows = checks[checks[hue] == level].set_index(x).reindex(categories)
        rate, low, high = rows[f"{kind} rate"], rows[f"{kind} low"], rows[f"{kind} high"]
        positions = np.arange(len(categories)) - 0.4 + width * (j + 0.5)
        ax.bar(positions, rate, width, label=str(level))
        ax.errorbar(positions, rate, yerr=[rate - low, high - rate], fmt="none", color="black", capsize=3)
    if bar is not None:
        ax.axhline(bar, ls="--", color="grey", lw=1)
    ax.set_xticks(range(len(categories)), categories)
    ax.set(ylabel=f"{kind} refusal rate (95% CI)", xlabel="", ylim=(0, 1))
    ax.legend(title=hue, fontsize=8, title_fontsize=8)
    return fig


def survival(fits: dict, budget: int, within: int | None = None):
    """Kaplan-Meier curves (lifelines fits, `robustness.kaplan_meier`): the share of cells still aligned after each
    attack step, with 95% bands; ticks mark censored cells (attacks that ended without un-aligning their model)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for dashes, (name, fit) in zip(["-", "--", "-.", ":"] * len(fits), fits.items()):  # equal curves stay visible
        fit.plot_survival_function(ax=ax, ci_show=True, show_censors=True, color=TARGET_COLORS.get(name), ls=dashes,
                                   label=f"{name} ({fit.event_observed.size} cells)")
    if within is not None:
        ax.axvline(within, ls=":", color="grey", lw=1)
    ax.set(xlim=(0, budget * 1.02), ylim=(-0.02, 1.05), xlabel="attack step",
           ylabel="share of cells still aligned")
    ax.legend(fontsize=8)
    return fig


def save_survival(summary, prefix: str, figures_dir: str | Path, models: str, attack: str,
                  within: int | None = None) -> None:
    """Save a `robustness.survival_summary` as `<prefix>_survival` (curves), `_median_survival`, `_logrank` and
    `_survival_cells`, titled with the `models` compared and captioned with the `attack` their cells ran."""
    budget = summary.budget
    save(survival(summary.fits, budget, within=within), f"{prefix}_survival", figures_dir)
    save_table(summary.medians, f"{prefix}_median_survival", figures_dir,
               f"Median attack steps to un-alignment: {models}",
               f"Kaplan-Meier median over the (domain, seed) cells of {attack}, with its 95% interval (inf: more "
               f"than half the cells held the {budget}-step budget; nan: too few cells). Floor-failing cells left out.")
    save_table(summary.tests, f"{prefix}_logrank", figures_dir, f"Log-rank tests of RN against the others: {models}",
               "Does the RN model stay aligned longer under the same attack? Floor-failing cells left out; with a "
               "handful of cells only a large difference can show.")
    save_table(summary.cells, f"{prefix}_survival_cells", figures_dir, f"Every attacked cell: {models}",
               f"Steps: the step at which {attack} un-aligned the model (unaligned True) or its last evaluated step "
               f"(censored, of a {budget}-step budget); frozen steps: how many steps it began with every group's "
               "rewards equal (no gradient); highest harm by the eval judge.")
