"""Figure data in one tidy schema, and the plots drawn from it.

Latent dashboards (top activating text, activation histogram) are at the end.

Heatmap-style data (encoder/decoder cosine similarities with the true features) has the
columns ``setting, n_latents, vector, latent, feature, cos_sim, projection``:

- ``vector``: ``encoder``, ``decoder`` or ``b_dec`` (``latent`` is empty for ``b_dec``);
- ``latent``: the latent's position after reordering to best match the true features, as
  plotted (the SAE's own index is in ``sae_latent``);
- ``cos_sim``: cos(vector, f_feature); ``projection``: the vector's component along the unit
  feature f_feature (for ``b_dec`` this is its magnitude, e.g. ~0.2 f2 in P10a).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from sae_lens.synthetic import find_best_feature_ordering

from hedging_utils.metrics import numeric_values

HEATMAP_COLUMNS = ["setting", "n_latents", "vector", "latent", "feature", "cos_sim", "projection", "sae_latent"]


def similarity_frame(sae: Any, features: torch.Tensor, setting: str) -> pd.DataFrame:
    """Tidy cosine similarities of an SAE's encoder rows, decoder rows and b_dec with the
    true ``features`` (shape [N, D]), latents reordered to best match the features."""
    features = features.detach().float()
    w_dec = sae.W_dec.detach().float()
    w_enc = sae.W_enc.detach().float().T
    order = find_best_feature_ordering(w_dec, features).tolist()
    rows = []
    for vector, weights in (("encoder", w_enc), ("decoder", w_dec)):
        proj = weights @ features.T
        cos = proj / weights.norm(dim=1, keepdim=True).clamp_min(1e-12)
        for plotted, idx in enumerate(order):
            for j in range(len(features)):
                rows.append((setting, w_dec.shape[0], vector, plotted, j, cos[idx, j].item(), proj[idx, j].item(), idx))
    b_dec = sae.b_dec.detach().float()
    b_proj = features @ b_dec
    b_cos = b_proj / b_dec.norm().clamp_min(1e-12)
    for j in range(len(features)):
        rows.append((setting, w_dec.shape[0], "b_dec", None, j, b_cos[j].item(), b_proj[j].item(), None))
    frame = pd.DataFrame(rows, columns=HEATMAP_COLUMNS)
    frame["latent"] = frame["latent"].astype("Int64")
    frame["sae_latent"] = frame["sae_latent"].astype("Int64")
    return frame


def similarity_matrix(frame: pd.DataFrame, vector: str, setting: str | None = None) -> pd.DataFrame:
    """One setting's [latent x feature] cosine-similarity matrix from a tidy frame."""
    sub = frame[frame["vector"] == vector]
    if setting is not None:
        sub = sub[sub["setting"] == setting]
    return sub.pivot(index="latent", columns="feature", values="cos_sim")


def plot_heatmaps(frame: pd.DataFrame, setting: str, axes: Sequence[plt.Axes], title: str | None = None) -> None:
    """Encoder and decoder cosine similarity with the true features, side by side."""
    for ax, vector in zip(axes, ("encoder", "decoder")):
        mat = similarity_matrix(frame, vector, setting)
        sns.heatmap(
            mat, ax=ax, cmap="RdBu", vmin=-1, vmax=1, center=0, annot=mat.shape[1] <= 12,
            fmt=".2f", cbar=False, square=True, linewidths=0.5, linecolor="white",
            xticklabels=[f"f{j + 1}" for j in mat.columns], yticklabels=[f"l{i + 1}" for i in mat.index],
            annot_kws={"fontsize": 8},
        )
        ax.set_xlabel("true feature")
        ax.set_ylabel("SAE latent")
        ax.set_title(f"{title + ': ' if title else ''}{vector}", fontsize=10)


def heatmap_grid(frame: pd.DataFrame, settings: Sequence[str], titles: Sequence[str] | None = None) -> plt.Figure:
    """A row of encoder/decoder heatmap pairs, one pair per setting."""
    titles = list(titles or settings)
    widths = [similarity_matrix(frame, "decoder", s).shape[1] for s in settings]
    heights = [similarity_matrix(frame, "decoder", s).shape[0] for s in settings]
    fig, axes = plt.subplots(
        1, 2 * len(settings), figsize=(max(2.0, 0.6 * max(widths)) * 2 * len(settings) + 1, 0.6 * max(heights) + 1.8),
        squeeze=False,
    )
    for k, (setting, title) in enumerate(zip(settings, titles)):
        plot_heatmaps(frame, setting, axes[0, 2 * k: 2 * k + 2], title)
    fig.tight_layout()
    return fig


