"""`MetricsReport`: one row per method, the curves, and the files written beside a run."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

# Fixed column order of metrics.csv (columns of metrics that were not run are left out).
COLUMN_ORDER = [
    "method", "attribution_s",
    "infidelity", "infidelity_se", "infidelity_rel",
    "sensitivity_max", "sensitivity_avg", "sensitivity_avg_se",
    "deletion_auc", "insertion_auc",
    "relevance_mass", "relevance_rank",
    "sparseness", "complexity", "complexity_rel",
    "randomisation_spearman", "randomisation_spearman_signed", "randomisation_ssim", "randomisation_pass",
]


def clean_json(value: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class MetricsReport:
    rows: List[Dict[str, Any]] = field(default_factory=list)
    curves: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # method -> {"deletion": ..., "insertion": ...}
    stages: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)  # method -> randomisation stages
    settings: Dict[str, Any] = field(default_factory=dict)  # metric parameters, seed, device, reference

    def columns(self) -> List[str]:
        present = {k for row in self.rows for k in row}
        ordered = [c for c in COLUMN_ORDER if c in present]
        timing = sorted(c for c in present if c.endswith("_s") or c.endswith("_peak_mb"))
        rest = sorted(present - set(ordered) - set(timing))
        return ordered + rest + [c for c in timing if c not in ordered]

    def table(self) -> List[List[Any]]:
        """Header + one list per method (for the Slicer table node and printing)."""
        cols = self.columns()
        return [cols] + [[row.get(c) for c in cols] for row in self.rows]

    def write(self, out_dir) -> Dict[str, Path]:
        """metrics.csv, metrics.json, curves.json and deletion_insertion.png (when there are curves)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "metrics.csv", "json": out / "metrics.json", "curves": out / "curves.json"}
        cols = self.columns()
        with open(paths["csv"], "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(cols)
            for row in self.rows:
                writer.writerow(["" if clean_json(row.get(c)) is None else row.get(c) for c in cols])
        with open(paths["json"], "w") as fh:
            json.dump(clean_json({"columns": cols, "rows": self.rows, "settings": self.settings,
                              "randomisation_stages": self.stages}), fh, indent=2)
        with open(paths["curves"], "w") as fh:
            json.dump(clean_json(self.curves), fh)
        if any(self.curves.values()):
            paths["png"] = self.plot(out / "deletion_insertion.png")
        return paths

    def plot(self, path, title: str = "") -> Path:
        """Deletion (left) and insertion (right) curves of every method, normalised scores, written
        to `path` (PNG); only the kinds computed get a panel; `title` (e.g. the target's name) heads
        the figure."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = self.figure(title)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)

    def figure(self, title: str = ""):
        """The matplotlib figure of `plot`: one panel per curve kind computed (deletion, insertion or
        both; `--metrics deletion` draws the deletion panel only)."""
        import matplotlib.pyplot as plt

        modes = [m for m in ("deletion", "insertion") if any(c.get(m) for c in self.curves.values())]
        modes = modes or ["deletion"]
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), sharey=True, squeeze=False)
        axes = list(axes[0])
        for ax, mode in zip(axes, modes):
            for method, curves in self.curves.items():
                curve = curves.get(mode)
                if not curve:
                    continue
                auc = curve.get("auc")
                label = method if auc is None or auc != auc else f"{method} (AUC {auc:.3f})"
                ax.plot(curve["fraction"], curve["normalised"], label=label)
            ax.set_title(f"{mode}: " + ("lower area is better" if mode == "deletion" else "higher area is better"))
            ax.set_xlabel(f"fraction of features {'removed' if mode == 'deletion' else 'inserted'}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        axes[0].set_ylabel("normalised score (F - F(baseline)) / (F(x) - F(baseline))")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return fig
