"""The study's figures under `figures/`, each PNG with its data beside it (a CSV or NPZ), so that
two runs can be compared on the numbers a figure shows, not on pixels:

- `distributions.png`/`.csv`: every metric's distribution over volumes, per method (boxes) and
  model (columns);
- `ranking.png`/`.csv`: methods ranked per metric (1 = best; direction per metric in
  aggregate.DIRECTIONS), averaged over volumes, per model;
- `gallery.png`/`.npz`: the same slice of a few cases across methods (input, segmentation, maps);
- `summary.png`: one glance: up to four metrics, methods side by side, one box colour per model
  (its data is distributions.csv);
- `relevance_shares.png`/`.csv`: where each method's absolute relevance goes, per model (mean share
  in the segmentation, its boundary band, the reference mask and elsewhere over volumes; Agg2Exp's
  cohort aggregation). Only when the `relevance_shares` metric was computed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from .aggregate import DIRECTIONS, SHARES, metric_columns



def _save(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write and close a figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def write_figures(out: Path, frame, spec, gallery_cases: int) -> Dict[str, Path]:
    folder = Path(out) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}
    done = frame[frame["status"] == "done"]
    metrics = metric_columns(frame)
    if len(done) and metrics:
        written["distributions"] = distributions(folder, done, metrics)
        written["summary"] = summary_figure(folder, done, metrics)
        # Ranking needs a metric that at least two methods have (not IG's convergence delta alone).
        ranked = [m for m in metrics if DIRECTIONS.get(m)
                  and done.dropna(subset=[m])["method"].nunique() >= 2]
        if ranked:
            written["ranking"] = ranking(folder, done, ranked)
    if len(done) and all(c in done.columns for c in SHARES) and done[list(SHARES)].notna().any().any():
        written["relevance_shares"] = relevance_shares_figure(folder, done)
    if len(done) and gallery_cases > 0:
        path = gallery(folder, Path(out), done, spec, gallery_cases)
        if path is not None:
            written["gallery"] = path
    return written


def distributions(folder: Path, done, metrics: List[str]) -> Path:
    plt = _pyplot()
    models = list(dict.fromkeys(done["model"]))
    methods = list(dict.fromkeys(done["method"]))
    data = done[["model", "method", "volume"] + metrics].melt(
        id_vars=["model", "method", "volume"], var_name="metric", value_name="value")
    data = data.sort_values(["metric", "model", "method", "volume"], kind="stable")
    data.to_csv(folder / "distributions.csv", index=False)
    fig, axes = plt.subplots(len(metrics), len(models), figsize=(2.2 + 1.1 * len(methods) * len(models),
                                                                  1.6 + 2.0 * len(metrics)),
                             squeeze=False, sharey="row")
    for r, metric in enumerate(metrics):
        for c, model in enumerate(models):
            ax = axes[r][c]
            values = [done[(done["model"] == model) & (done["method"] == m)][metric].dropna().to_numpy(dtype=float)
                      for m in methods]
            ax.boxplot([v if v.size else [np.nan] for v in values], widths=0.6, showfliers=False)
            for k, v in enumerate(values):  # every volume as a point: n is small in a pilot study
                ax.scatter(np.full(v.size, k + 1) + np.linspace(-0.12, 0.12, v.size), v, s=10, color="C1", zorder=3)
            ax.set_xticks(range(1, len(methods) + 1))
            ax.set_xticklabels(methods if r == len(metrics) - 1 else [""] * len(methods), rotation=30, ha="right")
            arrow = {1: " (higher better)", -1: " (lower better)"}.get(DIRECTIONS.get(metric, 0), "")
            if c == 0:
                ax.set_ylabel(metric + arrow, fontsize=8)
            if r == 0:
                ax.set_title(f"model: {model}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Metric distributions over volumes", fontsize=10)
    return _save(fig, folder / "distributions.png")


def summary_figure(folder: Path, done, metrics: List[str], at_most: int = 4) -> Path:
    """Models compared per method: for each of the first `at_most` metrics, boxes over volumes."""
    plt = _pyplot()
    shown = [m for m in metrics if m != "convergence_delta"][:at_most] or metrics[:at_most]
    models = list(dict.fromkeys(done["model"]))
    methods = list(dict.fromkeys(done["method"]))
    fig, axes = plt.subplots(1, len(shown), figsize=(0.6 + (1.0 + 0.75 * len(methods)) * len(shown), 3.6),
                             squeeze=False)
    width = 0.8 / max(len(models), 1)
    for a, metric in enumerate(shown):
        ax = axes[0][a]
        for j, model in enumerate(models):
            positions = np.arange(len(methods)) + (j - (len(models) - 1) / 2) * width
            values = [done[(done["model"] == model) & (done["method"] == m)][metric].dropna().to_numpy(dtype=float)
                      for m in methods]
            boxes = ax.boxplot([v if v.size else [np.nan] for v in values], positions=positions,
                               widths=width * 0.85, patch_artist=True, showfliers=False)
            for box in boxes["boxes"]:
                box.set(facecolor=f"C{j}", alpha=0.55)
            for k, v in enumerate(values):
                ax.scatter(np.full(v.size, positions[k]), v, s=8, color=f"C{j}", zorder=3)
            ax.plot([], [], color=f"C{j}", linewidth=6, alpha=0.55, label=model)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        arrow = {1: " \u2191 better", -1: " \u2193 better"}.get(DIRECTIONS.get(metric, 0), "")
        ax.set_title(metric + arrow, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(title="model", fontsize=8, title_fontsize=8, loc="best")
    n_volumes = done["volume"].nunique()
    fig.suptitle(f"{len(models)} models x {len(methods)} methods x {n_volumes} volumes", fontsize=10)
    return _save(fig, folder / "summary.png", dpi=120)


def relevance_shares_figure(folder: Path, done) -> Path:
    """Grouped bars: per model (panel) and method (group), the mean of each share over volumes."""
    plt = _pyplot()
    means = done.groupby(["model", "method"], sort=False)[list(SHARES)].mean().reset_index()
    means.to_csv(folder / "relevance_shares.csv", index=False)
    models = list(dict.fromkeys(done["model"]))
    methods = list(dict.fromkeys(done["method"]))
    fig, axes = plt.subplots(1, len(models), figsize=(1.5 + 0.9 * len(methods) * len(models), 3.6),
                             squeeze=False, sharey=True)
    width = 0.8 / len(SHARES)
    for c, model in enumerate(models):
        ax = axes[0][c]
        rows = means[means["model"] == model].set_index("method").reindex(methods)
        for k, share in enumerate(SHARES):
            ax.bar(np.arange(len(methods)) + (k - (len(SHARES) - 1) / 2) * width, rows[share].to_numpy(),
                   width=width, color=f"C{k}", label=share.replace("share_", ""))
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"model: {model}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("share of |attribution| (mean over volumes)", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Where the relevance goes", fontsize=10)
    return _save(fig, folder / "relevance_shares.png")


def rank_table(done, metrics: List[str]):
    """Mean rank (1 = best) of each method per model x metric, ranking methods within each volume."""
    import pandas as pd

    rows = []
    for metric in metrics:
        sign = DIRECTIONS[metric]
        for (model, volume), group in done.groupby(["model", "volume"], sort=False):
            ranks = (-sign * group[metric]).rank(method="average")
            for method, rank in zip(group["method"], ranks):
                if rank != rank:  # NaN: no value for this method
                    continue
                rows.append({"model": model, "metric": metric, "method": method, "volume": volume, "rank": rank})
    long = pd.DataFrame(rows)
    return (long.groupby(["model", "metric", "method"], sort=False)["rank"].mean().reset_index()
            .sort_values(["model", "metric", "method"], kind="stable").reset_index(drop=True))


def ranking(folder: Path, done, metrics: List[str]) -> Path:
    plt = _pyplot()
    table = rank_table(done, metrics)
    table.to_csv(folder / "ranking.csv", index=False)
    models = list(dict.fromkeys(done["model"]))
    methods = list(dict.fromkeys(done["method"]))
    fig, axes = plt.subplots(1, len(models), figsize=(1.6 + 0.9 * len(metrics) * len(models), 1.4 + 0.45 * len(methods)),
                             squeeze=False)
    for c, model in enumerate(models):
        grid = np.full((len(methods), len(metrics)), np.nan)
        for _, row in table[table["model"] == model].iterrows():
            grid[methods.index(row["method"]), metrics.index(row["metric"])] = row["rank"]
        ax = axes[0][c]
        image = ax.imshow(grid, cmap="viridis_r", vmin=1, vmax=max(len(methods), 2), aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if value < (len(methods) + 1) / 2 else "white")  # dark cells: worst ranks
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels(metrics, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels(methods if c == 0 else [""] * len(methods), fontsize=8)
        ax.set_title(f"model: {model}", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean rank (1 = best)")
    fig.suptitle("Method ranking per metric", fontsize=10, y=1.03)
    path = folder / "ranking.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _best_slice(segmentation: np.ndarray) -> int:
    """The axial (K) slice with the most labelled voxels (the middle one when none): the ROI mask
    when the study explains one, else the first model's segmentation of the volume."""
    counts = (segmentation > 0).sum(axis=(0, 1))
    return int(np.argmax(counts)) if counts.any() else segmentation.shape[2] // 2