def plot_feature_components(frame: pd.DataFrame, setting: str, ax: plt.Axes, title: str | None = None) -> None:
    """Bar chart of the decoder latent(s) (unit norm, cos_sim) and b_dec (raw ``projection``)
    along each true feature: the view of the single-latent toys (paper Figure 10)."""
    sub = frame[(frame["setting"] == setting) & (frame["vector"].isin(["decoder", "b_dec"]))].copy()
    sub["value"] = np.where(sub["vector"] == "b_dec", sub["projection"], sub["cos_sim"])
    sub["vector"] = np.where(sub["vector"] == "b_dec", "b_dec", "decoder latent " + sub["latent"].astype(str).str.replace("<NA>", ""))
    sub["feature"] = "f" + (sub["feature"] + 1).astype(str)
    sns.barplot(sub, x="feature", y="value", hue="vector", ax=ax, palette="deep")
    for cont in ax.containers:
        ax.bar_label(cont, fmt="%.2f", fontsize=7)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylim(min(-0.4, sub["value"].min() - 0.15), 1.15)
    ax.set_ylabel("component along feature")
    ax.set_title(title or setting, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")


def value_at(
    frame: pd.DataFrame, setting: str, vector: str, latent: int | None, feature: int, column: str = "cos_sim"
) -> float:
    """One cell of a tidy similarity frame (``latent`` as plotted; ``None`` for ``b_dec``)."""
    sub = frame[(frame["setting"] == setting) & (frame["vector"] == vector) & (frame["feature"] == feature)]
    if latent is not None:
        sub = sub[sub["latent"] == latent]
    if len(sub) != 1:
        raise KeyError(f"no single cell for setting={setting!r} vector={vector!r} latent={latent} feature={feature}")
    return float(sub[column].iloc[0])


def off_diagonal(
    frame: pd.DataFrame, setting: str, vectors: Sequence[str] = ("encoder", "decoder"), how: str = "max"
) -> float:
    """Largest (``how="max"``) or mean (``"mean"``) |cos| between plotted latent i and the
    features j != i: 0 for a clean SAE."""
    sub = frame[(frame["setting"] == setting) & frame["vector"].isin(vectors)]
    off = sub[sub["latent"].astype(float) != sub["feature"].astype(float)]["cos_sim"].abs()
    return float(off.max() if how == "max" else off.mean())


def latent_for_feature(frame: pd.DataFrame, setting: str, feature: int) -> int:
    """The plotted latent whose decoder is most aligned with ``feature`` (the reordering is a
    best match per latent, so when several latents share a best feature, plotted latent i need
    not track feature i)."""
    sub = frame[(frame["setting"] == setting) & (frame["vector"] == "decoder") & (frame["feature"] == feature)]
    return int(sub.loc[sub["cos_sim"].idxmax(), "latent"])


# ---------------------------------------------------------------------------------------
# Metric panels over a sweep (notebook 06)


def metric_panels(
    frame: pd.DataFrame, x: str, metrics: Mapping[str, str], *, hue: str | None = None, ncols: int = 3,
    xlabel: str | None = None, panel_size: tuple[float, float] = (4.2, 3.2),
) -> Figure:
    """One panel per metric (column -> title) of a tidy frame with one row per SAE: the mean
    over its rows (seeds) at each ``x``, with a ±1 std band (error bars for a single line), one
    line per ``hue`` value. A metric with no numeric value (every entry "not run: ...") gets a
    panel that says so with the reason, never a blank or a made-up value."""
    names = list(metrics)
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False)
    groups = [(None, frame)] if hue is None else list(frame.groupby(hue, sort=False))
    for ax, metric in zip(axes.flat, names):
        values = numeric_values(frame[metric])
        ax.set_title(metrics[metric], fontsize=10)
        if values.isna().all():
            reason = next((v for v in frame[metric] if isinstance(v, str)), "not run: no value")
            ax.text(0.5, 0.5, "\n".join(_wrap(str(reason), 38)), ha="center", va="center", fontsize=8, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for label, part in groups:
            stats = numeric_values(part[metric]).groupby(part[x]).agg(["mean", "std"]).sort_index()
            std = stats["std"].fillna(0.0)
            if hue is None:
                ax.errorbar(stats.index, stats["mean"], yerr=std, fmt="o-", capsize=3)
            else:
                line, = ax.plot(stats.index, stats["mean"], "o-", label=str(label))
                ax.fill_between(stats.index, stats["mean"] - std, stats["mean"] + std, color=line.get_color(), alpha=0.2)
        ax.set_xlabel(xlabel or x)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if hue is not None:
        handles, labels = next(iter(axes.flat)).get_legend_handles_labels()
        for ax in axes.flat:
            if not handles:
                handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05 if hue is not None else 0, 1, 1))
    return fig


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


