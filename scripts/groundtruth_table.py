#!/usr/bin/env python3
"""The ground-truth study's table and figure (docs/readme/study.md, "Ground truth") from a finished
`esegeta study examples/groundtruth_study.yaml --out DIR`:

    python scripts/groundtruth_table.py DIR --figure docs/images/groundtruth_study.png \
        --markdown DIR/groundtruth_table.md

Per model and method, the median over the study's volumes (study.csv) of: relative infidelity,
max-sensitivity, deletion and insertion AUC (faithfulness), VxAP, relevance mass and the pointing
game against the generator's ground-truth relevance mask (markers + labelled vessel), the
topology-aware deletion AUC, the signed Spearman rank correlation of the randomisation check with
its pass count, and the attribution runtime. A method refused on a model shows the refusal instead.
Chance levels (a map that knows nothing) are printed beside: VxAP and relevance mass of a random
map equal the ground-truth mask's share of the voxels.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (column in study.csv, header, format); arrows: which way is better
COLUMNS = [
    ("infidelity_rel", "infid. rel ↓", "{:.2f}"),
    ("sensitivity_max", "sens. max ↓", "{:.2f}"),
    ("deletion_auc", "deletion ↓", "{:.2f}"),
    ("insertion_auc", "insertion ↑", "{:.2f}"),
    ("vxap", "VxAP ↑", "{:.2f}"),
    ("relevance_mass", "GT mass ↑", "{:.2f}"),
    ("pointing_game", "pointing ↑", "{:.1f}"),
    ("topology_auc", "clDice del. ↓", "{:.2f}"),
]
FIGURE = [("vxap", "VxAP (ground truth) ↑"), ("relevance_mass", "relevance mass in ground truth ↑"),
          ("insertion_auc", "insertion AUC ↑"), ("infidelity_rel", "relative infidelity ↓"),
          ("sensitivity_max", "max-sensitivity ↓"), ("randomisation_spearman_signed", "randomisation: signed ρ")]


def load(study: Path):
    import pandas as pd

    frame = pd.read_csv(study / "study.csv")
    record = json.loads((study / "study.json").read_text())
    return frame, record


def chance_level(record) -> float:
    """The ground-truth masks' mean share of the voxels (VxAP and mass of a random map)."""
    from EsegetaLib.io import read_image

    shares = [float(np.mean(read_image(v["reference"]).array > 0.5))
              for v in record["study"]["volumes"] if v.get("reference")]
    return float(np.mean(shares)) if shares else float("nan")


def per_pair(frame):
    """{(model, method): dict of medians, n, n_refused, refusal, randomisation passes}."""
    out = {}
    for (model, method), group in frame.groupby(["model", "method"], sort=False):
        done = group[group["status"] == "done"]
        refused = group[group["status"] == "refused"]
        cell = {"n": len(done), "n_refused": len(refused),
                "refusal": str(refused["error"].iloc[0]) if len(refused) else ""}
        for column in [c for c, _, _ in COLUMNS] + ["randomisation_spearman_signed", "attribution_s"]:
            values = done[column].dropna() if column in done else []
            cell[column] = float(np.median(values)) if len(values) else float("nan")
        if "randomisation_pass" in done:  # True/False, or 1.0/0.0 once read as numbers
            passes = [str(v).lower() in ("true", "1", "1.0") for v in done["randomisation_pass"].dropna()]
            cell["random_pass"], cell["random_n"] = int(sum(passes)), len(passes)
        from EsegetaLib.study.aggregate import note_column

        cell["notes"] = {}
        for column in [c for c, _, _ in COLUMNS] + ["randomisation_spearman_signed"]:
            name = note_column(column, done.columns)
            if name is not None and column in done:  # any volume where it is NaN, with the reason
                notes = [str(v) for v in done.loc[done[column].isna(), name].dropna() if str(v)]
                if notes:
                    cell["notes"][column] = notes[0]
        out[(model, method)] = cell
    return out


def _short(reason: str) -> str:
    reason = reason.split(";")[0]
    return reason if len(reason) < 90 else reason[:87] + "..."