def gallery(folder: Path, out: Path, done, spec, n_cases: int):
    """Rows: the first `n_cases` finished cases (volume by volume, every model); columns: input, segmentation, one map per method
    (signed maps on a symmetric diverging scale, unsigned on inferno, each scaled to its own
    99th percentile of |value|)."""
    from ..io import read_image
    from .cases import case_dir

    plt = _pyplot()
    cases = list(dict.fromkeys(zip(done["volume"], done["model"])))[:n_cases]
    methods = list(dict.fromkeys(done["method"]))
    if not cases:
        return None
    arrays: Dict[str, np.ndarray] = {}
    fig, axes = plt.subplots(len(cases), 2 + len(methods), figsize=(2.0 * (2 + len(methods)), 2.1 * len(cases)),
                             squeeze=False)
    volumes = {v.name: v.path for v in spec.volumes}
    volume_masks = {v.name: v.mask for v in spec.volumes}
    slices: Dict[str, int] = {}
    for r, (volume, model) in enumerate(cases):
        folder_case = case_dir(out, volume, model)
        seg_file = next(folder_case.glob("segmentation.*"))
        segmentation = read_image(seg_file).array[0]
        if volume not in slices:  # one slice per volume, so that models are compared on the same one
            mask = volume_masks.get(volume)
            slices[volume] = _best_slice(read_image(mask).array[0] if mask and spec.region == "roi" else segmentation)
        k = slices[volume]
        image = read_image(volumes[volume]).array[0][:, :, k]
        arrays[f"{volume}/{model}/input"] = image
        arrays[f"{volume}/{model}/segmentation"] = segmentation[:, :, k]
        panels = [("input", image, "gray", None), ("segmentation", image, "gray", segmentation[:, :, k])]
        for method in methods:
            files = list((folder_case / "attributions").glob(f"{method}.*"))
            slice_ = read_image(files[0]).array[0][:, :, k] if files else np.full(image.shape, np.nan)
            arrays[f"{volume}/{model}/{method}"] = slice_
            panels.append((method, slice_, None, None))
        for c, (title, data, cmap, overlay) in enumerate(panels):
            ax = axes[r][c]
            if cmap is None:
                finite = np.abs(data[np.isfinite(data)])
                scale = float(np.percentile(finite, 99)) if finite.size and finite.max() > 0 else 1.0
                signed = bool(np.nanmin(data) < -1e-6 * scale) if finite.size else False
                ax.imshow(data.T, origin="lower", cmap="RdBu_r" if signed else "inferno",
                          vmin=-scale if signed else 0, vmax=scale)
            else:
                ax.imshow(data.T, origin="lower", cmap=cmap)
                if overlay is not None:
                    ax.contour(overlay.T, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{volume}\n{model}\nk={k}", fontsize=8)
    fig.suptitle("The same slice across methods", fontsize=10)
    np.savez_compressed(folder / "gallery.npz", **{k.replace("/", "|"): v for k, v in arrays.items()})
    return _save(fig, folder / "gallery.png")