# ---------------------------------------------------------------------------------------
# Latent dashboards (LLM case study)


def _highlighted(ax: Any, y: float, row: Any, max_value: float) -> None:
    """One top-activating example as a line of text: context, the token in brackets, what follows;
    the bar on the left is the activation relative to the latent's maximum."""
    ax.barh(y, row["activation"] / max(max_value, 1e-12) * 0.08, left=0.0, height=0.7, color="tab:orange", alpha=0.6)
    text = f"{row['before'][-70:]}[{row['token']}]{row['after']}".replace("\n", "⏎").replace("$", r"\$")
    ax.text(0.1, y, f"{row['activation']:.2f}  {text}", va="center", fontsize=7.5, family="monospace")


def plot_top_examples(examples: pd.DataFrame, title: str = "") -> Figure:
    """Top-activating examples (rows of ``hedging_utils.llm.top_examples`` with a ``latent``
    column) of each latent, one panel per latent."""
    groups = list(examples.groupby("latent", sort=False))
    fig, axes = plt.subplots(len(groups), 1, figsize=(13, 0.32 * len(examples) + 1.2 * len(groups)), squeeze=False)
    for ax, (name, g) in zip(axes[:, 0], groups):
        for y, (_, row) in enumerate(g.iterrows()):
            _highlighted(ax, -y, row, float(g["activation"].max()))
        ax.set(xlim=(0, 1), ylim=(-len(g) + 0.3, 0.7), title=name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_latent_dashboard(values: Any, examples: pd.DataFrame, title: str = "", bins: int = 40) -> tuple[Figure, pd.DataFrame]:
    """A latent dashboard: the histogram of its non-zero activations over the cached tokens,
    its firing rate, and its top examples with per-token activations. Returns the figure and a
    tidy frame of what it shows (``kind`` = histogram / example_token)."""
    flat = np.asarray(values).reshape(-1)
    active = flat[flat > 0]
    fig = plt.figure(figsize=(13, 0.3 * len(examples) + 3.2))
    grid = fig.add_gridspec(2, 1, height_ratios=[1.2, 0.3 * len(examples) / 2.2 + 0.4])
    hist_ax, text_ax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    counts, edges = np.histogram(active, bins=bins) if len(active) else (np.zeros(bins), np.linspace(0, 1, bins + 1))
    hist_ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue")
    hist_ax.set(xlabel="activation (non-zero only)", ylabel="tokens",
                title=f"{title}: fires on {len(active):,} of {len(flat):,} tokens ({100 * len(active) / max(len(flat), 1):.3f}%)")
    for y, (_, row) in enumerate(examples.iterrows()):
        _highlighted(text_ax, -y, row, float(examples["activation"].max()))
    text_ax.set(xlim=(0, 1), ylim=(-len(examples) + 0.3, 0.7), title="top activating tokens [in brackets]")
    text_ax.axis("off")
    fig.tight_layout()
    rows = [{"kind": "histogram", "bin_left": float(edges[i]), "bin_right": float(edges[i + 1]), "count": int(counts[i])}
            for i in range(len(counts))]
    for _, row in examples.iterrows():
        rows += [{"kind": "example_token", "rank": int(row["rank"]), "offset": j, "token": tok, "activation": float(v)}
                 for j, (tok, v) in enumerate(zip(row["window_tokens"], row["window_values"]))]
    return fig, pd.DataFrame(rows)