def markdown(frame, cells, chance: float) -> str:
    header = ["model", "method", "n"] + [h for _, h, _ in COLUMNS] + ["randomisation ρ (pass)", "s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    models = list(dict.fromkeys(frame["model"]))
    methods = list(dict.fromkeys(frame["method"]))
    for model in models:
        for method in methods:
            cell = cells.get((model, method))
            if cell is None:
                continue
            if cell["n"] == 0:
                lines.append(f"| {model} | {method} | 0 | refused: {_short(cell['refusal'])} |"
                             + " |" * (len(header) - 4))
                continue
            n = f"{cell['n']}" + (f" (+{cell['n_refused']} refused)" if cell["n_refused"] else "")
            row = [model, method, n]
            row += ["-" if not np.isfinite(cell[c]) else f.format(cell[c]) for c, _, f in COLUMNS]
            rho = cell["randomisation_spearman_signed"]
            row.append("undefined" if not np.isfinite(rho) else
                       f"{rho:+.2f} ({cell.get('random_pass', 0)}/{cell.get('random_n', 0)})")
            row.append(f"{cell['attribution_s']:.1f}")
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"Chance level (a random map): VxAP and GT mass = {chance:.3f} (the ground-truth mask's share "
                 "of the voxels). Medians over the volumes; randomisation: signed Spearman ρ between the map "
                 "and the fully randomised network's map (|ρ| < 0.5 passes), passes / volumes; undefined: a "
                 "map constant over the compared voxels.")
    notes = [(model, method, column, note) for (model, method), cell in cells.items()
             for column, note in cell.get("notes", {}).items()]
    if notes:
        lines += ["", "Not computed (NaN), with the reason:"]
        lines += [f"- {model} / {method}, {column}: {note}" for model, method, column, note in notes]
    refused = frame[frame["status"] == "refused"]
    if len(refused):
        lines += ["", "Refused:"]
        for r in refused.itertuples():
            lines.append(f"- {r.model} / {r.method} on {r.volume}: {r.error}")
    return "\n".join(lines) + "\n"


def figure(frame, cells, chance: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(frame["model"]))
    methods = list(dict.fromkeys(frame["method"]))
    fig, axes = plt.subplots(2, 3, figsize=(18, 10.5), constrained_layout=True)
    for ax, (column, title) in zip(axes.flat, FIGURE):
        grid = np.array([[cells.get((mo, me), {}).get(column, np.nan) for mo in models] for me in methods])
        if column == "randomisation_spearman_signed":
            image = ax.imshow(grid, cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
        else:
            finite = grid[np.isfinite(grid)]
            vmin, vmax = (np.percentile(finite, [2, 98]) if finite.size else (0, 1))
            image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for i, method in enumerate(methods):
            for j, model in enumerate(models):
                cell = cells.get((model, method), {})
                value = cell.get(column, np.nan)
                text = "refused" if cell.get("n", 1) == 0 else ("-" if not np.isfinite(value) else f"{value:.2f}")
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if column != "randomisation_spearman_signed" and np.isfinite(value) else "black")
        ax.set_xticks(range(len(models)), models, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
        extra = f" (chance {chance:.3f})" if column in ("vxap", "relevance_mass") else ""
        ax.set_title(title + extra, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle("Ground-truth study: median over the volumes per model (columns) and method (rows)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study's output folder (study.csv, study.json)")
    parser.add_argument("--figure", type=Path, help="PNG to write the heatmaps to")
    parser.add_argument("--markdown", type=Path, help="write the table here (default: print it)")
    args = parser.parse_args(argv)
    frame, record = load(args.study)
    cells = per_pair(frame)
    chance = chance_level(record)
    table = markdown(frame, cells, chance)
    if args.markdown:
        args.markdown.write_text(table)
    else:
        print(table)
    if args.figure:
        print(f"figure: {figure(frame, cells, chance, args.figure)}")
    started, finished = record.get("started"), record.get("finished")
    counts = record.get("counts")
    print(f"study {record['study'].get('name')}: started {started}, finished {finished}, cases {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
